"""`TrainIterator`: global batch k as a pure function of (seed, k), read by random access.

See `pipeline.py` for the design. This module builds it in tf.data: per step, numpy
(`order.py`) names the records of this process's rows and draws their random numbers;
those records are fetched by index from the ArrayRecord files; TF threads decode and
augment them; one Rust call per batch tokenises the captions.
"""

import math

from absl import logging
import jax
import numpy as np

from cookie_jax import sharding
from cookie_jax.data import augment, batching, order, sources
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.defaults import mixture_components
from cookie_jax.data.tf_env import tf

_FOREVER = 2**62
# A record that fails to decode is replaced by the next one of its epoch's permutation,
# up to this many in a row; then the dataset is broken and training stops, saying so.
MAX_ATTEMPTS = 16
# Streams of per-row random numbers: the caption drawn, then one per augmented view.
_CAPTION, _VIEW = 0, 1
_LOGGED_BAD = 10  # replaced records logged one by one; after that every 1000th


class Part:
  """One training dataset (one entry of the mixture): its records by index."""

  def __init__(self, index: int, data_cfg):
    self.index = index
    self.builder = sources.get_builder(data_cfg)
    self.keys = sources.feature_keys(data_cfg)
    self.split = sources.resolve_split(data_cfg, 'train')
    self.source = sources.data_source(self.builder, self.split)
    self.size = len(self.source)
    if not self.size:
      raise ValueError(f'Split {self.split!r} of {self.builder.name} is empty; '
                       'config.data.train_split must name records to train on.')
    self.name = f'{self.builder.name}/{self.split}'
    self._parse = sources.parser(self.builder, self.keys)
    self.shape, self.frames = sources.visual_shape(data_cfg, self.builder, self.keys)

  def read(self, serialized):
    """{'image': encoded (a clip: the frames fed, [T] encoded), 'captions': [n >= 1]}."""
    ex = self._parse(serialized)
    image = ex['image'] if self.frames is None else tf.gather(ex['image'], self.frames)
    captions = ex['captions']
    captions = tf.cond(tf.size(captions) > 0, lambda: captions, lambda: tf.constant(['']))
    return {'image': image, 'captions': captions}


def _common_shape(parts):
  """The stored visual shape every part shares, or None (photos of varying size)."""
  kinds = {p.frames is None for p in parts}
  if len(kinds) > 1:
    raise ValueError('config.data.mixture mixes image datasets and video datasets '
                     f'({[p.name for p in parts]}); train one kind at a time.')
  shapes = {p.shape for p in parts}
  if len(shapes) > 1 and parts[0].frames is not None:
    raise ValueError(f'config.data.mixture: the video datasets store clips of shapes '
                     f'{sorted(shapes)}; they must agree (frames, size).')
  shape = shapes.pop() if len(shapes) == 1 else None
  return shape if shape is not None and None not in shape else None


