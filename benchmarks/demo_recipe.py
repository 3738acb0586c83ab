"""The recipe search behind configs/base.py:demo: which settings learn most in the demo's
time budget on a 2-core CPU.

Each trial is configs/base.py:demo with the trial's overrides (dotted config keys), run
as README command 1 runs it (`launch/train.py`), in its own process, with validation at
the end of the run and no test: the choice is made on val, and the test split is read once,
for the chosen recipe, by README command 1 itself. As in benchmarks/ablation.py, the
demo's warm-up is scaled with the steps unless the trial sets it, checkpoints are only
written at the end, and a finished trial (WORKDIR/NAME/trial.json) is reused, so an
interrupted search resumes where it stopped.

The budget is CPU time, not wall time, because the VM is shared: a trial's process CPU
time (user + system, from getrusage of the child) is what a quiet machine would spend too,
while its wall time depends on the load. `--budget_cpu_s` is the CPU time README command 1
may take in all (dataset build, start-up, compile, training, validation and test); a trial
gets what is left after the measured build (`--build_cpu_s`) and one more evaluation
(the test; as long as the validation the trial does run). See docs/BENCHMARKS.md ("Demo
recipe search") for the calibration of CPU seconds against quiet wall time.
On a quiet machine (the fine stages, from `pixels` on) the wall time is the figure of
merit, and each trial's JSON says which machine ran it.

Usage:

    nice -n 10 python benchmarks/demo_recipe.py --stage coarse [--trials NAME ...]
        [--workdir /tmp/cookie_demo_recipe] [--json docs/demo_recipe.json]

Every trial's figures (steps, wall, user and system CPU, pairs/s, val R@K and RSUM, the
load average before and after) are appended to the JSON file.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

# Stages of the search (coarse to fine). A trial is (name, steps, overrides); steps are
# the demo's own when None. Later stages are written after reading the earlier ones.
STAGES = {
    # 1. What a step costs and what a fixed number of steps buys: the current demo at a
    #    shorter schedule, against cheaper objectives, larger learning rates, batches.
    'coarse': [
        ('demo600', 600, {}),
        ('lr4e-3', 600, {'optim.lr': 4e-3}),
        ('lr1e-3', 600, {'optim.lr': 1e-3}),
        ('no_visual', 600, {'loss.visual.weight': 0.0}),
        ('no_ks', 600, {'loss.visual.weight': 0.0, 'loss.textual.weight': 0.0}),
        ('b256', 300, {'train.batch_size': 256}),
        ('temp0.03', 600, {'model.temperature_init': 0.03}),
        ('w64', 300, {'model.vision.width': 64, 'model.text.width': 64,
                      'model.shared.width': 64, 'model.vision.mlp_dim': 128,
                      'model.text.mlp_dim': 128, 'model.shared.mlp_dim': 128,
                      'model.embed_dim': 64}),
    ],
    # 2. The visual term carries the demo (no_visual: 70.8 against 152.0) and lr 2e-3 is
    #    between the worse 1e-3 and 4e-3: weigh the knowledge-sharing terms up.
    'coarse2': [
        ('vis0.5', 600, {'loss.visual.weight': 0.5}),
        ('ks0.5', 600, {'loss.visual.weight': 0.5, 'loss.textual.weight': 0.5}),
        ('vis1', 600, {'loss.visual.weight': 1.0}),
    ],
    # 3. (A quiet AMD EPYC VM.) The tiny ViT sees the 64 px scenes at 32 px through 8 px
    #    patches: a small shape is 6 px across. More pixels per token at the same 16 tokens
    #    (patch 16 at 64 px) against more tokens (patch 8 at 64 px, 4x the image tower).
    'pixels': [
        ('f_demo600', 600, {}),
        ('f_px64p16', 600, {'model.vision.image_size': 64, 'model.vision.patch_size': 16}),
        ('f_px48p12', 600, {'model.vision.image_size': 48, 'model.vision.patch_size': 12}),
        ('f_px64p8', 600, {'model.vision.image_size': 64, 'model.vision.patch_size': 8}),
    ],
    # 4. Pixels do not help at equal steps (32 px: 152.0; 48/12: 149.0; 64/16: 143.0;
    #    64/8: 137.0 at 2.7x the time). One lever at a time, at 600 steps.
    'levers': [
        ('f_notextual', 600, {'loss.textual.weight': 0.0}),
        ('f_nodropout', 600, {'loss.textual.weight': 0.0, 'model.text.dropout': 0.0}),
        ('f_temp0.03', 600, {'model.temperature_init': 0.03}),
        ('f_b64', 1200, {'train.batch_size': 64}),
        ('f_vdepth4', 600, {'model.vision.depth': 4}),
        ('f_mlp128', 600, {'model.vision.mlp_dim': 128, 'model.text.mlp_dim': 128,
                           'model.shared.mlp_dim': 128}),
        ('f_crop0.5', 600, {'data.crop_scale': (0.5, 1.0)}),
        ('f_meanpool', 600, {'model.image_pool': 'mean'}),
        ('f_shared2', 600, {'model.shared.depth': 2}),
    ],
    # 5. Every larger model is worse at 600 steps and a sharper start (0.03) much worse:
    #    softer temperatures, the optimiser's brakes (clipping, warm-up), the visual weight.
    'optim': [
        ('f_temp0.1', 600, {'model.temperature_init': 0.1}),
        ('f_temp0.2', 600, {'model.temperature_init': 0.2}),
        ('f_noclip', 600, {'optim.clip_norm': 0.0}),
        ('f_wu150', 600, {'optim.warmup_steps': 150}),
        ('f_vis0.3', 600, {'loss.visual.weight': 0.3}),
        ('f_lr3e-3', 600, {'optim.lr': 3e-3}),
    ],
    # 6. In-batch negatives: a batch of 128 random scenes out of 10,000 almost never holds
    #    a scene's twin, the negative that retrieval over a split must beat. Twins drawn
    #    into the same batch (data.group_size=2; the set stores them side by side).
    'twins': [
        ('f_group2', 600, {'data.group_size': 2}),
    ],
    # 7. At 600 steps no lever beat the demo by more than the seed-to-seed spread (the
    #    ablation's 3 seeds span 30 RSUM at 300 steps); twins in one batch at 600 steps:
    #    140.6 against 152.0. The full 1,500-step schedule, the demo against twin batches.
    'full': [
        ('F_demo', None, {}),
        ('F_group2', None, {'data.group_size': 2}),
    ],
}


def _set(config, key, value):
  node = config
  *parents, leaf = key.split('.')
  for part in parents:
    node = node[part]
  if leaf not in node:
    raise KeyError(f'{key!r} is not a config key of configs/base.py:demo.')
  node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value


def trial_config(steps, overrides, data_dir):
  from configs import base as base_configs  # pylint: disable=g-import-not-at-top
  config = base_configs.get_config('demo')
  demo_steps, demo_warmup = config.train.steps, config.optim.warmup_steps
  steps = steps or demo_steps
  config.train.steps = steps
  config.optim.warmup_steps = max(1, demo_warmup * steps // demo_steps)
  for key, value in overrides.items():
    _set(config, key, value)
  config.train.progress_bar = False
  config.train.log_every = max(1, min(50, steps // 10))
  config.eval.every = steps  # one validation, at the end
  config.eval.test_at_end = False  # the test split is never looked at while choosing
  config.checkpoint.every = 0
  config.checkpoint.keep = 1
  config.checkpoint.async_save = False
  if data_dir:
    config.data.data_dir = data_dir
  return config


def _child(args):
  """One trial, in this process: train, validate at the end, write the figures."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from absl import logging  # pylint: disable=g-import-not-at-top
  from cookie_jax import cli, train  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  logging.set_verbosity(logging.WARNING)
  config = trial_config(args.steps, json.loads(args.overrides), args.data_dir)
  train.train_and_evaluate(config, args.out)
  cli.exit_now(0)


