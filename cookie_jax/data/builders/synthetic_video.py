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

import numpy as np
import tensorflow_datasets as tfds

from cookie_jax.data import tf_env  # pylint: disable=unused-import  # hides GPUs before any TF op
from cookie_jax.data.builders import generated, motion
from cookie_jax.data.tokenizer import train_wordpiece


@dataclasses.dataclass(eq=False)
class SyntheticVideoConfig(tfds.core.BuilderConfig):
  train_clips: int = 6000
  train_captions: int = 3
  eval_clips: int = 1000  # each of val and test
  eval_captions: int = 5
  frames: int = 4
  image_size: int = 32
  seed: int = 0
  vocab_size: int = 512


DEFAULT = SyntheticVideoConfig(name='default',
                               description='6k train clips x 3 captions, 1k+1k eval clips.')


def generate(cfg: SyntheticVideoConfig, split: str, count: int) -> list:
  """All clips of a split, in index order (about 10 ms each)."""
  k = cfg.train_captions if split == 'train' else cfg.eval_captions
  return motion.examples(cfg.seed, split, cfg.frames, cfg.image_size, k, 0, count)


class SyntheticVideo(generated.Generated, tfds.core.GeneratorBasedBuilder):
  """Shapes that move, appear, disappear or change colour, with captions that say so."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '1.1.0': 'Written as ArrayRecord, for random access by the training input; a '
               'deterministic WordPiece vocabulary (the same on every build). The '
               'examples are unchanged.',
  }
  BUILDER_CONFIGS = [DEFAULT]
  code_path = None  # see SyntheticShapes: no checksums lookup, nothing is downloaded

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'frames': tfds.features.Video(
                shape=(cfg.frames, cfg.image_size, cfg.image_size, 3),
                encoding_format='png'),
            'captions': tfds.features.Sequence(tfds.features.Text()),
            'image_id': tfds.features.Scalar(dtype=np.int64),
            'kind': tfds.features.ClassLabel(names=list(motion.KINDS)),
        }),
        # Filled while building: {'vocab': [tokens in id order]}.
        metadata=tfds.core.MetadataDict(),
        homepage='https://github.com/cookie-jax',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: everything is generated
    cfg = self.builder_config
    data = {'train': generate(cfg, 'train', cfg.train_clips),
            'val': generate(cfg, 'val', cfg.eval_clips),
            'test': generate(cfg, 'test', cfg.eval_clips)}
    self.info.metadata['vocab'] = train_wordpiece(
        (c for row in data['train'] for c in row[2]), cfg.vocab_size)
    return {split: self._generate_examples(rows) for split, rows in data.items()}

  def _generate_examples(self, rows):
    for i, pngs, caps, kind in rows:
      yield i, {'frames': pngs, 'captions': caps, 'image_id': i, 'kind': kind}


def synthetic_video_config(train_clips=6000, train_captions=3, eval_clips=1000,
                           eval_captions=5, frames=4, image_size=32, seed=0,
                           vocab_size=512) -> SyntheticVideoConfig:
  """The builder config for these sizes, named by them so each lives in its own folder."""
  kw = dict(train_clips=train_clips, train_captions=train_captions, eval_clips=eval_clips,
            eval_captions=eval_captions, frames=frames, image_size=image_size, seed=seed,
            vocab_size=vocab_size)
  if all(getattr(DEFAULT, k) == v for k, v in kw.items()):
    return DEFAULT
  name = (f'tr{train_clips}x{train_captions}_ev{eval_clips}x{eval_captions}'
          f'_f{frames}_px{image_size}_s{seed}_v{vocab_size}')
  configs = SyntheticVideo.builder_configs
  if name not in configs:
    configs[name] = SyntheticVideoConfig(name=name, description='custom sizes', **kw)
  return configs[name]
