"""`synthetic_zeroshot`: single coloured shapes labelled by colour and shape, for zero-shot
classification of a model trained on `synthetic_shapes`.

Every image is one object of `scenes.py` (one of the 6 colours x 5 shapes, small or
large, in one of the nine regions, on a grey background), drawn by the same `render` as
the training scenes. Three `ClassLabel` features name what it shows:

* `label`: colour and shape, 30 classes ("red circle", ..., "orange cross");
* `shape`: 5 classes; `colour`: 6 classes.

The classes are balanced: image i shows combination i mod 30. Everything else (size,
region, jitter, background, colour noise) is drawn from a random stream of its own
(seed, split code `ZEROSHOT_CODE`, index), which no training, val or test scene uses, so
the images are new to a model trained on the synthetic scenes. Nothing is downloaded and
a build of the default 600 images takes about a second.
"""

import dataclasses
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cookie_jax.data import tf_env  # pylint: disable=unused-import  # hides GPUs before any TF op
from cookie_jax.data.builders import scenes

# A split code beside scenes.SPLIT_CODES (train 0, val 1, test 2): a stream of its own.
ZEROSHOT_CODE = 7
COLOURS = tuple(scenes.COLOURS)
SHAPES = scenes.SHAPES
LABELS = tuple(f'{c} {s}' for c in COLOURS for s in SHAPES)


@dataclasses.dataclass(eq=False)
class ZeroShotConfig(tfds.core.BuilderConfig):
  num_images: int = 600  # 20 per colour-shape class
  image_size: int = 64  # as the synthetic training images, which the pipeline resizes
  seed: int = 0  # the synthetic dataset's seed (`config.data.synthetic.seed`)


DEFAULT = ZeroShotConfig(name='default', description='600 images, 20 per class.')


def scene(seed: int, index: int) -> scenes.Scene:
  """The one-object scene of image `index`: combination index mod 30, the rest random."""
  colour, shape = divmod(index % len(LABELS), len(SHAPES))
  rng = np.random.default_rng([seed, ZEROSHOT_CODE, index, 0])
  obj = scenes.Obj(shape=SHAPES[shape], colour=COLOURS[colour],
                   size=str(rng.choice(list(scenes.RADIUS))))
  out = scenes.Scene('single', [obj], region=(int(rng.integers(3)), int(rng.integers(3))),
                     background=int(rng.integers(0, 100)))
  scenes.place(out, rng)  # where the training scenes put a single object
  return out


def example(seed: int, index: int, image_size: int) -> dict:
  """The features of image `index`; a pure function of its arguments."""
  s = scene(seed, index)
  rng = np.random.default_rng([seed, ZEROSHOT_CODE, index, 1])
  buf = io.BytesIO()
  Image.fromarray(scenes.render(s, image_size, rng)).save(buf, format='PNG')
  obj = s.objects[0]
  return {'image': buf.getvalue(), 'label': f'{obj.colour} {obj.shape}',
          'shape': obj.shape, 'colour': obj.colour}


class SyntheticZeroshot(tfds.core.GeneratorBasedBuilder):
  """One coloured shape per image, labelled by colour + shape, shape and colour."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [DEFAULT]
  code_path = None  # nothing to download, so no checksums file to look up

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(names=list(LABELS)),
            'shape': tfds.features.ClassLabel(names=list(SHAPES)),
            'colour': tfds.features.ClassLabel(names=list(COLOURS)),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # stored in index order: image i is example(seed, i)
        homepage='https://github.com/cookie-jax',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: everything is generated
    return {'test': self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    for i in range(cfg.num_images):
      yield i, example(cfg.seed, i, cfg.image_size)


def zeroshot_config(num_images: int = 600, image_size: int = 64,
                    seed: int = 0) -> ZeroShotConfig:
  """The builder config for these sizes, named by them so each lives in its own folder."""
  if (num_images, image_size, seed) == (DEFAULT.num_images, DEFAULT.image_size,
                                        DEFAULT.seed):
    return DEFAULT
  if num_images < 1 or image_size < 8:
    raise ValueError(f'synthetic_zeroshot needs num_images >= 1 and image_size >= 8; got '
                     f'{num_images} and {image_size}.')
  name = f'n{num_images}_px{image_size}_s{seed}'
  configs = SyntheticZeroshot.builder_configs
  if name not in configs:
    configs[name] = ZeroShotConfig(name=name, description='custom sizes',
                                   num_images=num_images, image_size=image_size, seed=seed)
  return configs[name]
