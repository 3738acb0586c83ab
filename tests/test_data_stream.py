"""The training stream's guarantees: bad records replaced and counted, mixtures read as
specified and resumed exactly, resume free of the position."""

import io
import json

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from cookie_jax.data import defaults, order, pipeline, sources
from cookie_jax.data import tokenizer as tok_lib

RECORDS = 12
GARBAGE, TRUNCATED = 5, 8  # the records that do not decode


def _jpeg(i, size):
  rng = np.random.default_rng(i)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, size + (3,), np.uint8)).save(buf, 'JPEG')
  return buf.getvalue()


class _Corrupt(tfds.core.GeneratorBasedBuilder):
  """12 JPEGs with one caption each ('record i'); those in BAD do not decode: garbage
  bytes, or (TRUNCATED) the first third of a JPEG."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = None
  SHAPE = (None, None, 3)
  BAD = (GARBAGE, TRUNCATED)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=self.SHAPE, encoding_format='jpeg'),
        'captions': tfds.features.Sequence(tfds.features.Text())}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    size = (16, 16) if self.SHAPE[0] else (23, 30)
    for i in range(RECORDS):
      image = _jpeg(i, size)
      if i in self.BAD:
        image = image[:len(image) // 3] if i == TRUNCATED else b'this is not an image'
      yield i, {'image': image, 'captions': [f'record {i}']}


class CorruptPhotos(_Corrupt):
  pass


class CorruptTiles(_Corrupt):
  SHAPE = (16, 16, 3)


class BrokenPhotos(_Corrupt):
  BAD = tuple(range(RECORDS))


def _prepare(cls, data_dir):
  builder = cls(data_dir=data_dir)
  builder.download_and_prepare(file_format=sources.FILE_FORMAT)
  return builder


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('stream')
  for cls in (CorruptPhotos, CorruptTiles, BrokenPhotos):
    _prepare(cls, str(root / 'tfds'))
  vocab = root / 'vocab.txt'
  vocab.write_text('\n'.join(list(tok_lib.SPECIAL_TOKENS) + ['record'] + list('0123456789')
                             + [f'##{d}' for d in '0123456789']))
  return root


def _cfg(data_dir, name, **kw):
  cfg = defaults.data_config()
  cfg.update(dict(builder='tfds', tfds_name=name, tfds_text_key='captions',
                  data_dir=str(data_dir / 'tfds'), tokenizer=str(data_dir / 'vocab.txt'),
                  max_len=8, num_parallel_calls=2, **kw))
  return cfg


def _bad_indices(builder):
  """Where the bad examples sit in the files: tfds shuffles examples when writing."""
  stored = [c[0] for c in _captions(builder)]
  return [stored.index(f'record {i}') for i in (GARBAGE, TRUNCATED)]


def _expected(seed, positions, bad):
  """(records read, stand-ins used) per position, from the order's definition."""
  attempts = np.zeros(len(positions), np.int64)
  records = order.record(seed, 0, positions, RECORDS, attempts)
  while np.isin(records, bad).any():
    hit = np.isin(records, bad)
    attempts[hit] += 1
    records[hit] = order.record(seed, 0, positions[hit], RECORDS, attempts[hit])
  return records, attempts


@pytest.mark.parametrize('name, cache_mb', [('corrupt_photos', 0), ('corrupt_tiles', 0),
                                            ('corrupt_tiles', 64)])
def test_a_record_that_fails_to_decode_is_replaced_and_counted(data_dir, name, cache_mb):
  cfg = _cfg(data_dir, name, cache_mb=cache_mb)
  it = pipeline.TrainIterator(cfg, image_size=8, global_batch_size=4, seed=0, mesh=None)
  assert it._cache == bool(cache_mb)  # pylint: disable=protected-access
  steps = 9  # three epochs of 12 records
  batches = [next(it) for _ in range(steps)]
  stored = [c[0] for c in _captions(it.parts[0].builder)]
  bad = _bad_indices(it.parts[0].builder)
  records, attempts = _expected(0, np.arange(4 * steps), bad)
  assert all(b['image'].shape == (4, 8, 8, 3) for b in batches)  # never a smaller batch
  np.testing.assert_array_equal(np.concatenate([b['bad_records'] for b in batches]),
                                attempts)
  # Each epoch meets each bad record once: 2 replacements per epoch (more when a bad
  # record's stand-in is the other bad record).
  assert attempts.reshape(3, -1).sum(1).min() >= 2
  want = tok_lib.encode(pipeline.load_tokenizer(cfg), [stored[r] for r in records])
  np.testing.assert_array_equal(np.concatenate([b['input_ids'] for b in batches]),
                                want['input_ids'])
  assert not set(bad) & set(records.tolist())


