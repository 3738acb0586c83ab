"""`synthetic_shapes`: the embedded default dataset, generated procedurally, no input files.

See `scenes.py` for what the images and captions contain. The builder config carries
every size, so a test can build a 200-image version in `tmp_path` in a second, and two
configs never share a directory. The WordPiece vocabulary is trained on the training
captions while building and stored in the dataset's metadata (`metadata.json`), so the
dataset and its tokenizer can never drift apart.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from cookie_jax.data import tf_env  # pylint: disable=unused-import  # hides GPUs before any TF op
from cookie_jax.data.builders import generated, scenes
from cookie_jax.data.defaults import SYNTHETIC_SIZES


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  # Defaults (and their meaning): data/defaults.py, SYNTHETIC_SIZES.
  train_images: int = SYNTHETIC_SIZES['train_images']
  train_captions: int = SYNTHETIC_SIZES['train_captions']
  eval_images: int = SYNTHETIC_SIZES['eval_images']
  eval_captions: int = SYNTHETIC_SIZES['eval_captions']
  image_size: int = SYNTHETIC_SIZES['image_size']
  seed: int = SYNTHETIC_SIZES['seed']
  vocab_size: int = SYNTHETIC_SIZES['vocab_size']


DEFAULT = SyntheticConfig(name='default', description='30k train pairs, 1k+1k eval images.')


def generate(cfg: SyntheticConfig, split: str, count: int) -> list:
  """All examples of a split, in index order (about 2 ms each: 25 s for the default)."""
  k = cfg.train_captions if split == 'train' else cfg.eval_captions
  return scenes.examples(cfg.seed, split, cfg.image_size, k, 0, count)


class SyntheticShapes(generated.Generated, tfds.core.GeneratorBasedBuilder):
  """Coloured shapes in spatial relations, counts and positions, with varied captions."""

  BUILDER_CONFIGS = [DEFAULT]
  generate = staticmethod(generate)

  @staticmethod
  def _counts(cfg):
    return cfg.train_images, cfg.eval_images

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
            'captions': tfds.features.Sequence(tfds.features.Text()),
            'image_id': tfds.features.Scalar(dtype=np.int64),
            'kind': tfds.features.ClassLabel(names=['single', 'pair', 'count']),
            'num_objects': tfds.features.Scalar(dtype=np.int32),
        }),
        # Filled while building: {'vocab': [tokens in id order]}.
        metadata=tfds.core.MetadataDict(),
        homepage='https://github.com/cookie-jax',
        # Stored in index order: record i is example i, twins side by side (group_size).
        disable_shuffling=True,
    )

  def _generate_examples(self, rows):
    for i, png, caps, kind, num_objects in rows:
      yield i, {'image': png, 'captions': caps, 'image_id': i, 'kind': kind,
                'num_objects': num_objects}


def synthetic_config(**sizes) -> SyntheticConfig:
  """The builder config for these sizes (keys of `SyntheticConfig`; the rest default)."""
  return generated.sized_config(
      SyntheticShapes, DEFAULT,
      lambda c: (f'tr{c.train_images}x{c.train_captions}_ev{c.eval_images}x'
                 f'{c.eval_captions}_px{c.image_size}_s{c.seed}_v{c.vocab_size}'), **sizes)
