r"""Evaluates a checkpoint: `python launch/eval.py --workdir=DIR [--step=N] [--split=test]`.

Writes DIR/eval/retrieval-<split>-<layout>-<step>.json (every retrieval metric and the
Recall@K curve), and beside it ...-recall.png and ...-examples.png. The config
saved with the checkpoint is used unless --config is given (then `--config.*` overrides
work too). See cookie_jax/evaluate_run.py.
"""

import os
import sys

# TensorFlow (input pipeline only) must never take an accelerator from JAX.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Optional config file, e.g. '
                                'configs/base.py:demo; default: the checkpoint\'s own.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'The workdir of a training run (holding checkpoints/).')
flags.DEFINE_integer('step', -1, 'Which checkpoint step to evaluate; -1 = the latest.')
flags.DEFINE_string('split', 'test', "'val', 'test' (config.data.val_split / test_split) "
                    'or any tfds split of the dataset.')
flags.DEFINE_enum('layout', 'full', ['full', 'coco1k', 'msrvtt1k'],
                  "'full' ranks against the whole split; 'coco1k' averages over 5 folds "
                  "(COCO 1K); 'msrvtt1k': MSRVTT's 1k-A test, one caption per video "
                  "(--split=test of builder msrvtt).")
flags.DEFINE_bool('pictures', True, 'Also draw the example and Recall@K PNGs.')
flags.DEFINE_bool('progress', True, 'Show a progress bar while encoding.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cookie_jax import cli, distributed, evaluate_run  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  distributed.initialize()
  step = None if FLAGS.step < 0 else FLAGS.step
  result = cli.run_or_exit(lambda: evaluate_run.evaluate_checkpoint(
      FLAGS.config, FLAGS.workdir, step=step, split=FLAGS.split, layout=FLAGS.layout,
      progress=FLAGS.progress, pictures=FLAGS.pictures))
  print(evaluate_run.summary(result))


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
