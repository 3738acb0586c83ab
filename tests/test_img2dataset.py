"""The img2dataset builder: tar and parquet shards with every kind of bad sample, built
locally (and on Beam's DirectRunner where apache-beam is installed), exact skip counts,
upright images within max_side, bad folders, and 5 training steps through the launcher."""

import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from cookie_jax.config import ConfigError
from cookie_jax.data import defaults, sources
from cookie_jax.data.builders import img2dataset, webshards
from cookie_jax.data import tokenizer as tok_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_SIDE = 48
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _encode(img: Image.Image, fmt='JPEG', **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _halves(w, h, first, second):
  """Left half `first`, right half `second`: which way up a stored image is shows."""
  arr = np.zeros((h, w, 3), np.uint8)
  arr[:, :w // 2], arr[:, w // 2:] = first, second
  return Image.fromarray(arr)


def _exif(orientation: int) -> Image.Exif:
  exif = Image.Exif()
  exif[0x0112] = orientation  # 6: displayed rotated 90 degrees clockwise
  return exif


def _samples():
  """[(shard, key, image bytes | None, caption bytes | None)] and the expected skips."""
  rng = np.random.default_rng(0)
  photo = lambda h, w: _encode(Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)))
  exif = _exif(6)
  truncated = photo(64, 64)
  shard0 = [
      ('000000000', photo(60, 100), b'a big photo, resized'),
      ('000000001', photo(30, 40), b'a small photo kept as it is'),
      ('000000002', _encode(_halves(80, 40, RED, BLUE), exif=exif, quality=95),
       b'stored 80 wide 40 high, EXIF orientation 6'),
      ('000000003', _encode(_halves(40, 20, BLUE, RED), 'PNG'), b'a PNG named .jpg'),
      ('000000004', _encode(Image.new('L', (20, 30), 100)), b'a grayscale JPEG'),
      ('000000005', truncated[:len(truncated) // 2], b'a truncated JPEG'),
      ('000000006', photo(20, 20), None),  # no caption
      ('000000007', photo(20, 20), b'   '),  # empty after stripping
  ]
  shard1 = [
      ('000010000', b'this is not an image', b'garbage bytes'),
      ('000010001', None, b'a caption whose image failed to download'),
      ('000000001', photo(24, 24), b'the same key again: a duplicate'),
      ('000010002', _encode(Image.new('RGBA', (30, 20), BLUE + (255,)), 'PNG'),
       b'an RGBA PNG'),
      ('000010003', photo(20, 20), b'caption with a \xff\xfe bad byte'),
  ]
  skipped = {'corrupt_image': 2, 'no_caption': 1, 'empty_caption': 1, 'no_image': 1,
             'duplicate_key': 1, 'bad_utf8': 1}
  return [(0, *s) for s in shard0] + [(1, *s) for s in shard1], skipped


def write_tars(root: pathlib.Path):
  """img2dataset's webdataset layout, with its metadata files beside the tars."""
  samples, skipped = _samples()
  root.mkdir(parents=True)
  for shard in (0, 1):
    with tarfile.open(root / f'{shard:05d}.tar', 'w') as tar:
      for _, key, image, caption in (s for s in samples if s[0] == shard):
        ext = 'png' if key == '000010002' else 'jpg'
        meta = json.dumps({'url': f'http://x/{key}.{ext}', 'key': key}).encode()
        for name, data in ((f'{key}.{ext}', image), (f'{key}.txt', caption),
                           (f'{key}.json', meta)):
          if data is not None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({'key': [s[1] for s in samples if s[0] == shard],
                             'status': ['success'] * sum(s[0] == shard for s in samples)}),
                   root / f'{shard:05d}.parquet')
    (root / f'{shard:05d}_stats.json').write_text('{}')
  return skipped


def write_parquets(root: pathlib.Path):
  """img2dataset's --output_format parquet layout: the same samples, minus the caption
  with invalid UTF-8 (a parquet string column cannot hold one)."""
  samples, skipped = _samples()
  root.mkdir(parents=True)
  skipped = dict(skipped)
  del skipped['bad_utf8']
  for shard in (0, 1):
    rows = [s for s in samples if s[0] == shard and s[1] != '000010003']
    pq.write_table(pa.table({
        'key': [s[1] for s in rows], 'jpg': pa.array([s[2] for s in rows], pa.binary()),
        'caption': [None if s[3] is None else s[3].decode() for s in rows],
        'url': [f'http://x/{s[1]}' for s in rows],
        'status': ['success' if s[2] else 'failed_to_download' for s in rows],
    }), root / f'{shard:05d}.parquet', row_group_size=3)
  return skipped


def _cfg(manual_dir, data_dir, **img2dataset_kw):
  cfg = defaults.data_config()
  cfg.update(dict(builder='img2dataset', manual_dir=str(manual_dir), data_dir=str(data_dir)))
  cfg.img2dataset.max_side = MAX_SIDE
  cfg.img2dataset.update(img2dataset_kw)
  return cfg


def in_order(builder, split='train') -> list:
  """The stored records in index order, the image still encoded."""
  source = builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


def records(builder, split='train') -> dict:
  return {ex['key'].decode(): ex for ex in in_order(builder, split)}


def _pixels(ex):
  return np.asarray(Image.open(io.BytesIO(ex['image'])))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """The tar folder built with 2 worker processes, the parquet folder with 1."""
  root = tmp_path_factory.mktemp('img2dataset')
  tar_skips, pq_skips = write_tars(root / 'tars'), write_parquets(root / 'parquet')
  tar = sources.get_builder(_cfg(root / 'tars', root / 'tfds', workers=2))
  par = sources.get_builder(_cfg(root / 'parquet', root / 'tfds', workers=1))
  return root, (tar, tar_skips), (par, pq_skips)


def test_skips_are_counted_exactly_with_their_places(built):
  _, (tar, tar_skips), (par, pq_skips) = built
  assert tar.info.metadata['skipped'] == tar_skips
  assert par.info.metadata['skipped'] == pq_skips
  assert tar.info.metadata['skipped_examples'] == {
      'bad_utf8': ['00001.tar:000010003'], 'corrupt_image': ['00000.tar:000000005',
                                                             '00001.tar:000010000'],
      'duplicate_key': ['00001.tar:000000001'], 'empty_caption': ['00000.tar:000000007'],
      'no_caption': ['00000.tar:000000006'], 'no_image': ['00001.tar:000010001']}
  assert tar.info.metadata['source'] == {'format': 'tar', 'shards': 2}
  assert par.info.metadata['source'] == {'format': 'parquet', 'shards': 2}
  assert tar.info.splits['train'].num_examples == 6
  assert tar.info.file_format.value == 'array_record'


def test_images_are_upright_rgb_within_max_side_and_captions_kept(built):
  _, (tar, _), _ = built
  ex = records(tar)
  assert sorted(ex) == ['000000000', '000000001', '000000002', '000000003', '000000004',
                        '000010002']
  for e in ex.values():
    px = _pixels(e)
    assert px.ndim == 3 and px.shape[2] == 3 and max(px.shape[:2]) <= MAX_SIDE
  assert _pixels(ex['000000000']).shape == (29, 48, 3)  # 60x100 -> longer side 48
  assert (ex['000000000']['original_height'], ex['000000000']['original_width']) == (60, 100)
  # The first of the two samples keyed 000000001 is kept, byte for byte (no resize).
  assert list(ex['000000001']['captions']) == [b'a small photo kept as it is']
  assert ex['000000001']['image'] == _samples()[0][1][2]
  # Stored 80 wide x 40 high with orientation 6: upright it is 40 wide x 80 high, red on
  # top; resized to 24 x 48.
  up = _pixels(ex['000000002']).astype(int)
  assert up.shape == (48, 24, 3)
  assert (ex['000000002']['original_height'], ex['000000002']['original_width']) == (80, 40)
  np.testing.assert_allclose(up[5, 12], RED, atol=12)
  np.testing.assert_allclose(up[42, 12], BLUE, atol=12)
  np.testing.assert_allclose(_pixels(ex['000000003']).astype(int)[10, 5], BLUE, atol=12)
  np.testing.assert_allclose(_pixels(ex['000000004']).astype(int)[10, 10], [100] * 3, atol=3)
  np.testing.assert_allclose(_pixels(ex['000010002']).astype(int)[10, 10], BLUE, atol=12)
  assert ex['000000003']['url'] == b'http://x/000000003.jpg'


def test_tar_and_parquet_forms_store_the_same_examples(built):
  _, (tar, _), (par, _) = built
  a, b = records(tar), records(par)
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key]['image'] == b[key]['image'], key
    assert list(a[key]['captions']) == list(b[key]['captions'])