def _figures(out):
  rows = [json.loads(l) for l in open(os.path.join(out, 'metrics.jsonl'), encoding='utf-8')]
  val = [r for r in rows if 'val/rsum' in r][-1]
  rates = [r['train/pairs_per_sec'] for r in rows if 'train/pairs_per_sec' in r][1:]
  with open(os.path.join(out, 'goodput.json'), encoding='utf-8') as f:
    goodput = json.load(f)
  return {'val': {k[4:]: v for k, v in val.items() if k.startswith('val/')},
          'pairs_per_sec': statistics.median(rates) if rates else None,
          'goodput_s': goodput['seconds']}


def run_trial(name, steps, overrides, args):
  out = os.path.join(args.workdir, name)
  done = os.path.join(out, 'trial.json')
  if os.path.exists(done):
    with open(done, encoding='utf-8') as f:
      return json.load(f)
  if os.path.exists(out):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(out)  # a trial that did not finish starts again
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)  # as README command 1: one CPU device
  load0 = os.getloadavg()
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  subprocess.run([sys.executable, os.path.abspath(__file__), '--child', '--out', out,
                  '--steps', str(steps or 0), '--overrides', json.dumps(overrides),
                  '--data_dir', args.data_dir], check=True, env=env)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
  result = {'name': name, 'steps': steps, 'overrides': overrides, 'wall_s': wall,
            'cpu_user_s': user, 'cpu_sys_s': system, 'cpu_s': user + system,
            'load_before': load0, 'load_after': os.getloadavg(), **_figures(out)}
  result['demo_cpu_s'] = result['cpu_s'] + args.build_cpu_s + args.eval_cpu_s
  with open(done, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  print(f"{name}: {result['steps']} steps, val RSUM {result['val']['rsum']:.1f}, "
        f"{wall:.0f} s wall, {result['cpu_s']:.0f} CPU-s "
        f"(demo {result['demo_cpu_s']:.0f} of {args.budget_cpu_s:.0f}), "
        f"{result['pairs_per_sec'] or 0:.0f} pairs/s, load {load0[0]:.1f}", flush=True)
  return result


def table(results) -> str:
  lines = ['| trial | overrides | steps | wall (s) | CPU-s | demo CPU-s | pairs/s | '
           'val RSUM |', '|---|---|---|---|---|---|---|---|']
  for r in results:
    over = ', '.join(f'{k}={v}' for k, v in r['overrides'].items()) or '(demo)'
    lines.append(f"| {r['name']} | {over} | {r['steps']} | {r['wall_s']:.0f} | "
                 f"{r['cpu_s']:.0f} | {r['demo_cpu_s']:.0f} | {r['pairs_per_sec'] or 0:.0f} | "
                 f"{r['val']['rsum']:.1f} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--stage', default='coarse')
  parser.add_argument('--trials', nargs='*', default=None, help='names within the stage')
  parser.add_argument('--workdir', default='/tmp/cookie_demo_recipe')
  parser.add_argument('--data_dir', default='', help="tfds data_dir; '' = tfds' default")
  parser.add_argument('--json', default='')
  parser.add_argument('--budget_cpu_s', type=float, default=240.0)
  parser.add_argument('--build_cpu_s', type=float, default=0.0,
                      help='CPU time of building the synthetic set (measured apart)')
  parser.add_argument('--eval_cpu_s', type=float, default=0.0,
                      help='CPU time of the test evaluation the trials leave out')
  # The child's flags.
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--out', help=argparse.SUPPRESS)
  parser.add_argument('--steps', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--overrides', default='{}', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args)
    return
  stage = STAGES[args.stage]
  chosen = [t for t in stage if args.trials is None or t[0] in args.trials]
  results = [run_trial(name, steps, over, args) for name, steps, over in chosen]
  print(table(results))
  if args.json:
    previous = []
    if os.path.exists(args.json):
      with open(args.json, encoding='utf-8') as f:
        previous = json.load(f)['trials']
    names = {r['name'] for r in results}
    merged = [r for r in previous if r['name'] not in names] + results
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'budget_cpu_s': args.budget_cpu_s, 'trials': merged}, f, indent=1)


if __name__ == '__main__':
  main()
