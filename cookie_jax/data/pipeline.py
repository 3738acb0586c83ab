"""The input pipeline: tf.data on the host, global `jax.Array`s out.

Training (`TrainIterator`) is an infinite, exactly resumable stream. Each process reads its
own disjoint part of the split (`tfds.split_for_jax_process`) and numbers the examples it
emits 0, 1, 2, ... ("positions"). Everything random is a pure function of the config seed,
the process and the position:

* epoch e of a process is its part shuffled with a seed drawn from (seed, e);
* the caption drawn for an image, and a photo's augmented views, use stateless TF ops
  keyed on (seed, process, position); equal-sized images (the synthetic set) are
  augmented a whole batch at a time, keyed on (seed, process, step).

So the batch at step k is fixed by k alone, and resuming at step k means rebuilding the
stream at epoch (k*B // n) and skipping the first (k*B % n) records of that epoch before
any augmentation: a seeded skip, with nothing to save but the step. We chose this over
checkpointing tf.data iterators, whose state holds the shuffle buffer (gigabytes of
encoded images at a 10k buffer) and is tied to one graph and one process layout. The
price is reading up to one epoch of records on restore (photos are not decoded for it).

Video datasets take the same path: a clip is `image` [T, H, W, 3] (batches [B, T, H, W, 3]),
with `config.data.num_frames` frames taken evenly from those stored, and one crop per
clip shared by its frames. Everything downstream (sharding on axis 0, losses, evaluation)
is the image path's.

Evaluation (`eval_data`) visits a split once in file order; the last global batch is
padded and masked. Process p owns rows [p*b, (p+1)*b) of every global batch of size
B = b * process_count, so the global arrays hold images 0..B-1, B..2B-1, ... in order.
"""

import logging
import math

import jax
import numpy as np
from tokenizers import Tokenizer

from cookie_jax import sharding
from cookie_jax.data import augment, sources
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.defaults import OWN_VOCAB_BUILDERS, SYNTHETIC_VOCAB
from cookie_jax.data.tf_env import tf

log = logging.getLogger(__name__)
_FOREVER = 2**62


def load_tokenizer(data_cfg) -> Tokenizer:
  """BERT WordPiece: [CLS] text [SEP], truncated and padded to `data_cfg.max_len`."""
  if data_cfg.tokenizer == SYNTHETIC_VOCAB:
    image_set = data_cfg.copy_and_resolve_references()
    image_set.builder = 'synthetic'
    tok = tok_lib.wordpiece_tokenizer(sources.get_builder(image_set).info.metadata['vocab'])
  elif data_cfg.tokenizer:
    tok = tok_lib.tokenizer_from_path(data_cfg.tokenizer, lowercase=data_cfg.lowercase)
  elif data_cfg.builder in OWN_VOCAB_BUILDERS:
    tok = tok_lib.wordpiece_tokenizer(sources.get_builder(data_cfg).info.metadata['vocab'])
  else:
    raise ValueError(
        f"config.data.tokenizer='': only the synthetic datasets ship their own vocabulary; "
        f'builder={data_cfg.builder!r} needs a local folder with tokenizer.json or '
        'vocab.txt (e.g. bert-base-uncased).')
  return tok_lib.finalize(tok, data_cfg.max_len)


def tokenizer_vocab_size(data_cfg) -> int:
  return load_tokenizer(data_cfg).get_vocab_size()


def _processes(process_index, process_count):
  pc = jax.process_count() if process_count is None else process_count
  pi = jax.process_index() if process_index is None else process_index
  if not 0 <= pi < pc:
    raise ValueError(f'process_index={pi} is outside [0, {pc}).')
  return pi, pc


def _local_batch(global_batch, pc, key):
  if global_batch % pc:
    raise ValueError(f'{key}={global_batch} must be divisible by the {pc} processes; '
                     f'use a multiple of {pc}.')
  return global_batch // pc


def _tokenize_batch(tokenizer: Tokenizer, length: int):
  """A tf.data map that tokenizes a batch of captions in one Rust call."""

  def encode(captions):
    texts = [c.decode('utf-8', errors='replace') for c in captions]
    out = tok_lib.encode(tokenizer, texts)
    return out['input_ids'], out['attention_mask']

  def fn(batch):
    batch = dict(batch)
    ids, mask = tf.numpy_function(encode, [batch.pop('caption')], [tf.int32, tf.int32],
                                  stateful=False)
    batch['input_ids'] = tf.ensure_shape(ids, [None, length])
    batch['attention_mask'] = tf.ensure_shape(mask, [None, length])
    return batch

  return fn


def _autotune(n):
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
    self._builder = sources.get_builder(data_cfg)
    self._keys = sources.feature_keys(data_cfg)
    sources.check_keys(self._builder, self._keys)  # now, not at the first batch
    self.split = sources.process_split(sources.resolve_split(data_cfg, 'train'),
                                       self.process_index, self.process_count)
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
    records = sources.read(self._builder, self.split, self._keys, extra=())
    records = records.map(self._prepare, num_parallel_calls=parallel, deterministic=True)
    if self._cache:
      # Tokenised per 256 records, not per record: a third of the start-up time.
      records = records.ragged_batch(256).map(self._tokenize_records).unbatch().cache()
    seed = self.seed

    def epoch(e):
      epoch_seed = tf.random.stateless_uniform(
          [], tf.stack([tf.constant(seed, tf.int64), e]), 0, _FOREVER, tf.int64)
      return records.shuffle(cfg.shuffle_buffer, seed=epoch_seed)

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


