r"""Trains COOKIE: `python launch/train.py --config=configs/base.py:demo --workdir=DIR`.

Override any config key on the command line, e.g. `--config.train.steps=500`. Re-running
the same command resumes from the latest checkpoint in DIR.
"""

import os
import sys

# TensorFlow (input pipeline only) must never take an accelerator from JAX.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/base.py:demo.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and results are written '
                    '(a local path or any path orbax and tfds accept, e.g. gs://...).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cookie_jax import cli, distributed, train  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  distributed.initialize()
  cli.run_or_exit(lambda: train.train_and_evaluate(FLAGS.config, FLAGS.workdir))


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
