r"""Throughput and per-device memory of the cost levers of issue 20, in one run: patch
dropout (FLIP, `model.vision.patch_dropout`) and a locked image tower (LiT,
`train.freeze=('vision',)`), against the same step with neither.

Each setting is our jitted train step on one device, state donated, on a fixed random
batch (the machinery of `benchmarks/train_throughput.py`). All settings are compiled and
warmed up first; then every run times `--steps` steps of each setting in turn, the order
rotated from run to run, so that a change in the machine's load hits all of them alike.
Reported: pairs/s medians (min–max), each setting's ratio to `pd0` within the same run
(median, min–max), and from XLA's memory analysis of the compiled step the per-device
temporaries and arguments (state + batch), with the optimiser state's bytes.

    python benchmarks/cost_levers.py                   # small, 224 px, cross-modal loss
    python benchmarks/cost_levers.py --recipe demo --settings pd0,pd0.5 --steps 20
        # the ablation's demo step: the step-time ratio behind its equal-wall-time row
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import base as base_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from cookie_jax.config import default_config, validate_config  # pylint: disable=g-import-not-at-top,wrong-import-position

# setting -> (patch dropout, train.freeze)
SETTINGS = {'pd0': (0.0, ()), 'pd0.5': (0.5, ()), 'pd0.75': (0.75, ()),
            'frozen_image': (0.0, ('vision',))}
MIB = 2**20


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--settings', default=','.join(SETTINGS), help='comma-separated, of '
                 f'{list(SETTINGS)}; the first is the reference of the ratios')
  p.add_argument('--recipe', default='', help='a configs/base.py variant (e.g. demo) '
                 'taken as it is, instead of --preset')
  p.add_argument('--preset', default='small')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--text_len', type=int, default=32)
  p.add_argument('--runs', type=int, default=3)
  p.add_argument('--steps', type=int, default=2, help='timed steps per setting and run')
  p.add_argument('--json', default='')
  return p.parse_args()


def lever_config(args, name: str):
  if args.recipe:
    config = base_configs.get_config(args.recipe)
  else:  # the preset with the cross-modal term alone (no second view, no second pass)
    config = default_config(args.preset)
    config.model.vision.image_size = args.image_size
    config.data.max_len = args.text_len
    config.train.batch_size = args.batch_size
  config.model.vision.patch_dropout, config.train.freeze = SETTINGS[name]
  config.optim.schedule = 'constant'
  config.optim.warmup_steps = 0
  config.mesh.data = 1
  return validate_config(config, num_devices=1)


def memory(trainer) -> dict:
  mem = trainer.step_fn.memory_analysis()
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  return {'temp': mem.temp_size_in_bytes, 'arguments': mem.argument_size_in_bytes,
          'params': nbytes(trainer.state.params),
          'opt_state': nbytes(trainer.state.opt_state)}


def main():
  args = parse_args()
  names = args.settings.split(',')
  env = tt.environment('cpu')
  print(json.dumps(env), flush=True)
  trainers, out = {}, {}
  for name in names:
    config = lever_config(args, name)
    trainer = tt.JaxTrainer(config, tt.random_batch(config))
    for _ in range(2):  # warm-up
      trainer.step()
    trainer.sync()
    trainers[name] = trainer
    out[name] = {'compile_s': trainer.compile_s, 'memory': memory(trainer),
                 'batch_size': config.train.batch_size}
    print(f'{name}: compiled in {trainer.compile_s:.0f} s; {out[name]["memory"]}', flush=True)
  pairs = {name: [] for name in names}
  cpu_ms = {name: [] for name in names}
  for run in range(args.runs):
    for name in names[run % len(names):] + names[:run % len(names)]:
      wall, cpu = tt.timed(trainers[name], args.steps)
      pairs[name].append(args.steps * out[name]['batch_size'] / wall)
      cpu_ms[name].append(1e3 * cpu / args.steps)
    print(f'run {run + 1}: ' + ', '.join(f'{n} {pairs[n][-1]:.2f}' for n in names)
          + ' pairs/s', flush=True)
  ref = names[0]
  for name in names:
    out[name]['pairs_per_sec'] = tt.summary(pairs[name])
    out[name]['ratio'] = tt.summary([x / y for x, y in zip(pairs[name], pairs[ref])])
    out[name]['cpu_ms_per_step'] = tt.summary(cpu_ms[name])
    # The same ratio in CPU time (all threads): what other jobs on the machine change least.
    out[name]['cpu_ratio'] = tt.summary([y / x for x, y in zip(cpu_ms[name], cpu_ms[ref])])
  env['loadavg_end'] = os.getloadavg()
  print(f'\n| setting | pairs/s | / {ref} (same run) | CPU ms/step | / {ref} in CPU time '
        '| temporaries MiB | arguments MiB (state + batch) | optimiser state MiB | compile s '
        '|\n|---|---|---|---|---|---|---|---|---|')
  for name in names:
    r, m = out[name], out[name]['memory']
    print(f"| {name} | {tt.fmt(r['pairs_per_sec'])} | {tt.fmt(r['ratio'], 2)} "
          f"| {tt.fmt(r['cpu_ms_per_step'], 0)} | {tt.fmt(r['cpu_ratio'], 2)} "
          f"| {m['temp'] / MIB:.1f} | {m['arguments'] / MIB:.1f} "
          f"| {m['opt_state'] / MIB:.1f} | {r['compile_s']:.0f} |")
  print(f"load average {env['loadavg_start']} -> {env['loadavg_end']}; runs {args.runs} x "
        f'{args.steps} steps per setting; medians (min-max)')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'environment': env, 'args': vars(args), 'results': out}, f, indent=1)


if __name__ == '__main__':
  main()