class EvalData:
  """One pass over a split: images and captions each exactly once, in order, masked."""

  def __init__(self, data_cfg, split: str, *, image_size: int, batch_size: int,
               mesh: jax.sharding.Mesh | None = None, process_index: int | None = None,
               process_count: int | None = None):
    self.cfg = data_cfg
    self.split = sources.resolve_split(data_cfg, split)
    self.image_size = image_size
    self.batch_size = batch_size
    self.mesh = mesh
    self.process_index, self.process_count = _processes(process_index, process_count)
    self.local_batch_size = _local_batch(batch_size, self.process_count, 'eval.batch_size')
    self._builder = sources.get_builder(data_cfg)
    self._keys = sources.feature_keys(data_cfg)
    self._shape, self._frames = sources.visual_shape(data_cfg, self._builder, self._keys)
    # What the visual side is, for naming metrics (image->text or video->text).
    self.visual = 'image' if self._frames is None else 'video'

    counts, captions, ids = [], [], []
    text = sources.read(self._builder, self.split, self._keys, with_image=False)
    for ex in text.as_numpy_iterator():
      caps = [c.decode('utf-8', errors='replace') for c in ex['captions']]
      counts.append(len(caps))
      captions.extend(caps)
      if 'image_id' in ex:
        ids.append(int(ex['image_id']))
    if not counts:
      raise ValueError(f'Split {self.split!r} of {self._builder.name} is empty.')
    self.num_images = len(counts)
    self.num_captions = len(captions)
    self.captions = captions
    self.caption_image_index = np.repeat(np.arange(self.num_images),
                                         counts).astype(np.int32)
    self.image_ids = np.asarray(ids, np.int64) if ids else None
    self._tokens = tok_lib.encode(load_tokenizer(data_cfg), captions)

  @property
  def num_image_batches(self) -> int:
    return math.ceil(self.num_images / self.batch_size)

  @property
  def num_text_batches(self) -> int:
    return math.ceil(self.num_captions / self.batch_size)

  def _mine(self, index):
    """True where global row `index` belongs to this process."""
    return (index % self.batch_size) // self.local_batch_size == self.process_index

  def _out(self, batch):
    return batch if self.mesh is None else sharding.to_global(self.mesh, batch)

  def image_batches(self, with_ids: bool = False):
    """{'image': float32 [b, s, s, 3] (clips: [b, T, s, s, 3]), 'mask': bool [b]} (+
    'image_id' if asked)."""
    cfg, size = self.cfg, self.image_size
    total = self.num_image_batches * self.batch_size
    pads = sum(1 for i in range(self.num_images, total) if self._mine(i))
    has_ids = with_ids and self.image_ids is not None

    def view(encoded):
      if self._frames is None:
        return augment.eval_view(encoded, size=size)
      return augment.eval_clip(tf.gather(encoded, self._frames), size=size)

    def decode(i, ex):
      out = {'image': augment.normalize(view(ex['image']), cfg.mean, cfg.std),
             'mask': tf.constant(True)}
      if has_ids:
        out['image_id'] = ex['image_id']
      return out

    pixels = [size, size, 3] if self._frames is None else [self._shape[0], size, size, 3]
    pad = {'image': tf.zeros(pixels, tf.float32), 'mask': tf.constant(False)}
    if has_ids:
      pad['image_id'] = tf.constant(-1, tf.int64)
    records = sources.read(self._builder, self.split, self._keys)
    ds = records.enumerate().filter(lambda i, ex: self._mine(i))
    ds = ds.map(decode, num_parallel_calls=_autotune(cfg.num_parallel_calls),
                deterministic=True)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(pads))
    ds = ds.batch(self.local_batch_size).prefetch(_autotune(cfg.prefetch or 1))
    for batch in ds.as_numpy_iterator():
      yield self._out(batch)

  def text_batches(self):
    """{'input_ids', 'attention_mask': int32 [b, L], 'mask': bool [b]}."""
    b, start = self.local_batch_size, self.process_index * self.local_batch_size
    total = self.num_text_batches * self.batch_size
    rows = {k: np.zeros((total,) + v.shape[1:], v.dtype) for k, v in self._tokens.items()}
    for k, v in self._tokens.items():
      rows[k][:self.num_captions] = v
    rows['mask'] = np.arange(total) < self.num_captions
    for i in range(self.num_text_batches):
      lo = i * self.batch_size + start
      yield self._out({k: v[lo:lo + b] for k, v in rows.items()})


def eval_data(data_cfg, split: str, *, image_size: int, batch_size: int,
              mesh: jax.sharding.Mesh | None = None, process_index: int | None = None,
              process_count: int | None = None) -> EvalData:
  """The split `split` ('val', 'test', or any tfds split expression) for evaluation."""
  return EvalData(data_cfg, split, image_size=image_size, batch_size=batch_size, mesh=mesh,
                  process_index=process_index, process_count=process_count)
