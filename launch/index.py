r"""Index a folder of your own images and search it by text.

  python launch/index.py build --workdir=RUN [--step=N] --images=FOLDER --index=OUT
  python launch/index.py build --export=EXPORT_DIR --tfds=NAME --split=test --index=OUT
  python launch/index.py query --index=OUT "a red circle left of a blue square" [...]
  python launch/index.py query --index=OUT --queries_file=QUERIES.txt --k=10

`build` encodes every jpg/jpeg/png/webp under FOLDER (recursively) or a tfds split with a
training run's checkpoint (--workdir) or an export folder (--export), in chunks that a
re-run resumes; unreadable files are skipped and named. `query` prints each query's top-k
paths and scores and writes a PNG grid (--picture, default OUT/query-<the first query>.png,
so that each query keeps its picture). See
cookie_jax/eval/index.py.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('index', None, 'The index folder (written by build, read by query).')
flags.DEFINE_string('workdir', '', 'build: the workdir of a training run whose checkpoint '
                    'encodes; query: default, the model that built the index.')
flags.DEFINE_integer('step', -1, 'With --workdir: the checkpoint step; -1 = the latest.')
flags.DEFINE_string('export', '', 'Instead of --workdir: a folder written by '
                    'launch/export_torch.py.')
flags.DEFINE_string('images', '', 'build: the folder of images (searched recursively).')
flags.DEFINE_string('tfds', '', 'build: instead of --images, a prepared tfds dataset.')
flags.DEFINE_string('split', 'test', 'build --tfds: the split.')
flags.DEFINE_string('data_dir', '', "build --tfds: where it is prepared ('' = tfds' default).")
flags.DEFINE_string('image_key', '', "build --tfds: the Image feature ('' = the first).")
flags.DEFINE_integer('chunk_size', 4096, 'build: images per chunk written to disk (a crash '
                     'loses at most one).')
flags.DEFINE_integer('batch_size', 0, "build: images per encoder batch; 0 = the run's "
                     'eval.batch_size (256 for an export).')
flags.DEFINE_bool('progress', True, 'build: show a progress bar.')
flags.DEFINE_string('queries_file', '', 'query: a text file with one query per line.')
flags.DEFINE_integer('k', 5, 'query: results per query.')
flags.DEFINE_string('picture', '', "query: the PNG grid to write ('' = INDEX/query-<the "
                    "first query, as a slug>[-and-N-more].png; 'none' = no picture).")
flags.DEFINE_enum('search', 'auto', ['auto', 'faiss', 'jax'], 'query: faiss (if built with '
                  'faiss-cpu installed) or exact search in JAX; auto = faiss when there.')
flags.mark_flags_as_required(['index'])


def build():
  from cookie_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from cookie_jax.eval import encoder, index  # pylint: disable=g-import-not-at-top
  if bool(FLAGS.images) == bool(FLAGS.tfds):
    raise ConfigError('build needs exactly one of --images=FOLDER and --tfds=NAME.')
  if bool(FLAGS.workdir) == bool(FLAGS.export):
    raise ConfigError('build needs exactly one of --workdir=RUN and --export=DIR.')
  batch = FLAGS.batch_size or None
  enc = (encoder.from_export(FLAGS.export, batch_size=batch or encoder.DEFAULT_BATCH_SIZE)
         if FLAGS.export else encoder.from_run(
             FLAGS.workdir, step=None if FLAGS.step < 0 else FLAGS.step, batch_size=batch))
  source = (index.folder_source(FLAGS.images) if FLAGS.images else
            index.tfds_source(FLAGS.tfds, FLAGS.split, FLAGS.data_dir, FLAGS.image_key))
  manifest = index.build_index(enc, source, FLAGS.index, chunk_size=FLAGS.chunk_size,
                               progress=FLAGS.progress)
  rate = manifest.get('last_build_images_per_s')
  print(f"Indexed {manifest['num_indexed']} of {manifest['num_images']} images into "
        f"{FLAGS.index}" + (f' ({rate} images/s)' if rate else '') +
        (' with a faiss index' if manifest['faiss'] else '') + '.')
  if manifest['num_skipped']:
    print(f"Skipped {manifest['num_skipped']} unreadable images; they are named in "
          f"{os.path.join(FLAGS.index, index.SKIPPED)}.")


def query(texts):
  from cookie_jax.eval import index  # pylint: disable=g-import-not-at-top
  if FLAGS.queries_file:
    with open(FLAGS.queries_file, encoding='utf-8') as f:
      texts = list(texts) + f.read().splitlines()
  picture = '' if FLAGS.picture == 'none' else (
      FLAGS.picture or index.picture_path(FLAGS.index, texts))
  results = index.query_index(FLAGS.index, texts, k=FLAGS.k, backend=FLAGS.search,
                              picture=picture, workdir=FLAGS.workdir,
                              step=None if FLAGS.step < 0 else FLAGS.step, export=FLAGS.export)
  for r in results:
    print(f"query: {r['query']}")
    for rank, (key, score) in enumerate(r['results'], start=1):
      print(f'  {rank:2d}. {score:+.4f}  {key}')
  if picture:
    print(f'wrote {picture}')


def main(argv):
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) < 2 or argv[1] not in ('build', 'query'):
    raise app.UsageError('Give a command: build or query (see --help).')
  if argv[1] == 'build' and len(argv) > 2:
    raise app.UsageError(f'build takes no arguments besides flags; got {argv[2:]}')
  cli.quiet_library_logs()
  cli.run_or_exit(build if argv[1] == 'build' else lambda: query(argv[2:]))


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cookie_jax.cli import parse_flags_or_exit  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags_or_exit)