class TrainIterator:
  """Infinite training batches; `get_state`/`set_state` or `start_step` resume exactly.

  Each batch: 'image' float32 [b, s, s, 3] (clips [b, T, s, s, 3]), 'image_view2' if
  `second_view`, 'input_ids' and 'attention_mask' int32 [b, max_len], and 'bad_records'
  int32 [b]: how many records that failed to decode each row skipped (usually 0).
  """

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
    self.process_index, self.process_count = batching.processes(process_index,
                                                                process_count)
    self.local_batch_size = batching.local_batch(global_batch_size, self.process_count,
                                                 'train.batch_size')
    # This process's rows of each global batch (any set: on a TPU slice they interleave
    # with other hosts'), from the mesh; the records it reads are exactly those rows.
    self.rows = sharding.local_rows(mesh, global_batch_size, self.process_index,
                                    self.process_count)
    components = mixture_components(data_cfg)
    self.parts = [Part(i, cfg) for i, (cfg, _) in enumerate(components)]
    self.mixture = order.Mixture([w for _, w in components], self.seed)
    self.num_records = sum(p.size for p in self.parts)
    self.group_size = int(data_cfg.group_size)
    if self.local_batch_size % self.group_size:
      raise ValueError(
          f'config.data.group_size={self.group_size} does not divide the per-process batch '
          f'of {self.local_batch_size} (train.batch_size {global_batch_size} over '
          f'{self.process_count} processes): a group would be split across batches. '
          'Use a group size that divides it, or 1.')
    self.tokenizer = batching.load_tokenizer(data_cfg)
    # Equal-sized images (the synthetic set) are augmented a whole batch at a time; if
    # they also fit in `cache_mb`, they are decoded and their captions tokenised once, at
    # the start, and kept in memory. Photos are cropped while being decoded.
    self._fixed_shape = _common_shape(self.parts)
    self._cache = bool(self._fixed_shape) and (
        self.num_records * math.prod(self._fixed_shape) <= data_cfg.cache_mb * 2**20)
    self._views = 2 if second_view else 1
    self._bad_logged = 0
    self._cached = None
    self._step = int(start_step)
    self._iterator = None

  def _positions(self, step):
    return int(step) * self.global_batch_size + self.rows

  def _records(self, parts, visits, attempts):
    out = np.empty_like(visits)
    for p in self.parts:
      sel = parts == p.index
      if sel.any():
        out[sel] = order.record(self.seed, p.index, visits[sel], p.size, attempts[sel],
                                group=self.group_size)
    return out

  def _randoms(self, g):
    """Per row: the caption's uniform, and per view 5 uniforms (fixed-size images) or
    a TF seed (photos), all keyed on (seed, global position)."""
    caption_u = order.uniforms(self.seed, g, _CAPTION, 1)[:, 0]
    views = range(_VIEW, _VIEW + self._views)
    if self._fixed_shape:
      view = np.stack([order.uniforms(self.seed, g, v, 5) for v in views], 1)
      return caption_u, view.astype(np.float32)
    return caption_u, np.stack([order.tf_seeds(self.seed, g, v) for v in views], 1)

  def _rows(self, step):
    """The local rows of step `step`: positions, parts, visits, first records' bytes."""
    g = self._positions(step)
    parts, visits = self.mixture.locate(g)
    records = self._records(parts, visits, np.zeros_like(g))
    serialized = np.empty(len(g), object)
    for p in self.parts:
      sel = parts == p.index
      if sel.any():
        serialized[sel] = sources.fetch(p.source, records[sel])
    return (g, parts, visits, serialized) + self._randoms(g)

  def _replacement(self, g, part, visit, attempt):
    """The bytes of stand-in `attempt` for the record of position g (it failed)."""
    p = self.parts[int(part)]
    failed, record = self._records(np.array([part, part]), np.array([visit, visit]),
                                   np.array([attempt - 1, attempt]))
    if attempt >= MAX_ATTEMPTS:
      raise ValueError(f'{MAX_ATTEMPTS} records in a row of {p.name} failed to decode at '
                       f'position {int(g)} (the last: record {failed}); the dataset looks '
                       'broken. Check or rebuild it.')
    self._bad_logged += 1
    if self._bad_logged <= _LOGGED_BAD or self._bad_logged % 1000 == 0:
      logging.warning('Record %d of %s failed to decode (position %d); reading record %d '
                  'instead (%d so far; counted in train/bad_records).', failed, p.name,
                  int(g), record, self._bad_logged)
    return sources.fetch(p.source, [record])[0]

  # -- decoding (TF, per row) --

  def _read(self, part, serialized):
    if len(self.parts) == 1:
      return self.parts[0].read(serialized)
    return tf.switch_case(tf.cast(part, tf.int32),
                          [lambda p=p: p.read(serialized) for p in self.parts])

  def _decode_fixed(self, image):
    if self.parts[0].frames is not None:
      return augment.decode_frames(image, self._fixed_shape)
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
    return tf.ensure_shape(image, self._fixed_shape)

  def _decode(self, row, attempt, serialized):
    """One row from the bytes of its record (or of stand-in `attempt`)."""
    cfg = self.cfg
    ex = self._read(row['part'], serialized)
    n = tf.size(ex['captions'])
    pick = tf.cast(tf.floor(row['caption_u'] * tf.cast(n, tf.float64)), tf.int32)
    out = {'g': row['g'], 'caption': ex['captions'][tf.minimum(pick, n - 1)],
           'bad_records': tf.cast(attempt, tf.int32)}
    if self._fixed_shape:  # augmented per batch, in `_batch_views`
      out['image'] = self._decode_fixed(ex['image'])
      out['view'] = row['view']
      return out
    for v, name in enumerate(('image', 'image_view2')[:self._views]):
      image = augment.train_view(
          ex['image'], row['view'][v], size=self.image_size,
          area_range=tuple(cfg.crop_scale), aspect_ratio_range=tuple(cfg.crop_ratio),
          flip=cfg.flip)
      out[name] = augment.normalize(image, cfg.mean, cfg.std)
    return out

  def _row_dataset(self, row):
    """The row from its record, else from the next records of the permutation that
    decode (errors of a record are skipped); after MAX_ATTEMPTS, a clear error."""

    def stand_in(attempt):
      serialized = tf.numpy_function(self._replacement, [row['g'], row['part'],
                                                         row['visit'], attempt],
                                     tf.string, stateful=True)
      return tf.ensure_shape(serialized, [])

    first = tf.data.Dataset.from_tensors((tf.constant(0, tf.int64), row['serialized']))
    more = tf.data.Dataset.range(1, MAX_ATTEMPTS).map(lambda a: (a, stand_in(a)))
    decoded = first.concatenate(more).map(lambda a, s: self._decode(row, a, s))
    give_up = tf.data.Dataset.from_tensors(tf.constant(MAX_ATTEMPTS, tf.int64)).map(
        lambda a: self._decode(row, a, stand_in(a)))
    return decoded.ignore_errors().concatenate(give_up).take(1)

  def _step_batch(self, rows):
    """The decoded rows of one step (`rows`: [b] of each field), in order. Rows whose
    record fails to decode are dropped here and filled in by `_fill`: the common case
    pays for one nested dataset per step, not per row."""
    b = self.local_batch_size
    decoded = tf.data.Dataset.from_tensor_slices(rows).map(
        lambda r: self._decode(r, tf.constant(0, tf.int64), r['serialized']),
        num_parallel_calls=batching.autotune(self.cfg.num_parallel_calls),
        deterministic=True).ignore_errors(log_warning=False)
    empty = tf.nest.map_structure(lambda s: tf.zeros([0] + s.shape.as_list(), s.dtype),
                                  decoded.element_spec)
    batch = decoded.batch(b).concatenate(tf.data.Dataset.from_tensors(empty)).take(1)
    batch = batch.get_single_element()
    batch = tf.cond(tf.shape(batch['g'])[0] < b, lambda: self._fill(rows, batch),
                    lambda: batch)
    return tf.nest.map_structure(
        lambda x: tf.ensure_shape(x, [b] + x.shape.as_list()[1:]), batch)

  def _fill(self, rows, batch):
    """`batch` with the rows it lacks, each read from the first stand-in that decodes."""
    missing = tf.logical_not(tf.reduce_any(rows['g'][:, None] == batch['g'][None, :], 1))
    lost = tf.nest.map_structure(lambda x: tf.boolean_mask(x, missing), rows)
    repaired = tf.data.Dataset.from_tensor_slices(lost).interleave(
        self._row_dataset, cycle_length=1).batch(self.local_batch_size).get_single_element()
    merged = tf.nest.map_structure(lambda x, y: tf.concat([x, y], 0), batch, repaired)
    order_ = tf.argsort(merged['g'])
    return tf.nest.map_structure(lambda x: tf.gather(x, order_), merged)

  def _batch_views(self, batch):
    """Fixed-size images: crop, resize and flip the whole batch at once."""
    cfg = self.cfg
    batch = dict(batch)
    images, view = batch.pop('image'), batch.pop('view')
    for v, name in enumerate(('image', 'image_view2')[:self._views]):
      out = augment.batch_train_view(
          images, size=self.image_size, area_range=tuple(cfg.crop_scale),
          aspect_ratio_range=tuple(cfg.crop_ratio), flip=cfg.flip, uniforms=view[:, v])
      batch[name] = augment.normalize(out, cfg.mean, cfg.std)
    return batch

  # -- the in-memory path: equal-sized images that fit in cache_mb --

  def _fill_cache(self):
    """Every record decoded once, every caption tokenised once; bad records marked."""
    images = np.zeros((self.num_records,) + tuple(self._fixed_shape), np.uint8)
    good = np.zeros(self.num_records, bool)
    counts = np.ones(self.num_records, np.int64)
    texts = [[''] for _ in range(self.num_records)]
    offset = 0
    for p in self.parts:
      source = p.source

      def decode(i, serialized, p=p):
        ex = p.read(serialized)
        return i, self._decode_fixed(ex['image']), ex['captions']

      serialized = tf.data.Dataset.range(p.size).batch(256).map(
          lambda i, source=source: tf.numpy_function(lambda x: sources.fetch(source, x),
                                                     [i], tf.string)).unbatch()
      ds = tf.data.Dataset.zip(tf.data.Dataset.range(p.size), serialized)
      ds = ds.map(decode, num_parallel_calls=batching.autotune(self.cfg.num_parallel_calls),
                  deterministic=True).ignore_errors(log_warning=False).ragged_batch(512)
      for i, image, caps in ds.as_numpy_iterator():
        images[offset + i], good[offset + i] = image, True
        caps = caps.to_list() if hasattr(caps, 'to_list') else list(caps)
        for row, row_caps in zip(offset + i, caps):
          texts[row] = [c.decode('utf-8', 'replace') for c in row_caps]
          counts[row] = len(row_caps)
      bad = p.size - int(good[offset:offset + p.size].sum())
      if bad:
        logging.warning('%d records of %s failed to decode; the rows that draw them read the '
                    'next record of the permutation (counted in train/bad_records).', bad,
                    p.name)
      offset += p.size
    tokens = tok_lib.encode(self.tokenizer, [t for caps in texts for t in caps])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offsets = np.concatenate([[0], np.cumsum([p.size for p in self.parts])[:-1]])
    return dict(images=images, good=good, counts=counts, starts=starts, offsets=offsets,
                **tokens)

  def _cached_batch(self, step):
    c = self._cached
    g = self._positions(step)
    parts, visits = self.mixture.locate(g)
    attempts = np.zeros_like(g)
    ids = c['offsets'][parts] + self._records(parts, visits, attempts)
    while not c['good'][ids].all():
      bad = ~c['good'][ids]
      attempts[bad] += 1
      if attempts.max() >= MAX_ATTEMPTS:
        raise ValueError(f'{MAX_ATTEMPTS} records in a row failed to decode near position '
                         f'{int(g[bad][0])}; the dataset looks broken. Check or rebuild it.')
      ids[bad] = c['offsets'][parts[bad]] + self._records(parts[bad], visits[bad],
                                                          attempts[bad])
    caption_u, view = self._randoms(g)
    n = c['counts'][ids]
    caption = c['starts'][ids] + np.minimum(np.floor(caption_u * n).astype(np.int64), n - 1)
    return (c['images'][ids], c['input_ids'][caption], c['attention_mask'][caption], view,
            attempts.astype(np.int32))

  # -- the stream --

  def dataset(self, start_step: int) -> tf.data.Dataset:
    """The per-process batches from `start_step` on (numpy-ready tf.data)."""
    cfg = self.cfg
    parallel = batching.autotune(cfg.num_parallel_calls)
    steps = tf.data.Dataset.range(start_step, _FOREVER)
    if self._cache:
      if self._cached is None:
        self._cached = self._fill_cache()
      ds = steps.map(self._cached_step, num_parallel_calls=parallel, deterministic=True)
      ds = ds.map(self._batch_views, num_parallel_calls=parallel, deterministic=True)
    else:
      ds = steps.map(self._rows_step, num_parallel_calls=parallel, deterministic=True)
      # Two steps at a time: one decodes while the other is batched and tokenised.
      ds = ds.map(self._step_batch, num_parallel_calls=2, deterministic=True)
      ds = ds.map(lambda batch: {k: v for k, v in batch.items() if k != 'g'})
      if self._fixed_shape:
        ds = ds.map(self._batch_views, num_parallel_calls=parallel, deterministic=True)
      ds = ds.map(batching.tokenize_batch(self.tokenizer, cfg.max_len))
    if cfg.prefetch:
      ds = ds.prefetch(batching.autotune(cfg.prefetch))
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)

  def _cached_step(self, step):
    length, shape = self.cfg.max_len, [self.local_batch_size]
    image, ids, mask, view, bad = tf.numpy_function(
        self._cached_batch, [step], [tf.uint8, tf.int32, tf.int32, tf.float32, tf.int32],
        stateful=False)
    return {'image': tf.ensure_shape(image, shape + list(self._fixed_shape)),
            'input_ids': tf.ensure_shape(ids, shape + [length]),
            'attention_mask': tf.ensure_shape(mask, shape + [length]),
            'view': tf.ensure_shape(view, shape + [self._views, 5]),
            'bad_records': tf.ensure_shape(bad, shape)}

  def _rows_step(self, step):
    view_type = tf.float32 if self._fixed_shape else tf.int64
    g, part, visit, serialized, caption_u, view = tf.numpy_function(
        self._rows, [step], [tf.int64, tf.int32, tf.int64, tf.string, tf.float64,
                             view_type], stateful=False)
    b = [self.local_batch_size]
    return {'g': tf.ensure_shape(g, b), 'part': tf.ensure_shape(part, b),
            'visit': tf.ensure_shape(visit, b), 'serialized': tf.ensure_shape(serialized, b),
            'caption_u': tf.ensure_shape(caption_u, b),
            'view': tf.ensure_shape(view, b + [self._views, 5 if self._fixed_shape else 2])}

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
    # The batches depend on (seed, global batch size, step) only: not on process_count.
    for key in ('seed', 'global_batch_size'):
      if key in state and state[key] != getattr(self, key):
        logging.warning('Restoring a data position saved with %s=%s into an iterator with '
                    '%s=%s: the batches will differ from an uninterrupted run.',
                    key, state[key], key, getattr(self, key))
    self._step = int(state['step'])
    self._iterator = None  # rebuilt lazily at the restored position
