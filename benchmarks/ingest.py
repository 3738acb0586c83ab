"""Images per second (and per core) of the img2dataset builder's local build.

Writes a folder of generated photo-like 640x480 JPEGs (smooth structure plus grain, about
the size and entropy of a web photo) as img2dataset output, in both webdataset (tar) and
parquet form, then times complete builds (`img2dataset.prepare` into a fresh data_dir:
listing, reading, decode, EXIF, resize to max_side 384, JPEG q95, tfds' ArrayRecord
writing) with 1 and 2 worker processes, and, for contrast, 2 threads instead of processes
and (where apache-beam is installed) Beam's DirectRunner with 2 processes. The variants
of one run are interleaved, so a shared machine's load falls on all of them alike;
figures are medians over `--runs`. "CPU ms / image" is the CPU time of this process and
its finished children (the workers) per image, and "of it, main process" the part spent
in this process (tfds' serialising and writing, and everything when there are no worker
processes): the serial part, which bounds how far more workers can go. Usage:

    python benchmarks/ingest.py [--images 512] [--shards 8] [--runs 3] [--beam]
"""

import argparse
import concurrent.futures
import io
import json
import os
import pathlib
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Light (no TF) on purpose: the build's spawned workers import this script again as their
# __main__, as they would any caller's; tfds is imported inside build_once.
# pylint: disable=g-import-not-at-top,wrong-import-position
from cookie_jax.data import defaults
from cookie_jax.data.builders import webshards
# pylint: enable=g-import-not-at-top,wrong-import-position


def photo(rng, height=480, width=640) -> bytes:
  low = rng.integers(0, 256, (height // 32, width // 32, 3), np.uint8)
  img = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC),
                   np.float32)
  yy, xx = np.mgrid[0:height, 0:width]
  img += (40 * np.sin(xx / 37.0) * np.cos(yy / 23.0))[..., None]
  img += rng.normal(0, 10, img.shape)
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


def make_folders(root: pathlib.Path, images: int, shards: int) -> float:
  """root/tar and root/parquet with the same samples; returns the mean JPEG KB."""
  rng = np.random.default_rng(0)
  jpegs = [photo(rng) for _ in range(images)]
  per = -(-images // shards)
  (root / 'tar').mkdir(parents=True)
  (root / 'parquet').mkdir()
  for s in range(shards):
    rows = range(s * per, min(images, (s + 1) * per))
    keys = [f'{s:05d}{i:04d}' for i in rows]
    caps = [f'a generated photo number {i}' for i in rows]
    with tarfile.open(root / 'tar' / f'{s:05d}.tar', 'w') as tar:
      for key, i, cap in zip(keys, rows, caps):
        meta = json.dumps({'url': f'http://example/{key}.jpg', 'key': key}).encode()
        for name, data in ((f'{key}.jpg', jpegs[i]), (f'{key}.txt', cap.encode()),
                           (f'{key}.json', meta)):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({'key': keys, 'jpg': pa.array([jpegs[i] for i in rows],
                                                           pa.binary()),
                             'caption': caps}), root / 'parquet' / f'{s:05d}.parquet',
                   row_group_size=16)
  return sum(map(len, jpegs)) / len(jpegs) / 1024


def _thread_map(kind, shards, settings, split, workers):
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    yield from pool.map(
        lambda job: webshards.shard_examples(job[0], kind, job[1], settings, split),
        list(enumerate(shards)))


def _cpu() -> np.ndarray:
  """CPU seconds of (this process, its finished children)."""
  t = os.times()
  return np.array([t.user + t.system, t.children_user + t.children_system])


def build_once(folder, workdir, workers, mode) -> tuple[float, np.ndarray, int]:
  """(wall s, CPU s of (this process, workers), examples) of one complete build into a
  fresh data_dir."""
  from cookie_jax.data.builders import img2dataset  # pylint: disable=g-import-not-at-top
  cfg = defaults.data_config()
  cfg.update(dict(builder='img2dataset', manual_dir=str(folder)))
  cfg.img2dataset.workers = workers
  data_dir = tempfile.mkdtemp(dir=workdir)
  options, original = None, img2dataset._map_shards  # pylint: disable=protected-access
  if mode == 'threads':
    img2dataset._map_shards = _thread_map  # pylint: disable=protected-access
  if mode == 'beam':
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
    options = pipeline_options.PipelineOptions(
        ['--runner=DirectRunner', f'--direct_num_workers={workers}',
         '--direct_running_mode=multi_processing'])
  try:
    cpu, start = _cpu(), time.perf_counter()
    builder = img2dataset.prepare(cfg, data_dir, options)
    wall, cpu = time.perf_counter() - start, _cpu() - cpu
  finally:
    img2dataset._map_shards = original  # pylint: disable=protected-access
  n = builder.info.splits['train'].num_examples
  shutil.rmtree(data_dir)
  return wall, cpu, n


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=512)
  parser.add_argument('--shards', type=int, default=8)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--beam', action='store_true', help='also the Beam DirectRunner')
  parser.add_argument('--workdir', default='/tmp/cookie_jax_ingest')
  args = parser.parse_args()
  root = pathlib.Path(args.workdir)
  shutil.rmtree(root, ignore_errors=True)
  kb = make_folders(root / 'src', args.images, args.shards)
  print(f'{args.images} images of 640x480 ({kb:.0f} KB JPEG on average) in {args.shards} '
        f'shards; load average {os.getloadavg()}')
  variants = [('processes', 1), ('processes', 2), ('threads', 2)]
  if args.beam:
    variants.append(('beam', 2))
  results = {}
  for _ in range(args.runs):
    for fmt in ('tar', 'parquet'):
      for mode, workers in variants:
        wall, cpu, n = build_once(root / 'src' / fmt, root, workers, mode)
        assert n == args.images, (fmt, mode, n)
        results.setdefault((fmt, mode, workers), []).append((wall, cpu))
  print(f'load average after: {os.getloadavg()}')
  print('| shards | build | workers | wall s (median) | images/s | images/s per worker | '
        'CPU ms / image: all | of it, main process | images per CPU-second |')
  print('|---|---|---|---|---|---|---|---|---|')
  for (fmt, mode, workers), runs in results.items():
    wall = statistics.median(w for w, _ in runs)
    main_cpu = statistics.median(c[0] for _, c in runs)
    cpu = statistics.median(c.sum() for _, c in runs)
    rate = args.images / wall
    print(f'| {fmt} | {mode} | {workers} | {wall:.2f} | {rate:.1f} | {rate / workers:.1f} | '
          f'{1000 * cpu / args.images:.1f} | {1000 * main_cpu / args.images:.1f} | '
          f'{args.images / cpu:.0f} |')


if __name__ == '__main__':
  main()
