r"""Compiles a recipe's train step, and its evaluation encoders, for a TPU slice on this
host (no TPU needed) and says whether they fit, what the step's collectives are and how
fast the TPU compiler expects them to run:

    python launch/compile.py --config=configs/base.py:base --topology=v5p-32 \
        [--slices=N] [--json=PATH] [--nofit_batch] [--noeval] [--save=PATH] \
        [--config.KEY=VALUE ...]

--noeval leaves the image and text encoders of evaluation out; --save=PATH writes the
compiled train step to PATH (local or gs://) and its metadata to PATH.json, which a run
on that slice loads with --config.train.compiled=PATH instead of compiling.

Needs libtpu (`pip install -e ".[tpu]"`). Speed figures are the TPU compiler's
estimates (its cost model), not measurements; see cookie_jax/tpu_compile.py.
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the slice's devices come from libtpu

from absl import flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/base.py:base.',
                                lock_config=True)
flags.DEFINE_string('topology', None, 'The TPU slice, as gcloud names it: v5p-32, '
                    'v5e-256, v6e-16, ...')
flags.DEFINE_integer('slices', 1, 'Number of such slices (multislice; set '
                     '--config.mesh.dcn_data to the same number).')
flags.DEFINE_string('json', '', 'Also write the report as JSON here.')
flags.DEFINE_bool('fit_batch', True, 'Also find the largest batch that fits (2-3 more '
                  'compiles).')
flags.DEFINE_bool('eval', True, 'Also compile evaluation\'s image and text encoders at '
                  'config.eval.batch_size (one compile each).')
flags.DEFINE_string('save', '', 'Write the compiled train step here and its metadata to '
                    'PATH.json, for --config.train.compiled=PATH on that slice.')
flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  del argv
  from cookie_jax import cli, tpu_compile  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()

  def run():
    report = tpu_compile.compile_for_slice(FLAGS.config, FLAGS.topology,
                                           slices=FLAGS.slices, fit_batch=FLAGS.fit_batch,
                                           eval_encoders=FLAGS.eval, save=FLAGS.save)
    print(tpu_compile.table(report))
    if FLAGS.json:
      from etils import epath  # pylint: disable=g-import-not-at-top
      epath.Path(FLAGS.json).write_text(json.dumps(report, indent=1, default=str))
    logging.info('done')
  cli.run_or_exit(run)


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
