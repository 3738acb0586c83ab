r"""Evaluates a checkpoint: `python launch/eval.py --workdir=DIR [--step=N] [--split=test]`.

Writes DIR/eval/retrieval-<split>-<layout>-<step>.json (every retrieval metric and the
Recall@K curve), and beside it ...-recall.png and ...-examples.png. The config
saved with the checkpoint is used unless --config is given (then `--config.*` overrides
work too). See cookie_jax/eval_run.py.

`--task=zeroshot` classifies images by prompt ensembles instead: a tfds dataset with a
ClassLabel feature (`--dataset=NAME --split=... [--label_key=label]`), an ImageFolder
(`--image_folder=ROOT`), or, for a run on the synthetic shapes with no flag, the synthetic
zero-shot set. Writes DIR/eval/zeroshot-<set>-<split>-<step>.json and
...-confusions.png. See cookie_jax/eval/zeroshot_run.py.
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
flags.DEFINE_enum('task', 'retrieval', ['retrieval', 'zeroshot'],
                  "'retrieval' (image<->text on --split) or 'zeroshot' (classification by "
                  'prompt ensembles).')
flags.DEFINE_string('dataset', '', "--task=zeroshot: a prepared tfds dataset with a "
                    "ClassLabel feature, e.g. 'imagenet2012' (with --split=validation); "
                    "'' = the synthetic zero-shot set of a synthetic run.")
flags.DEFINE_string('image_folder', '', '--task=zeroshot: an ImageFolder root/<class>/<image> '
                    'instead of --dataset.')
flags.DEFINE_string('label_key', 'label', '--task=zeroshot: the ClassLabel feature of '
                    "--dataset (the synthetic set also has 'shape' and 'colour').")
flags.DEFINE_string('class_names', '', "--task=zeroshot: 'imagenet' or a file with one "
                    "class name per line; '' = the dataset's names (ImageNet's WordNet ids "
                    'become the shipped ImageNet names).')
flags.DEFINE_string('templates', '', "--task=zeroshot: 'clip' (CLIP's 80), 'single' ('{}'), "
                    "'synthetic' or a file with one template per line; '' = 'synthetic' for "
                    "the synthetic set, else 'clip'.")
flags.DEFINE_string('data_dir', '', '--task=zeroshot: where --dataset is prepared; '
                    "'' = the run's config.data.data_dir.")
flags.mark_flags_as_required(['workdir'])


def zeroshot(step):
  """launch/eval.py --task=zeroshot: cookie_jax.eval.zeroshot_run."""
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  from cookie_jax.eval import zeroshot_run  # pylint: disable=g-import-not-at-top
  split = '' if FLAGS['split'].using_default_value else FLAGS.split
  result = cli.run_or_exit(lambda: zeroshot_run.zeroshot_checkpoint(
      FLAGS.config, FLAGS.workdir, step=step, dataset=FLAGS.dataset,
      image_folder=FLAGS.image_folder, split=split, label_key=FLAGS.label_key,
      class_names=FLAGS.class_names, templates=FLAGS.templates, data_dir=FLAGS.data_dir,
      progress=FLAGS.progress, pictures=FLAGS.pictures))
  print(zeroshot_run.summary(result))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cookie_jax import cli, distributed  # pylint: disable=g-import-not-at-top
  from cookie_jax.eval import run as eval_run  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  distributed.initialize()
  step = None if FLAGS.step < 0 else FLAGS.step
  if FLAGS.task == 'zeroshot':
    zeroshot(step)
    return
  result = cli.run_or_exit(lambda: eval_run.evaluate_checkpoint(
      FLAGS.config, FLAGS.workdir, step=step, split=FLAGS.split, layout=FLAGS.layout,
      progress=FLAGS.progress, pictures=FLAGS.pictures))
  print(eval_run.summary(result))


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
