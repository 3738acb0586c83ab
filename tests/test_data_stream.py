"""The training stream's guarantees: bad records replaced and counted, mixtures read as
specified and resumed exactly, resume free of the position."""

import io

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
  # tfds shuffles examples when writing: record r of the files is not example r.
  stored = [ex['captions'][0].decode() for ex in sources.read(
      it.parts[0].builder, 'train', ('image', 'captions'), with_image=False)
            .as_numpy_iterator()]
  bad = [stored.index(f'record {i}') for i in (GARBAGE, TRUNCATED)]
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
