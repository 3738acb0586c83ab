"""`synthetic_video`: the embedded video-caption set, generated procedurally, no input files.

See `motion.py` for what the clips and captions contain. Like `synthetic_shapes`, the
builder config carries every size (a test builds a 64-clip version in a second), each
size set has its own folder, and a WordPiece vocabulary trained on the training captions
is stored in the dataset's metadata (`vocab`), which `pipeline.load_tokenizer` reads.

Each example holds `frames` (T PNG-encoded frames, a tfds Video feature), `captions`,
`image_id` (the clip's index, named like the image sets' id so the pipeline treats both
alike) and `kind` (the event).
"""

import dataclasses

import tensorflow_datasets as tfds

from cookie_jax.data import tf_env  # pylint: disable=unused-import  # hides GPUs before any TF op
from cookie_jax.data.builders import frames as frames_lib
from cookie_jax.data.builders import generated, motion
from cookie_jax.data.defaults import SYNTHETIC_VIDEO_SIZES


@dataclasses.dataclass(eq=False)
class SyntheticVideoConfig(tfds.core.BuilderConfig):
  # Defaults (and their meaning): data/defaults.py, SYNTHETIC_VIDEO_SIZES.
  train_clips: int = SYNTHETIC_VIDEO_SIZES['train_clips']
  train_captions: int = SYNTHETIC_VIDEO_SIZES['train_captions']
  eval_clips: int = SYNTHETIC_VIDEO_SIZES['eval_clips']
  eval_captions: int = SYNTHETIC_VIDEO_SIZES['eval_captions']
  frames: int = SYNTHETIC_VIDEO_SIZES['frames']
  image_size: int = SYNTHETIC_VIDEO_SIZES['image_size']
  seed: int = SYNTHETIC_VIDEO_SIZES['seed']
  vocab_size: int = SYNTHETIC_VIDEO_SIZES['vocab_size']


DEFAULT = SyntheticVideoConfig(name='default',
                               description='6k train clips x 3 captions, 1k+1k eval clips.')


def generate(cfg: SyntheticVideoConfig, split: str, count: int) -> list:
  """All clips of a split, in index order (about 10 ms each)."""
  k = cfg.train_captions if split == 'train' else cfg.eval_captions
  return motion.examples(cfg.seed, split, cfg.frames, cfg.image_size, k, 0, count)


class SyntheticVideo(generated.Generated, tfds.core.GeneratorBasedBuilder):
  """Shapes that move, appear, disappear or change colour, with captions that say so."""

  BUILDER_CONFIGS = [DEFAULT]
  generate = staticmethod(generate)

  @staticmethod
  def _counts(cfg):
    return cfg.train_clips, cfg.eval_clips

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=frames_lib.clip_features(
            cfg.frames, cfg.image_size, 'png',
            kind=tfds.features.ClassLabel(names=list(motion.KINDS))),
        # Filled while building: {'vocab': [tokens in id order]}.
        metadata=tfds.core.MetadataDict(),
        homepage='https://github.com/cookie-jax',
        # Stored in index order: record i is example i, twins side by side (group_size).
        disable_shuffling=True,
    )

  def _generate_examples(self, rows):
    for i, pngs, caps, kind in rows:
      yield i, {'frames': pngs, 'captions': caps, 'image_id': i, 'kind': kind}


def synthetic_video_config(**sizes) -> SyntheticVideoConfig:
  """The builder config for these sizes (keys of `SyntheticVideoConfig`; the rest
  default)."""
  return generated.sized_config(
      SyntheticVideo, DEFAULT,
      lambda c: (f'tr{c.train_clips}x{c.train_captions}_ev{c.eval_clips}x'
                 f'{c.eval_captions}_f{c.frames}_px{c.image_size}_s{c.seed}'
                 f'_v{c.vocab_size}'), **sizes)
