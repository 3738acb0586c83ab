"""Image files for evaluation and indexing: find them, decode them, batch their eval views.

A folder of pictures is read with PIL, which knows JPEG, PNG and WebP (TensorFlow's
decoder has no WebP) and lets a bad file be named instead of failing the whole pass.
Pictures are turned upright by their EXIF orientation, and converted to 8-bit RGB as the
Karpathy builder does (`builders.upright.to_rgb`: 16-bit scaled, transparency over white). The
decoded pixels then take exactly the evaluation view of the tfds path
(`augment.eval_resize_crop` + `augment.normalize`), so a PNG gives the same model input
from a folder as from a tfds split.

A file that cannot be read (truncated, not an image, too large for PIL's decompression
bomb limit) gives a batch row with `mask` False and its error in `error`; it never stops a
pass.
"""

from cookie_jax.data.tf_env import tf  # pylint: disable=g-bad-import-order  # GPUs first

import os
import pathlib
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps
import tensorflow_datasets as tfds

from cookie_jax.data import augment, sources
from cookie_jax.data.builders.upright import to_rgb

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')


def list_images(root) -> list[str]:
  """Every jpg/jpeg/png/webp file under `root` (recursively, any case of the suffix), as
  POSIX paths relative to `root`, sorted; hidden files and folders are left out."""
  base = pathlib.Path(root).expanduser()
  if not base.is_dir():
    raise FileNotFoundError(f'{str(root)!r} is not a folder; give the folder holding the '
                            'images (searched recursively for .jpg, .jpeg, .png, .webp).')
  found = []
  for folder, dirs, files in os.walk(base):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    rel = pathlib.Path(folder).relative_to(base)
    found += [(rel / f).as_posix() for f in files
              if not f.startswith('.') and f.lower().endswith(IMAGE_SUFFIXES)]
  return sorted(found)


def read_rgb(path) -> np.ndarray:
  """uint8 [h, w, 3] of an image file, upright (EXIF) and in 8-bit RGB."""
  with Image.open(path) as img:
    img.load()
    return np.asarray(to_rgb(ImageOps.exif_transpose(img)))


def _decode(path: bytes):
  try:
    return read_rgb(path.decode('utf-8', 'surrogateescape')), True, b''
  except Exception as e:  # pylint: disable=broad-except  # any unreadable file is skipped
    message = ' '.join(f'{type(e).__name__}: {e}'.split())
    return np.zeros((1, 1, 3), np.uint8), False, message.encode('utf-8', 'replace')


def file_dataset(paths: Sequence[str], *, size: int, mean, std,
                 num_parallel_calls: int = -1) -> tf.data.Dataset:
  """{'image': float32 [size, size, 3] (the eval view, normalised), 'ok': bool,
  'error': string} per path, in order; unreadable files give ok False and their error."""
  parallel = tf.data.AUTOTUNE if num_parallel_calls == -1 else num_parallel_calls

  def load(path):
    image, ok, error = tf.numpy_function(_decode, [path], [tf.uint8, tf.bool, tf.string],
                                         stateful=False)
    image = augment.eval_resize_crop(tf.ensure_shape(image, [None, None, 3]), size=size)
    return {'image': augment.normalize(image, mean, std), 'ok': tf.ensure_shape(ok, []),
            'error': tf.ensure_shape(error, [])}

  paths = tf.constant([os.fspath(p) for p in paths], tf.string)
  return tf.data.Dataset.from_tensor_slices(paths).map(
      load, num_parallel_calls=parallel, deterministic=True)


def file_batches(paths: Sequence[str], *, size: int, mean, std, batch_size: int,
                 num_parallel_calls: int = -1) -> Iterator[dict]:
  """Batches of `file_dataset` as numpy: {'image': [batch_size, size, size, 3], 'mask',
  'error': [batch_size]}. `mask` is False for unreadable files and for the padding that
  fills the last batch up to `batch_size` (so one compiled encoder serves every batch)."""
  if not len(paths):  # pylint: disable=g-explicit-length-test
    return
  ds = file_dataset(paths, size=size, mean=mean, std=std,
                    num_parallel_calls=num_parallel_calls)
  for batch in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
    rows = len(batch['ok'])
    pad = batch_size - rows
    out = {'image': batch['image'], 'mask': batch['ok'],
           'error': [e.decode('utf-8', 'replace') for e in batch['error']]}
    if pad:
      out['image'] = np.concatenate(
          [out['image'], np.zeros((pad,) + out['image'].shape[1:], np.float32)])
      out['mask'] = np.concatenate([out['mask'], np.zeros(pad, bool)])
      out['error'] += [''] * pad
    yield out


# A tfds split as an image source (`launch/index.py build --tfds=NAME`) ------------------

# File order on every read, so that index i is always the same image.


def tfds_builder(name: str, data_dir: str = ''):
  """A prepared tfds dataset; cookie_jax's own builders are known by name."""
  # Imported to register them with tfds by name.
  # pylint: disable-next=g-import-not-at-top,unused-import
  from cookie_jax.data.builders import synthetic, synthetic_video, zeroshot_shapes
  builder = tfds.builder(name, data_dir=data_dir or None)
  if not builder.is_prepared():
    raise FileNotFoundError(f'--tfds={name!r} is not prepared in {builder.data_dir}; '
                            f'nothing is downloaded here. Prepare it first, e.g. `tfds build '
                            f'{name}`, or give --data_dir.')
  return builder


def image_feature(builder, image_key: str = '') -> str:
  """`image_key`, checked to be an Image feature; '' = the first Image feature."""
  found = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
  key = image_key or (found[0] if found else '')
  if key not in found:
    raise ValueError(f'--image_key={image_key!r}: {builder.name} has no such Image feature; '
                     f'its Image features are {found}.')
  return key


def _tfds_images(builder, split: str, image_key: str, lo: int, hi: int):
  ds = sources.read_examples(builder, split, start=lo, stop=hi,
                             decoders={image_key: tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: ex[image_key])


def tfds_batches(builder, split: str, image_key: str, lo: int, hi: int, *, size: int, mean,
                 std, batch_size: int) -> Iterator[dict]:
  """`file_batches` of images lo..hi-1 of a tfds split (every row readable)."""
  ds = _tfds_images(builder, split, image_key, lo, hi).map(
      lambda e: augment.normalize(augment.eval_view(e, size=size), mean, std),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for images in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
    rows = len(images)
    pad = np.zeros((batch_size - rows,) + images.shape[1:], np.float32)
    yield {'image': np.concatenate([images, pad]), 'mask': np.arange(batch_size) < rows,
           'error': [''] * batch_size}


def tfds_image(builder, split: str, image_key: str, index: int) -> np.ndarray:
  """uint8 [h, w, 3] of image `index` of a tfds split, as stored."""
  encoded = next(iter(_tfds_images(builder, split, image_key, index, index + 1)))
  return tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()
