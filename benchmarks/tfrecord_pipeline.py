"""The training input as it was before the random-access pipeline, kept only as the peer
that benchmarks measure against (benchmarks/input_pipeline.py, restore_latency.py).

It reads TFRecord files in a fixed order, each process its own part of the split
(`tfds.split_for_jax_process`), through a 10,000-record shuffle buffer; resuming at step
k rebuilds the stream and skips the first (k*B mod N) records of the epoch. Verbatim
from cookie_jax/data/pipeline.py at f5b20a8 except for where it finds its dataset: the
same builder, written as TFRecord in `<data_dir>/tfrecord` (`legacy_builder`).
"""

import logging
import math

import jax
import tensorflow_datasets as tfds

from cookie_jax import sharding
from cookie_jax.data import augment, sources
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.batching import load_tokenizer
from cookie_jax.data.batching import local_batch as _local_batch
from cookie_jax.data.batching import processes as _processes
from cookie_jax.data.batching import tokenize_batch as _tokenize_batch
from cookie_jax.data.builders import karpathy, synthetic
from cookie_jax.data.tf_env import tf

log = logging.getLogger(__name__)
_FOREVER = 2**62
_READ = tfds.ReadConfig(shuffle_seed=None, try_autocache=False)
SHUFFLE_BUFFER = 10_000


def legacy_builder(data_cfg):
  """The karpathy or synthetic builder of `data_cfg`, prepared as TFRecord; for
  builder='tfds', the dataset already prepared as TFRecord there."""
  data_dir = f'{data_cfg.data_dir}/tfrecord'
  if data_cfg.builder == 'tfds':
    return tfds.builder(data_cfg.tfds_name, data_dir=data_dir)
  if data_cfg.builder == 'karpathy':
    builder = karpathy.KarpathyCaptions(data_dir=data_dir, config=data_cfg.karpathy_dataset)
    builder.download_and_prepare(file_format='tfrecord', download_config=tfds.download.
                                 DownloadConfig(manual_dir=data_cfg.manual_dir))
  else:
    builder = synthetic.SyntheticShapes(
        data_dir=data_dir, config=synthetic.synthetic_config(**data_cfg.synthetic.to_dict()))
    builder.download_and_prepare(file_format='tfrecord')
  return builder


def _read(builder, split, keys, extra=()):
  # pylint: disable=protected-access
  image_key, text_key = keys
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=_READ,
                          decoders=sources._nest(image_key, tfds.decode.SkipDecoding()))

  def select(ex):
    return {'captions': tf.reshape(sources._get(ex, text_key), [-1]),
            'image': sources._get(ex, image_key)}

  del extra
  return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _autotune(n):
  return tf.data.AUTOTUNE if n == -1 else n


  return tf.data.AUTOTUNE if n == -1 else n