def test_each_setting_builds_its_own_copy_and_val_is_a_hash_of_the_key(built):
  root, _, (par, _) = built
  other = sources.get_builder(_cfg(root / 'parquet', root / 'tfds', val_fraction=0.5,
                                   workers=1))
  assert other.data_path != par.data_path and par.is_prepared()
  assert other.info.metadata['skipped'] == par.info.metadata['skipped']
  train, val = records(other, 'train'), records(other, 'val')
  assert sorted(train.keys() | val.keys()) == sorted(records(par))
  assert all(webshards.split_of(k, 0.5) == 'val' for k in val) and val and train
  assert all(webshards.split_of(k, 0.5) == 'train' for k in train)
  keys = [f'{i:09d}' for i in range(10_000)]
  assert 950 <= sum(webshards.split_of(k, 0.1) == 'val' for k in keys) <= 1050


def test_a_built_copy_opens_by_its_name_without_the_shards(built):
  root, (tar, _), _ = built
  corpus = tar.builder_config.name.rsplit('_side', 1)[0]  # manual_dir's name and hash
  cfg = _cfg('', root / 'tfds', name=corpus)
  opened = sources.get_builder(cfg)
  assert opened.data_path == tar.data_path
  assert opened.info.splits['train'].num_examples == 6


def test_bad_folders_name_the_path_and_the_layout(tmp_path):
  data_dir = tmp_path / 'tfds'
  with pytest.raises(FileNotFoundError, match=r"manual_dir='.*nowhere': folder not found"):
    sources.get_builder(_cfg(tmp_path / 'nowhere', data_dir))
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'notes.md').write_text('x')
  with pytest.raises(FileNotFoundError, match=r"(?s)no \*\.tar or \*\.parquet shards \(first "
                                              r"entries: \['notes.md'\]\).*--output_format"):
    sources.get_builder(_cfg(tmp_path / 'empty', data_dir))
  # A webdataset folder without its tars: only img2dataset's metadata parquet is left.
  (tmp_path / 'meta').mkdir()
  pq.write_table(pa.table({'key': ['0'], 'caption': ['c']}), tmp_path / 'meta' / '00000.parquet')
  with pytest.raises(webshards.ShardLayoutError,
                     match=r"(?s)meta/00000.parquet: its columns \['key', 'caption'\] lack an "
                           r"image column 'jpg'.*are the .tar shards missing"):
    sources.get_builder(_cfg(tmp_path / 'meta', data_dir))
  (tmp_path / 'nocaps').mkdir()
  with tarfile.open(tmp_path / 'nocaps' / '00000.tar', 'w') as tar:
    data = _encode(Image.new('RGB', (8, 8)))
    info = tarfile.TarInfo('000000000.jpg')
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
  with pytest.raises(webshards.ShardLayoutError,
                     match=r"nocaps/00000.tar: the tar holds images but not one \{key\}.txt "
                           r'caption; run img2dataset with --caption_col'):
    sources.get_builder(_cfg(tmp_path / 'nocaps', data_dir, workers=1))
  with pytest.raises(ValueError, match=r'config.data.img2dataset.quality=0: JPEG quality'):
    defaults.validate_data_config(_cfg(tmp_path, data_dir, quality=0))