def test_a_dataset_of_bad_records_stops_with_a_clear_error(data_dir):
  cfg = _cfg(data_dir, 'broken_photos')
  it = pipeline.TrainIterator(cfg, image_size=8, global_batch_size=4, seed=0, mesh=None)
  with pytest.raises(Exception, match=r'16 records in a row of broken_photos/train failed '
                                      r'to decode.*looks broken'):
    next(it)


def test_a_tfrecord_dataset_names_the_conversion(tmp_path):
  builder = CorruptPhotos(data_dir=str(tmp_path))
  builder.download_and_prepare(file_format='tfrecord')
  with pytest.raises(ValueError, match=r'stored as .*tfrecord.*tfds convert_format '
                                       r'--dataset_version_dir=.*array_record'):
    sources.data_source(builder, 'train')


# -- mixtures --


def _synthetic(data_dir, **sizes):
  cfg = defaults.data_config()
  cfg.update(dict(data_dir=str(data_dir / 'tfds'), num_parallel_calls=2))
  cfg.synthetic.update(dict(train_images=96, eval_images=8, **sizes))
  return cfg


def _captions(builder):
  return [[c.decode() for c in ex['captions']] for ex in sources.read(
      builder, 'train', ('image', 'captions'), with_image=False).as_numpy_iterator()]


@pytest.mark.parametrize('cache_mb', [1024, 0])
def test_a_mixture_reads_the_rows_its_order_names_and_resumes_exactly(data_dir, cache_mb):
  cfg = _synthetic(data_dir)
  cfg.cache_mb = cache_mb
  # The base dataset (96 images) at weight 3, one of 40 other images at weight 1.
  cfg.mixture = (({}, 3.0), ({'synthetic': {'seed': 1, 'train_images': 40}}, 1.0))
  kw = dict(image_size=16, global_batch_size=16, seed=2, mesh=None)
  it = pipeline.TrainIterator(cfg, **kw)
  batches = [next(it) for _ in range(8)]
  # What order.py says each row reads: dataset, record, caption.
  g = np.arange(8 * 16)
  parts, visits = order.Mixture([3, 1], 2).locate(g)
  assert 0.6 < (parts == 0).mean() < 0.9 and (parts == 1).any()
  stored = [_captions(p.builder) for p in it.parts]
  sizes = [96, 40]
  u = order.uniforms(2, g, 0, 1)[:, 0]
  texts = []
  for j, k, x in zip(parts, visits, u):
    caps = stored[j][int(order.record(2, j, k, sizes[j]))]
    texts.append(caps[min(int(np.floor(x * len(caps))), len(caps) - 1)])
  want = tok_lib.encode(it.tokenizer, texts)['input_ids']
  np.testing.assert_array_equal(np.concatenate([b['input_ids'] for b in batches]), want)
  resumed = pipeline.TrainIterator(cfg, start_step=5, **kw)
  for full in batches[5:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], full[k]) for k in full)


# -- evaluation on another dataset, and the training loop's count of bad records --


@pytest.mark.slow  # CI time: a train run; test_a_record_that_fails_to_decode_is_replaced_and_counted stays
def test_train_counts_bad_records_and_validates_on_eval_data(data_dir, tmp_path, caplog):
  from cookie_jax import train  # pylint: disable=g-import-not-at-top
  from cookie_jax.config import ConfigError, default_config  # pylint: disable=g-import-not-at-top
  config = default_config('tiny')
  config.model.vision.image_size = 16
  config.data = _cfg(data_dir, 'corrupt_photos')
  config.model.text.vocab_size = 64
  config.train.batch_size = 8
  config.train.steps = 3
  config.train.log_every = 3
  config.train.progress_bar = False
  config.eval.batch_size = 8
  config.eval.every = 3
  # corrupt_photos has only 'train': validation and the test are off, said once each.
  eval_splits = train._eval_splits  # pylint: disable=protected-access
  with caplog.at_level('WARNING'):
    assert eval_splits(pipeline, config) == (False, False)
  said = [r.getMessage() for r in caplog.records if ' is off: ' in r.getMessage()]
  assert len(said) == 2 and "has no split 'val'" in said[0], said
  # With another dataset to validate on, validation and the test read it.
  config.eval.data = {'builder': 'synthetic', 'synthetic': {'train_images': 96,
                                                             'eval_images': 8}}
  assert eval_splits(pipeline, config) == (True, True)
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  rows = [json.loads(l) for l in open(f'{workdir}/metrics.jsonl')]
  (row,) = [r for r in rows if 'train/loss' in r]
  _, attempts = _expected(config.seed, np.arange(24),
                          _bad_indices(CorruptPhotos(data_dir=str(data_dir / 'tfds'))))
  assert row['train/bad_records'] == attempts.sum() > 0
  assert any('val/rsum' in r for r in rows) and result['test']['rsum'] >= 0
  config.eval.data = {'builder': 'synthetic', 'val_split': 'nope'}
  with pytest.raises(ConfigError, match=r"config.eval.data: synthetic has no split 'nope'"):
    eval_splits(pipeline, config)
