"""Labelled image sets for zero-shot classification: a tfds split with a `ClassLabel`
feature, or a local ImageFolder (`root/<class>/<image>`).

Both give one pass over the images in a fixed order (`image_batches`, the evaluation view
normalised as in training, the last batch padded and masked), the label of every image
and the class names. Process p of P owns rows [p*b, (p+1)*b) of every global batch of
size B = b*P, as in `pipeline.EvalData`. An ImageFolder's unreadable files are masked
out, counted and named in `skipped` (one process only: which rows fail is known only to
the process that read them).
"""

from cookie_jax.data.tf_env import tf  # pylint: disable=g-bad-import-order  # GPUs first

import math
import pathlib
import re

import jax
import numpy as np
import tensorflow_datasets as tfds

from cookie_jax import sharding
from cookie_jax.data import augment, image_files, sources

# File order on every read, so that images and labels pair by position.
_WNID = re.compile(r'^n\d{8}$')


def readable_name(name: str) -> str:
  """A class name as a prompt reads it: 'golden_retriever' -> 'golden retriever'."""
  return ' '.join(name.replace('_', ' ').split())


def looks_like_imagenet(names) -> bool:
  """True for the 1000 WordNet ids (n01440764, ...) that ImageNet-1k uses as names."""
  return len(names) == 1000 and all(_WNID.match(n) for n in names)


class _Rows:
  """Row ownership and padding of a pass of `num_images` images in global batches: this
  process holds the rows of each batch that the mesh places on its devices."""

  def __init__(self, num_images: int, batch_size: int, process_index, process_count,
               mesh=None):
    self.process_count = jax.process_count() if process_count is None else process_count
    self.process_index = jax.process_index() if process_index is None else process_index
    if batch_size % self.process_count:
      raise ValueError(f'eval.batch_size={batch_size} must be divisible by the '
                       f'{self.process_count} processes.')
    self.num_images = num_images
    self.batch_size = batch_size
    self.local_batch_size = batch_size // self.process_count
    owned = np.zeros(batch_size, bool)
    owned[sharding.local_rows(mesh, batch_size, self.process_index,
                              self.process_count)] = True
    self._owned_np, self._owned = owned, tf.constant(owned)

  @property
  def num_batches(self) -> int:
    return math.ceil(self.num_images / self.batch_size)

  def mine(self, index):
    """Whether global row `index` (a Python int or an int64 tensor) is this process's."""
    return tf.gather(self._owned, index % self.batch_size)

  def padding(self) -> int:
    total = self.num_batches * self.batch_size
    return int(self._owned_np[np.arange(self.num_images, total) % self.batch_size].sum())


