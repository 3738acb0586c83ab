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
from cookie_jax.data.tokenizer import train_wordpiece


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  train_images: int = 10_000
  train_captions: int = 3  # per training image: 30k pairs
  eval_images: int = 1000  # each of val and test
  eval_captions: int = 5
  image_size: int = 64  # stored size; the pipeline crops and resizes to the model's
  seed: int = 0
  vocab_size: int = 1024  # upper bound; the tiny text model has a 1024-token table


DEFAULT = SyntheticConfig(name='default', description='30k train pairs, 1k+1k eval images.')


def generate(cfg: SyntheticConfig, split: str, count: int) -> list:
  """All examples of a split, in index order (about 2 ms each: 25 s for the default)."""
  k = cfg.train_captions if split == 'train' else cfg.eval_captions
  return scenes.examples(cfg.seed, split, cfg.image_size, k, 0, count)


class SyntheticShapes(generated.Generated, tfds.core.GeneratorBasedBuilder):
  """Coloured shapes in spatial relations, counts and positions, with varied captions."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '1.1.0': 'Written as ArrayRecord, for random access by the training input; a '
               'deterministic WordPiece vocabulary (the same on every build). The '
               'examples are unchanged.',
  }
  BUILDER_CONFIGS = [DEFAULT]
  # tfds looks for a checksums file beside the code via `importlib_resources`, a package it
  # does not declare on Python >= 3.9; this builder downloads nothing, so skip the lookup.
  code_path = None

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
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: everything is generated
    cfg = self.builder_config
    data = {'train': generate(cfg, 'train', cfg.train_images),
            'val': generate(cfg, 'val', cfg.eval_images),
            'test': generate(cfg, 'test', cfg.eval_images)}
    train_text = (c for e in data['train'] for c in e[2])
    self.info.metadata['vocab'] = train_wordpiece(train_text, cfg.vocab_size)
    return {split: self._generate_examples(rows) for split, rows in data.items()}

  def _generate_examples(self, rows):
    for i, png, caps, kind, num_objects in rows:
      yield i, {'image': png, 'captions': caps, 'image_id': i, 'kind': kind,
                'num_objects': num_objects}


def synthetic_config(train_images=10_000, train_captions=3, eval_images=1000,
                     eval_captions=5, image_size=64, seed=0,
                     vocab_size=1024) -> SyntheticConfig:
  """The builder config for these sizes, named by them so each lives in its own folder."""
  kw = dict(train_images=train_images, train_captions=train_captions,
            eval_images=eval_images, eval_captions=eval_captions, image_size=image_size,
            seed=seed, vocab_size=vocab_size)
  if all(getattr(DEFAULT, k) == v for k, v in kw.items()):
    return DEFAULT
  name = (f'tr{train_images}x{train_captions}_ev{eval_images}x{eval_captions}'
          f'_px{image_size}_s{seed}_v{vocab_size}')
  # Registered with the class, so tfds treats it as a known config (no "custom data
  # configuration" warning on every open) and `tfds.builder('synthetic_shapes/<name>')`
  # finds it in this process.
  configs = SyntheticShapes.builder_configs
  if name not in configs:
    configs[name] = SyntheticConfig(name=name, description='custom sizes', **kw)
  return configs[name]
