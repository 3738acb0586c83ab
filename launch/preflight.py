r"""Checks a run's config against the machines it will run on, here, before launching.

  python launch/preflight.py --config=configs/base.py:base --accelerator_type=v5p-32 \
      [--slices=N] [--config.KEY=VALUE ...]        # a TPU slice (launch/tpu_pod.py runs this)
  python launch/preflight.py --config=configs/base.py:base --num_devices=32 \
      [--config.KEY=VALUE ...]                      # e.g. SLURM: nodes x GPUs per node

The config is built exactly as launch/train.py builds it (the same flags, the same
overrides), then checked as training checks it before reading any file (see
cookie_jax/preflight.py): a mistake ends in the same one line, in seconds, with exit 1
(2 for a bad command line). Paths the workers read are not opened. Runs on any host:
only this host's CPU is used, and a TPU slice's topology comes from libtpu
(`pip install -e ".[tpu]"`; without it the mesh is checked against the chip count).
"""

import os
import sys

# This host's own accelerators are not used, and TF stays quiet.
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

try:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
except ImportError as missing:
  print(f'error: the pre-flight check runs this project here and needs its requirements '
        f'({missing}): pip install -r requirements.txt -e ".[tpu]"', file=sys.stderr)
  sys.exit(2)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/base.py:base.',
                                lock_config=True)
flags.DEFINE_string('accelerator_type', '', 'The TPU slice, e.g. v5p-32 or v6e-16.')
flags.DEFINE_integer('slices', 1, 'TPU slices joined over the data-centre network '
                     '(config.mesh.dcn_data must match).')
flags.DEFINE_integer('num_devices', 0, 'Without --accelerator_type: the run\'s device '
                     'count, e.g. GPUs per node x nodes.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.accelerator_type:
    # Without a TPU here, libtpu would warn on stderr that it cannot find one; describe
    # the named slice as if on its first worker instead.
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', FLAGS.accelerator_type)
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  from cookie_jax import cli, preflight  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  lines = cli.run_or_exit(lambda: preflight.check(
      FLAGS.config, FLAGS.accelerator_type, FLAGS.slices, FLAGS.num_devices or None))
  for line in lines:
    print(f'pre-flight: {line}')
  print('pre-flight: the config is valid for this slice.' if FLAGS.accelerator_type else
        'pre-flight: the config is valid for this device count.', flush=True)


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