def test_a_tar_that_breaks_off_keeps_what_came_before(tmp_path):
  write_tars(tmp_path / 'src')
  data = (tmp_path / 'src' / '00000.tar').read_bytes()
  (tmp_path / 'src' / '00000.tar').write_bytes(data[:len(data) * 2 // 3])
  examples, skips = webshards.shard_examples(0, 'tar', str(tmp_path / 'src' / '00000.tar'),
                                             webshards.Settings(MAX_SIDE, 95), 'train')
  assert [k for k, _, _ in examples] == ['000000000', '000000001', '000000002',
                                         '000000003', '000000004'][:len(examples)]
  assert skips.counts['truncated_shard'] == 1 and len(examples) >= 3


def test_beam_options_need_img2dataset_and_apache_beam(tmp_path):
  cfg = _cfg(tmp_path, tmp_path)
  cfg.builder = 'karpathy'
  with pytest.raises(ConfigError, match=r"builder='karpathy': only img2dataset folders"):
    sources.build(cfg, 'runner=DirectRunner')
  if importlib.util.find_spec('apache_beam') is None:
    with pytest.raises(ConfigError, match=r'needs apache-beam: pip install -e "\.\[beam\]"'):
      sources.build(_cfg(tmp_path, tmp_path), 'runner=DirectRunner')


@pytest.mark.slow
def test_beam_direct_runner_builds_the_same_dataset(built, tmp_path, monkeypatch):
  """Needs apache-beam (`pip install -e .[beam]`, see docs/data.md)."""
  beam = pytest.importorskip('apache_beam')
  root, (tar, _), _ = built

  def local_build(*args):
    raise AssertionError('the local build ran, not Beam')

  monkeypatch.setattr(img2dataset.Img2dataset, '_generate_examples', local_build)
  options = beam.options.pipeline_options.PipelineOptions(
      ['--runner=DirectRunner', '--direct_num_workers=1'])
  on_beam = img2dataset.prepare(_cfg(root / 'tars', tmp_path), str(tmp_path), options)
  assert on_beam.info.metadata['skipped'] == tar.info.metadata['skipped']
  assert on_beam.info.metadata['skipped_examples'] == tar.info.metadata['skipped_examples']
  local, remote = records(tar), records(on_beam)
  assert sorted(local) == sorted(remote)
  for key, ex in local.items():
    for feature, value in ex.items():
      np.testing.assert_array_equal(value, remote[key][feature], err_msg=f'{key}/{feature}')
  order = lambda b: [ex['key'] for ex in in_order(b)]
  assert order(tar) == order(on_beam)  # tfds orders both by the hash of the key


@pytest.mark.slow  # CI time: a train run; the builder tests on the same folder stay
def test_launcher_trains_5_steps_on_the_built_folder(built, tmp_path):
  root, (tar, _), _ = built
  vocab = tmp_path / 'vocab.txt'
  words = sorted({w for s in _samples()[0] if s[3] for w in s[3].decode(errors='ignore')
                  .lower().replace(',', ' ').split()})
  vocab.write_text('\n'.join(list(tok_lib.SPECIAL_TOKENS) + words))
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  out = subprocess.run(
      [sys.executable, str(ROOT / 'launch' / 'train.py'), '--config=configs/base.py:tiny',
       f'--workdir={tmp_path / "run"}', '--config.data.builder=img2dataset',
       f'--config.data.manual_dir={root / "tars"}', f'--config.data.data_dir={root / "tfds"}',
       f'--config.data.img2dataset.max_side={MAX_SIDE}', '--config.data.img2dataset.workers=2',
       f'--config.data.tokenizer={vocab}', '--config.data.max_len=12',
       '--config.model.vision.image_size=16', '--config.train.batch_size=4',
       '--config.train.steps=5', '--config.train.log_every=1', '--config.eval.every=0',
       '--config.eval.test_at_end=False', '--config.train.progress_bar=False'],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  losses = {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}
  assert sorted(losses) == [1, 2, 3, 4, 5] and all(np.isfinite(list(losses.values())))


def test_orientation_from_img2datasets_metadata_is_applied_once(tmp_path):
  """img2dataset's default run decodes with OpenCV (EXIF ignored), re-encodes without EXIF
  and keeps the orientation in its metadata; with --disable_all_reencoding (or a JPEG it
  need not resize) the bytes keep their EXIF, and the metadata names it as well. Either
  way the stored photo is upright, turned once, and its original size is the upright's."""
  def exif_json(name):  # the metadata's `exif` as img2dataset writes it: exifread, JSON
    return json.dumps({'Image Orientation': name, 'EXIF ExifImageWidth': '80'})
  sideways = _halves(80, 40, RED, BLUE)  # the stored pixel grid: 80 wide, 40 high
  tagged = lambda o: _encode(sideways, exif=_exif(o), quality=95)
  # (key, bytes, metadata, red half on top?) -- 6 turns clockwise, 8 counter-clockwise.
  cases = [
      ('reencoded6', _encode(sideways, quality=95), exif_json('Rotated 90 CW'), True),
      ('reencoded8', _encode(sideways, quality=95), exif_json('Rotated 90 CCW'), False),
      ('kept6', tagged(6), exif_json('Rotated 90 CW'), True),
      ('kept8', tagged(8), exif_json('Rotated 90 CCW'), False),
  ]
  meta = lambda key, exif: {'url': f'http://x/{key}.jpg', 'key': key, 'status': 'success',
                            'width': 80, 'height': 40, 'original_width': 80,
                            'original_height': 40, 'exif': exif}
  with tarfile.open(tmp_path / '00000.tar', 'w') as tar:
    for key, image, exif, _ in cases:
      for name, data in ((f'{key}.jpg', image), (f'{key}.txt', b'a photo'),
                         (f'{key}.json', json.dumps(meta(key, exif), indent=4).encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  (tmp_path / 'pq').mkdir()
  rows = [dict(meta(key, exif), jpg=image, caption='a photo') for key, image, exif, _ in cases]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / 'pq' / '00000.parquet')
  for kind, path in (('tar', tmp_path / '00000.tar'),
                     ('parquet', tmp_path / 'pq' / '00000.parquet')):
    examples, skips = webshards.shard_examples(0, kind, str(path),
                                               webshards.Settings(MAX_SIDE, 95), 'train')
    assert not skips.counts and [k for k, _, _ in examples] == [c[0] for c in cases]
    for (key, _, _, red_on_top), (_, _, ex) in zip(cases, examples):
      up = _pixels(ex).astype(int)
      assert up.shape == (48, 24, 3), (kind, key)  # upright 40 x 80, resized to 24 x 48
      top, bottom = (RED, BLUE) if red_on_top else (BLUE, RED)
      np.testing.assert_allclose(up[5, 12], top, atol=12, err_msg=f'{kind} {key}')
      np.testing.assert_allclose(up[42, 12], bottom, atol=12, err_msg=f'{kind} {key}')
      assert (ex['original_height'], ex['original_width']) == (80, 40), (kind, key)
  # Every orientation name exifread prints, and what carries none.
  for name, value in webshards.EXIFREAD_ORIENTATIONS.items():
    assert webshards.metadata_orientation({'exif': exif_json(name)}) == value
  for exif in (None, '', 'not json', json.dumps({'Image Make': 'x'}), exif_json('9')):
    assert webshards.metadata_orientation({'exif': exif}) == 1
  assert webshards.metadata_orientation({}) == 1
