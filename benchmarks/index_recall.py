"""The image index (`cookie_jax/eval/index.py`) over the synthetic test images of a run:
its text->image top-5 share against `launch/eval.py`'s t2i R@5, and its build throughput.

1. Writes the run's synthetic test split (config.data, split 'test') into a folder as the
   PNG files it is stored as, in split order (img_0000.png, ...).
2. Evaluates the checkpoint as `launch/eval.py --workdir=RUN --nopictures` does
   (`eval_run.evaluate_checkpoint`) and reads its t2i_r5.
3. Builds the index of the folder `--builds` times into fresh folders (the first build
   includes compiling the encoder; the rest reuse it) and reports each build's images/s:
   listing, PIL decode, eval view, sharded encode, chunk writes and consolidation (+ the
   faiss index when faiss-cpu is installed).
4. Encodes every caption of the split, searches the index for its top 5 (faiss and exact
   JAX), and reports the share of captions whose image is among them, beside t2i R@5,
   and how many captions have a tie at the rank that decides (a score equal to their
   image's), where the two tie rules (eval: pessimistic; index: by index order) could
   differ.

    python benchmarks/index_recall.py --workdir=/work/runs/demo [--builds 3] [--json out]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--builds', type=int, default=3)
  p.add_argument('--chunk-size', type=int, default=4096)
  p.add_argument('--folder', default='', help="where to write the PNGs ('' = a temp dir)")
  p.add_argument('--json', default='')
  return p.parse_args()


def write_pictures(config, folder) -> list[str]:
  from cookie_jax.data import sources  # pylint: disable=g-import-not-at-top
  builder = sources.get_builder(config.data)
  records = sources.read(builder, sources.resolve_split(config.data, 'test'),
                         sources.feature_keys(config.data))
  os.makedirs(folder, exist_ok=True)
  keys = []
  for i, ex in enumerate(records.as_numpy_iterator()):
    keys.append(f'img_{i:04d}.png')
    with open(os.path.join(folder, keys[-1]), 'wb') as f:
      f.write(ex['image'])
  return keys


def main():
  args = _args()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cookie_jax.eval import run as eval_run  # pylint: disable=g-import-not-at-top
  from cookie_jax.eval import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  from cookie_jax.eval import index as index_lib  # pylint: disable=g-import-not-at-top
  from cookie_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  enc = encoder_lib.from_run(args.workdir)
  tmp = tempfile.mkdtemp(prefix='index_recall_')
  folder = args.folder or os.path.join(tmp, 'pictures')
  keys = write_pictures(enc.config, folder)
  evaluation = eval_run.evaluate_checkpoint(None, args.workdir, progress=False,
                                                pictures=False)
  data = pipeline.eval_data(enc.config.data, 'test', image_size=enc.image_size,
                            batch_size=enc.batch_size)

  rates, load = [], []
  for b in range(args.builds):
    load.append(os.getloadavg()[0])
    start = time.perf_counter()
    manifest = index_lib.build_index(enc, index_lib.folder_source(folder),
                                     os.path.join(tmp, f'index{b}'),
                                     chunk_size=args.chunk_size, progress=False)
    rates.append(len(keys) / (time.perf_counter() - start))
    print(f'build {b}: {rates[-1]:.1f} images/s (load {load[-1]:.1f})', flush=True)
  index = index_lib.Index.load(os.path.join(tmp, f'index{args.builds - 1}'))
  image_of = np.asarray([keys.index(k) for k in index.keys])
  texts = enc.encode_texts(data.captions)
  truth = np.asarray(data.caption_image_index)
  shares = {}
  for backend in ('jax', 'faiss') if manifest['faiss'] else ('jax',):
    _, rows = index.search(texts, 5, backend=backend, mesh=enc.mesh)
    shares[backend] = float(100 * np.mean(np.any(image_of[rows] == truth[:, None], axis=1)))
  scores = texts @ index.embeddings.T
  own = scores[np.arange(len(truth)), np.argsort(image_of)[truth]]
  ties = int(np.sum(np.sum(scores == own[:, None], axis=1) > 1))
  result = dict(
      workdir=args.workdir, step=evaluation['step'], num_images=len(keys),
      num_captions=len(data.captions), t2i_r5_eval=evaluation['t2i_r5'],
      top5_share=shares, captions_with_a_tie=ties, builds_images_per_s=rates,
      warm_median_images_per_s=statistics.median(rates[1:] or rates),
      cold_images_per_s=rates[0], load_average=load, devices=len(enc.mesh.devices.flat),
      batch_size=enc.batch_size, chunk_size=args.chunk_size,
      cpu=platform.processor() or platform.machine(), nproc=os.cpu_count())
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
