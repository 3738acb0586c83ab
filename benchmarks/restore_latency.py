"""Time to the first batch after a restore at step 0, 10^4 and 10^6: the random-access
pipeline (`new`) against the TFRecord pipeline it replaced (`old`, which skips up to an
epoch of records to get back to its position), in one run.

The dataset: N = 100,003 records (a prime, so that no restore point falls on an epoch
boundary by luck), each a small JPEG and a caption, written once as ArrayRecord (new)
and once as TFRecord (old). At batch 256, step 10^6 is position 2.56e8: 2,560 epochs in.
Each figure is the median over `--runs` fresh iterators of the seconds from building the
iterator at the step to holding its first batch; one iterator per pipeline runs first
and is not counted (tracing, the file cache), and the steps take turns run by run.
Usage:

    python benchmarks/restore_latency.py [--runs 3] [--workdir /tmp/cookie_jax_restore]
"""

import argparse
import io
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds

from cookie_jax.data import defaults, pipeline, sources
from cookie_jax.data import tokenizer as tok_lib
import tfrecord_pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position

RECORDS = 100_003
STEPS = (0, 10**4, 10**6)


class RestoreBench(tfds.core.GeneratorBasedBuilder):
  """RECORDS small JPEGs (256 distinct ones, cycled), caption 'picture <i mod 1000>'."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'captions': tfds.features.Sequence(tfds.features.Text())}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(256):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(buf, 'JPEG')
      jpegs.append(buf.getvalue())
    for i in range(RECORDS):
      yield i, {'image': jpegs[i % 256], 'captions': [f'picture {i % 1000}']}


def prepare(work: str) -> defaults.ml_collections.ConfigDict:
  for data_dir, file_format in ((f'{work}/tfds', 'array_record'),
                                (f'{work}/tfds/tfrecord', 'tfrecord')):
    RestoreBench(data_dir=data_dir).download_and_prepare(file_format=file_format)
  vocab = f'{work}/vocab.txt'
  with open(vocab, 'w', encoding='utf-8') as f:
    f.write('\n'.join(list(tok_lib.SPECIAL_TOKENS) + ['picture'] + [str(d) for d in range(10)]
                      + [f'##{d}' for d in range(10)]))
  cfg = defaults.data_config()
  cfg.update(dict(builder='tfds', tfds_name='restore_bench', tfds_text_key='captions',
                  data_dir=f'{work}/tfds', tokenizer=vocab, max_len=8))
  return cfg


def first_batch_seconds(cls, cfg, step, batch, seed):
  begin = time.perf_counter()
  it = cls(cfg, image_size=32, global_batch_size=batch, seed=seed, mesh=None,
           start_step=step)
  next(it)
  return time.perf_counter() - begin


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/cookie_jax_restore')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--batch', type=int, default=256)
  args = parser.parse_args()
  cfg = prepare(args.workdir)
  print(f'cpu cores: {os.cpu_count()}, records: {RECORDS:,}, batch: {args.batch}, '
        f'runs: {args.runs}, load average before: {os.getloadavg()[0]:.2f}')
  print('| pipeline | ' + ' | '.join(f'step {s:,} (epoch {s * args.batch // RECORDS:,})'
                                      for s in STEPS) + ' | max / min |')
  print('|---|' + '---|' * (len(STEPS) + 1))
  for name, cls in (('new (random access)', pipeline.TrainIterator),
                    ('old (TFRecord, skip)', tfrecord_pipeline.TrainIterator)):
    first_batch_seconds(cls, cfg, 0, args.batch, 0)  # one-off costs: tracing, file cache
    times = {step: [] for step in STEPS}
    for seed in range(args.runs):  # the steps interleaved, so that load drift is shared
      for step in STEPS:
        times[step].append(first_batch_seconds(cls, cfg, step, args.batch, seed))
    medians = [statistics.median(times[step]) for step in STEPS]
    for step in STEPS:
      print(f'  {name} step {step}: {", ".join(f"{t:.2f}" for t in times[step])} s',
            file=sys.stderr, flush=True)
    print(f'| {name} | ' + ' | '.join(f'{m:.2f} s' for m in medians)
          + f' | {max(medians) / min(medians):.2f} |', flush=True)
  print(f'load average after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
