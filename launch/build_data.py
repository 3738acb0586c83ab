r"""Builds a run's dataset ahead of training, once, e.g. before a multi-host run.

  python launch/build_data.py --config=configs/base.py:base \
      --config.data.builder=img2dataset --config.data.manual_dir=gs://bucket/cc3m \
      --config.data.data_dir=gs://bucket/tfds \
      [--beam_pipeline_options=runner=DataflowRunner,project=P,region=R,...]

Without --beam_pipeline_options the build runs here, over config.data.img2dataset.workers
processes. The same --config flags as the training command name the same built copy.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/base.py:base.',
                                lock_config=True)
flags.DEFINE_string('beam_pipeline_options', '', 'Build on Apache Beam with these '
                    "comma-separated options, e.g. 'runner=DataflowRunner,project=P,...' "
                    '(needs pip install -e ".[beam]").')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  from cookie_jax.data import sources  # pylint: disable=g-import-not-at-top
  builder = cli.run_or_exit(
      lambda: sources.build(FLAGS.config.data, FLAGS.beam_pipeline_options))
  splits = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
  print(f'{builder.data_path}: {splits}, skipped {builder.info.metadata.get("skipped", {})}')


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cookie_jax.cli import parse_flags_or_exit  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags_or_exit)
