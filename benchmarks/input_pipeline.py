"""Pairs per second of the input pipeline alone (no model), as the training loop sees it:
the random-access pipeline (`new`: cookie_jax/data, tf.data threads) against the TFRecord +
shuffle-buffer pipeline it replaced (`old`: benchmarks/tfrecord_pipeline.py), and for
photos the same order and records decoded in 2 Grain worker processes with PIL (`grain`:
benchmarks/grain_pipeline.py), side by side in one run.

Two settings:

* `photo224`: 224 px random resized crop + flip from COCO-sized JPEGs (640x480, built as a
  Karpathy-format folder of generated photo-like images), BERT WordPiece tokenisation to
  64 tokens. This is the per-host cost of real pre-training.
* `demo32`: the embedded synthetic dataset at the demo size, 32 px and max_len 32, once
  with one view and once with the second augmented view of the visual loss.

Each run builds a fresh iterator, times its first batch (start-up: opening the dataset;
old: filling the shuffle buffer, new: for the demo, decoding the in-memory cache),
discards `--warmup*` more batches and times the next `--steps*`; the pipelines alternate
run by run, and figures are medians over `--runs`. "CPU ms / pair" is the CPU time of the
process (all threads) and of Grain's worker processes per pair while timed; "pairs /
CPU-s" is its inverse, pairs per second per core busy: what the pipeline costs the host
at any training rate.
Usage:

    python benchmarks/input_pipeline.py [--runs 5] [--workdir /tmp/cookie_jax_bench]
"""

import argparse
import io
import json
import os
import pathlib
import statistics
import time

import numpy as np
from PIL import Image
import psutil

# Before TF and JAX load: quiet TF, and keep JAX off any accelerator (this measures the host).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# pylint: disable=g-import-not-at-top,wrong-import-position
from cookie_jax.data import defaults, pipeline, sources
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.builders import scenes
import grain_pipeline
import tfrecord_pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position


def _photo(rng, height=480, width=640) -> bytes:
  """A JPEG with roughly a photo's size and entropy: smooth structure plus grain."""
  low = rng.integers(0, 256, (height // 32, width // 32, 3), np.uint8)
  img = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC),
                   np.float32)
  img += rng.normal(0, 10, img.shape)
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


def make_photo_folder(root: pathlib.Path, num_images: int) -> float:
  """A COCO Karpathy folder of generated photos; returns the mean JPEG size in KB."""
  json_path = root / 'dataset_coco.json'
  (root / 'train2014').mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  images, sizes = [], []
  for i in range(num_images):
    path = root / 'train2014' / f'{i:06d}.jpg'
    if not path.exists():
      path.write_bytes(_photo(rng))
    sizes.append(path.stat().st_size)
    caps = scenes.captions(scenes.sample_scene(0, 'train', i), 5,
                           np.random.default_rng(i))
    images.append({'filepath': 'train2014', 'filename': path.name, 'imgid': i,
                   'split': 'train', 'sentences': [{'raw': c} for c in caps]})
  if not json_path.exists():
    json_path.write_text(json.dumps({'images': images, 'dataset': 'coco'}))
  vocab = root / 'vocab.txt'
  if not vocab.exists():
    texts = [s['raw'] for im in images for s in im['sentences']]
    vocab.write_text('\n'.join(tok_lib.train_wordpiece(texts, 1024)))
  return sum(sizes) / len(sizes) / 1024


PIPELINES = {'new': pipeline.TrainIterator, 'old': tfrecord_pipeline.TrainIterator,
             'grain': grain_pipeline.GrainIterator}


def _cpu_seconds() -> float:
  """CPU time of this process and its children (Grain's workers), all threads."""
  proc = psutil.Process()
  total = sum(proc.cpu_times()[:2])
  for child in proc.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


def measure(data_cfg, *, image_size, batch, steps, warmup, runs, second_view=False,
            pipelines=('new', 'old')):
  """{pipeline: (median pairs/s, all runs' pairs/s, s to the first batch, CPU ms / pair)},
  the pipelines alternating run by run."""
  out = {name: ([], [], []) for name in pipelines}
  for run in range(runs):
    for name in pipelines:
      cls = PIPELINES[name]
      rate, start, cpu = _run(cls, data_cfg, image_size=image_size, batch=batch,
                              steps=steps, warmup=warmup, seed=run, second_view=second_view)
      for values, value in zip(out[name], (rate, start, cpu)):
        values.append(value)
  return {name: (statistics.median(rates), rates, statistics.median(starts),
                 statistics.median(cpu)) for name, (rates, starts, cpu) in out.items()}