class TrainIterator:
  """Infinite training batches; `get_state`/`set_state` or `start_step` resume exactly."""

  def __init__(self, data_cfg, *, image_size: int, global_batch_size: int, seed: int,
               mesh: jax.sharding.Mesh | None = None, second_view: bool = False,
               start_step: int = 0, process_index: int | None = None,
               process_count: int | None = None):
    self.cfg = data_cfg
    self.image_size = image_size
    self.global_batch_size = global_batch_size
    self.seed = int(seed)
    self.mesh = mesh
    self.second_view = second_view
    self.process_index, self.process_count = _processes(process_index, process_count)
    self.local_batch_size = _local_batch(global_batch_size, self.process_count,
                                         'train.batch_size')
    self._builder = legacy_builder(data_cfg)
    self._keys = sources.feature_keys(data_cfg)
    sources.check_keys(self._builder, self._keys)  # now, not at the first batch
    self.split = tfds.split_for_jax_process(sources.resolve_split(data_cfg, "train"),
        process_index=self.process_index, process_count=self.process_count)
    self.num_local_examples = sources.num_examples(self._builder, self.split)
    if self.num_local_examples == 0:
      raise ValueError(f'Process {self.process_index} of {self.process_count} got no '
                       f'examples of {self.split!r}; the split is too small.')
    self.tokenizer = load_tokenizer(data_cfg)
    # Equal-sized images (the synthetic set) are augmented a whole batch at a time; if
    # they also fit in `cache_mb`, they are decoded and their captions tokenised once, and
    # kept in memory from the first epoch on. Photos are cropped while being decoded.
    shape, self._frames = sources.visual_shape(data_cfg, self._builder, self._keys)
    self._fixed_shape = shape if None not in shape else None
    self._cache = bool(self._fixed_shape) and (
        self.num_local_examples * math.prod(shape) <= data_cfg.cache_mb * 2**20)
    self._step = int(start_step)
    self._iterator = None

  # -- the stream --

  def _key(self, index):
    base = tf.constant([self.seed, self.process_index], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, index)

  def _decode_fixed(self, image_bytes):
    if self._frames is not None:  # a clip: decode only the frames fed
      return augment.decode_frames(tf.gather(image_bytes, self._frames), self._fixed_shape)
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.ensure_shape(image, self._fixed_shape)

  def _prepare(self, ex):
    """Per record, before shuffling; when caching, the image is decoded here, once."""
    captions = ex['captions']
    captions = tf.cond(tf.size(captions) > 0, lambda: captions, lambda: tf.constant(['']))
    image = self._decode_fixed(ex['image']) if self._cache else ex['image']
    return {'captions': captions, 'image': image}

  def _tokenize_records(self, records):
    """Every caption of a ragged batch of records in one Rust call (cached path only)."""
    captions = records['captions']
    ids, mask = tf.numpy_function(self._encode, [captions.flat_values],
                                  [tf.int32, tf.int32], stateful=False)
    lengths = captions.row_lengths()
    length = self.cfg.max_len
    return {**records,
            'ids': tf.RaggedTensor.from_row_lengths(tf.ensure_shape(ids, [None, length]),
                                                    lengths),
            'mask': tf.RaggedTensor.from_row_lengths(tf.ensure_shape(mask, [None, length]),
                                                     lengths)}

  def _encode(self, captions):
    out = tok_lib.encode(self.tokenizer, [c.decode('utf-8', 'replace') for c in captions])
    return out['input_ids'], out['attention_mask']

  def _element(self, position, ex):
    """Per visit: draw the caption; photos are also cropped here (see `_batch`)."""
    cfg = self.cfg
    k_caption, k_view1, k_view2 = tf.unstack(
        tf.random.experimental.stateless_split(self._key(position), 3))
    pick = tf.random.stateless_uniform([], k_caption, 0, tf.shape(ex['captions'])[0],
                                       tf.int32)
    if self._cache:
      out = {'input_ids': ex['ids'][pick], 'attention_mask': ex['mask'][pick]}
    else:
      out = {'caption': ex['captions'][pick]}
    if self._fixed_shape:  # augmented per batch, in `_batch`
      out['image'] = ex['image'] if self._cache else self._decode_fixed(ex['image'])
      return out

    def view(k):
      image = augment.train_view(
          ex['image'], k, size=self.image_size, area_range=tuple(cfg.crop_scale),
          aspect_ratio_range=tuple(cfg.crop_ratio), flip=cfg.flip)
      return augment.normalize(image, cfg.mean, cfg.std)

    out['image'] = view(k_view1)
    if self.second_view:
      out['image_view2'] = view(k_view2)
    return out

  def _batch(self, step, batch):
    """Per batch, fixed-size images: crop, resize and flip the whole batch at once."""
    cfg = self.cfg
    batch = dict(batch)
    images = batch.pop('image')
    keys = tf.unstack(tf.random.experimental.stateless_split(self._key(-1 - step), 2))
    names = ('image', 'image_view2') if self.second_view else ('image',)
    for name, key in zip(names, keys):
      view = augment.batch_train_view(
          images, key, size=self.image_size, area_range=tuple(cfg.crop_scale),
          aspect_ratio_range=tuple(cfg.crop_ratio), flip=cfg.flip)
      batch[name] = augment.normalize(view, cfg.mean, cfg.std)
    return batch

  def dataset(self, start_step: int) -> tf.data.Dataset:
    """The per-process batches from `start_step` on (numpy-ready tf.data)."""
    cfg = self.cfg
    parallel = _autotune(cfg.num_parallel_calls)
    start = start_step * self.local_batch_size
    first_epoch, offset = divmod(start, self.num_local_examples)
    records = _read(self._builder, self.split, self._keys)
    records = records.map(self._prepare, num_parallel_calls=parallel, deterministic=True)
    if self._cache:
      # Tokenised per 256 records, not per record: a third of the start-up time.
      records = records.ragged_batch(256).map(self._tokenize_records).unbatch().cache()
    seed = self.seed

    def epoch(e):
      epoch_seed = tf.random.stateless_uniform(
          [], tf.stack([tf.constant(seed, tf.int64), e]), 0, _FOREVER, tf.int64)
      return records.shuffle(SHUFFLE_BUFFER, seed=epoch_seed)

    stream = tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(epoch).skip(offset)
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(start, _FOREVER), stream)
    ds = ds.map(self._element, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    if self._fixed_shape:
      ds = tf.data.Dataset.zip(tf.data.Dataset.range(start_step, _FOREVER), ds)
      ds = ds.map(self._batch, num_parallel_calls=parallel, deterministic=True)
    if not self._cache:
      ds = ds.map(_tokenize_batch(self.tokenizer, cfg.max_len))
    if cfg.prefetch:
      ds = ds.prefetch(_autotune(cfg.prefetch))
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)

  def __iter__(self):
    return self

  def __next__(self):
    if self._iterator is None:
      self._iterator = self.dataset(self._step).as_numpy_iterator()
    batch = next(self._iterator)
    self._step += 1
    if self.mesh is None:
      return batch
    return sharding.to_global(self.mesh, batch)

  # -- position --

  @property
  def step(self) -> int:
    """Index of the batch the next `next()` returns."""
    return self._step

  def get_state(self) -> dict:
    return {'step': self._step, 'seed': self.seed,
            'global_batch_size': self.global_batch_size,
            'process_count': self.process_count}

  def set_state(self, state: dict) -> None:
    for key in ('seed', 'global_batch_size', 'process_count'):
      if key in state and state[key] != getattr(self, key):
        log.warning('Restoring a data position saved with %s=%s into an iterator with '
                    '%s=%s: the batches will differ from an uninterrupted run.',
                    key, state[key], key, getattr(self, key))
    self._step = int(state['step'])
    self._iterator = None  # rebuilt lazily at the restored position