class TfdsClassification:
  """A split of a prepared tfds dataset with an image and a `ClassLabel` feature."""

  def __init__(self, builder, split: str, *, label_key: str = 'label', image_key: str = '',
               image_size: int, mean, std, batch_size: int, process_index=None,
               process_count=None, num_parallel_calls: int = -1, mesh=None):
    self.builder, self.split = builder, split
    self.name = builder.name
    features = builder.info.features
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if label_key not in labels:
      raise ValueError(f'--label_key={label_key!r}: {builder.name} has no such ClassLabel '
                       f'feature; its ClassLabel features are {labels}.')
    pictures = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    image_key = image_key or (pictures[0] if pictures else '')
    if image_key not in pictures:
      raise ValueError(f'--image_key={image_key!r}: {builder.name} has no such Image '
                       f'feature; its Image features are {pictures}.')
    if split not in builder.info.splits:
      raise ValueError(f'--split={split!r} is not a split of {builder.name}; it has '
                       f'{sorted(builder.info.splits)}.')
    self.label_key, self.image_key = label_key, image_key
    self.class_names = list(features[label_key].names)
    self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
    self._parallel = tf.data.AUTOTUNE if num_parallel_calls == -1 else num_parallel_calls
    ds = sources.read_examples(builder, split,
                               decoders={image_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: ex[label_key])
    self.labels = np.fromiter(ds.as_numpy_iterator(), np.int64)
    if not self.labels.size:
      raise ValueError(f'Split {split!r} of {builder.name} is empty.')
    self.num_images = int(self.labels.size)
    self.keys = [f'{builder.name}/{split}/{i}' for i in range(self.num_images)]
    self.skipped: list[tuple[str, str]] = []
    self.kept = np.ones(self.num_images, bool)
    self._rows = _Rows(self.num_images, batch_size, process_index, process_count, mesh)
    self.batch_size = batch_size

  @property
  def num_batches(self) -> int:
    return self._rows.num_batches

  def _records(self):
    ds = sources.read_examples(self.builder, self.split,
                               decoders={self.image_key: tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: ex[self.image_key])

  def _view(self, encoded):
    return augment.normalize(augment.eval_view(encoded, size=self.image_size), self.mean,
                             self.std)

  def image_batches(self):
    """{'image': float32 [b, s, s, 3], 'mask': bool [b]}: this process's rows."""
    rows = self._rows
    pad = {'image': tf.zeros([self.image_size, self.image_size, 3]),
           'mask': tf.constant(False)}
    ds = self._records().enumerate().filter(lambda i, _: rows.mine(i))
    ds = ds.map(lambda i, e: {'image': self._view(e), 'mask': tf.constant(True)},
                num_parallel_calls=self._parallel, deterministic=True)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(rows.padding()))
    yield from ds.batch(rows.local_batch_size).prefetch(2).as_numpy_iterator()

  def images_at(self, wanted) -> dict[int, np.ndarray]:
    """The normalised eval views of the images at the given indices (one partial pass)."""
    wanted = sorted(set(int(i) for i in wanted))
    if not wanted:
      return {}
    ds = self._records().take(wanted[-1] + 1).enumerate()
    ds = ds.filter(lambda i, _: tf.reduce_any(tf.equal(i, tf.constant(wanted, tf.int64))))
    return {int(i): image for i, image in
            ds.map(lambda i, e: (i, self._view(e))).as_numpy_iterator()}


class ImageFolder:
  """`root/<class>/<image>`: classes are the sorted sub-folders of `root`, images the
  jpg/png/webp files anywhere below each; files directly in `root` are not used."""

  def __init__(self, root, *, image_size: int, mean, std, batch_size: int,
               num_parallel_calls: int = -1):
    base = pathlib.Path(root).expanduser()
    if not base.is_dir():
      raise FileNotFoundError(f'--image_folder={str(root)!r} is not a folder; give the '
                              'root of an ImageFolder layout, root/<class>/<image>.')
    if jax.process_count() > 1:
      raise ValueError('An ImageFolder is evaluated by one process (its unreadable files '
                       f'are known only to the process that reads them); this run has '
                       f'{jax.process_count()}. Run it on one host, or use a tfds split.')
    classes = sorted(d.name for d in base.iterdir() if d.is_dir()
                     and not d.name.startswith('.'))
    self.keys, labels = [], []
    for c, name in enumerate(classes):
      found = image_files.list_images(base / name)
      self.keys += [f'{name}/{f}' for f in found]
      labels += [c] * len(found)
    if not self.keys:
      raise FileNotFoundError(
          f'--image_folder={str(root)!r} holds no class folders with images '
          f'({len(classes)} sub-folders, no .jpg/.jpeg/.png/.webp in them); the layout is '
          'root/<class>/<image>.')
    self.root, self.name, self.split = base, base.name or 'folder', 'all'
    self.class_names = classes
    self.labels = np.asarray(labels, np.int64)
    self.num_images = len(self.keys)
    self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
    self.batch_size = batch_size
    self._parallel = num_parallel_calls
    self.skipped: list[tuple[str, str]] = []
    self.kept = np.ones(self.num_images, bool)

  @property
  def num_batches(self) -> int:
    return math.ceil(self.num_images / self.batch_size)

  def _batches(self, keys):
    return image_files.file_batches([self.root / k for k in keys], size=self.image_size,
                               mean=self.mean, std=self.std, batch_size=self.batch_size,
                               num_parallel_calls=self._parallel)

  def image_batches(self):
    """{'image', 'mask'}: unreadable files are masked out and listed in `skipped`."""
    self.skipped, seen = [], 0
    for batch in self._batches(self.keys):
      for j, error in enumerate(batch.pop('error')):
        if error:
          self.kept[seen + j] = False
          self.skipped.append((self.keys[seen + j], error))
      seen += len(batch['mask'])
      yield batch

  def images_at(self, wanted) -> dict[int, np.ndarray]:
    wanted = sorted(set(int(i) for i in wanted))
    out = {}
    for start in range(0, len(wanted), self.batch_size):
      chunk = wanted[start:start + self.batch_size]
      batch = next(self._batches([self.keys[i] for i in chunk]))
      out.update({i: batch['image'][j] for j, i in enumerate(chunk) if batch['mask'][j]})
    return out