def _run(cls, data_cfg, *, image_size, batch, steps, warmup, seed, second_view):
  """(pairs/s, s to the first batch, CPU ms / pair) of one fresh iterator."""
  begin = time.perf_counter()
  it = cls(data_cfg, image_size=image_size, global_batch_size=batch, seed=seed, mesh=None,
           second_view=second_view)
  next(it)
  start = time.perf_counter() - begin
  for _ in range(warmup):
    next(it)
  begin, cpu_begin = time.perf_counter(), _cpu_seconds()
  for _ in range(steps):
    next(it)
  rate = steps * batch / (time.perf_counter() - begin)
  cpu = (_cpu_seconds() - cpu_begin) * 1e3 / (steps * batch)
  del it  # stops Grain's workers before the next run
  return rate, start, cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/cookie_jax_bench')
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--photos', type=int, default=1024)
  parser.add_argument('--steps224', type=int, default=8)
  parser.add_argument('--batch224', type=int, default=128)
  parser.add_argument('--steps32', type=int, default=100)
  parser.add_argument('--batch32', type=int, default=64)
  parser.add_argument('--warmup224', type=int, default=2)
  parser.add_argument('--warmup32', type=int, default=160)
  args = parser.parse_args()
  work = pathlib.Path(args.workdir)

  photos = work / 'coco'
  kb = make_photo_folder(photos, args.photos)
  photo_cfg = defaults.data_config()
  photo_cfg.update(dict(builder='karpathy', manual_dir=str(photos), data_dir=str(work / 'tfds'),
                        tokenizer=str(photos / 'vocab.txt'), max_len=64,
                        crop_scale=(0.08, 1.0), flip=True))
  demo_cfg = defaults.data_config()
  demo_cfg.data_dir = str(work / 'tfds')
  for cfg in (photo_cfg, demo_cfg):  # build both formats outside the timing
    sources.get_builder(cfg)
    tfrecord_pipeline.legacy_builder(cfg)

  rows = [('photo224', f'640x480 JPEG (~{kb:.0f} KB) -> 224 px, crop (0.08, 1) + flip, '
           'max_len 64', photo_cfg, 224, args.batch224, args.warmup224, args.steps224,
           False, ('new', 'old', 'grain')),
          ('demo32', 'synthetic 64 px PNG -> 32 px, crop (0.8, 1), max_len 32',
           demo_cfg, 32, args.batch32, args.warmup32, args.steps32, False, ('new', 'old')),
          ('demo32+view2', 'as demo32, plus the second augmented view',
           demo_cfg, 32, args.batch32, args.warmup32, args.steps32, True, ('new', 'old'))]
  print(f'cpu cores: {os.cpu_count()}, runs: {args.runs}, '
        f'load average before: {os.getloadavg()[0]:.2f}')
  print('| setting | input | batch | pipeline | pairs/s (median) | runs | first batch (s) '
        '| CPU ms / pair | pairs / CPU-s | / old (pairs / CPU-s) |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for name, what, cfg, size, batch, warmup, steps, view2, pipelines in rows:
    result = measure(cfg, image_size=size, batch=batch, steps=steps, warmup=warmup,
                     runs=args.runs, second_view=view2, pipelines=pipelines)
    per_cpu = {p: 1e3 / r[3] for p, r in result.items()}
    for p, (median, rates, start, cpu) in result.items():
      ratio = f'{per_cpu[p] / per_cpu["old"]:.2f}' if p != 'old' else ''
      print(f'| {name} | {what} | {batch} | {p} | {median:,.0f} | '
            f'{", ".join(f"{r:,.0f}" for r in rates)} | {start:.1f} | {cpu:.2f} | '
            f'{per_cpu[p]:,.0f} | {ratio} |', flush=True)
  print(f'load average after: {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
