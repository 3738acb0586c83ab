"""The data room: builders, tokenizer, training stream, resume and evaluation passes."""

import io
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from cookie_jax import sharding
from cookie_jax.data import defaults, pipeline, sources
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.builders import karpathy, scenes

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN, EVAL = 96, 20  # synthetic images; 3 train and 5 eval captions each


def _synthetic_cfg(data_dir):
  cfg = defaults.data_config()
  cfg.data_dir = str(data_dir)
  cfg.synthetic.train_images = TRAIN
  cfg.synthetic.eval_images = EVAL
  cfg.num_parallel_calls = 2
  return cfg


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
  cfg = _synthetic_cfg(tmp_path_factory.mktemp('tfds'))
  sources.get_builder(cfg)
  return cfg


def _save(img: Image.Image, fmt):
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def _jpeg(arr):
  return _save(Image.fromarray(arr), 'JPEG')


class _Records(logging.Handler):

  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def _write_karpathy(root):
  """A COCO-layout folder: good and bad images, and every kind of bad caption."""
  rng = np.random.default_rng(0)
  (root / 'train2014').mkdir(parents=True)
  (root / 'val2014').mkdir()
  files = {}
  for i in range(8):
    files[f'train2014/rgb{i}.jpg'] = _jpeg(rng.integers(0, 255, (30 + i, 40, 3), np.uint8))
  files['train2014/gray.jpg'] = _jpeg(np.full((24, 32), 100, np.uint8))
  pal = Image.new('P', (32, 24))
  pal.putpalette([255, 0, 0] + [0, 0, 0] * 255)
  files['train2014/palette.png'] = _save(pal, 'PNG')
  files['train2014/cmyk.jpg'] = _save(Image.new('CMYK', (32, 24), (0, 255, 255, 0)), 'JPEG')
  files['train2014/deep16.png'] = _save(
      Image.fromarray(np.full((24, 32), 128 * 257, np.uint16)), 'PNG')
  files['train2014/alpha.png'] = _save(Image.new('RGBA', (32, 24), (0, 0, 255, 0)), 'PNG')
  good = _jpeg(rng.integers(0, 255, (64, 64, 3), np.uint8))
  files['train2014/truncated.jpg'] = good[:len(good) // 2]
  files['train2014/garbage.jpg'] = b'this is not an image'
  for i in range(6):
    files[f'val2014/v{i}.jpg'] = _jpeg(np.full((20, 28, 3), 10 * i, np.uint8))
  for name, data in files.items():
    (root / name).write_bytes(data)

  def entry(path, split, caps):
    folder, name = path.split('/')
    return {'filepath': folder, 'filename': name, 'split': split,
            'sentences': [{'raw': c, 'sentid': j} for j, c in enumerate(caps)]}

  five = lambda tag: [f'{tag} caption number {j}' for j in range(5)]
  images = [entry(f'train2014/rgb{i}.jpg', 'train', five(f'rgb {i}')) for i in range(6)]
  images[0]['sentences'] += [{'raw': 'a sixth caption', 'sentid': 5},
                             {'raw': 'and a seventh one', 'sentid': 6}]
  images[1]['sentences'].append({'raw': '   ', 'sentid': 9})  # empty after stripping
  images[2]['sentences'].append({'raw': 'BADUTF8', 'sentid': 10})  # raw bytes, below
  images += [entry('train2014/rgb6.jpg', 'restval', five('restval a')),
             entry('train2014/rgb7.jpg', 'restval', five('restval b'))]
  for name in ('gray.jpg', 'palette.png', 'cmyk.jpg', 'deep16.png', 'alpha.png'):
    images.append(entry(f'train2014/{name}', 'train', five(name)))
  images += [entry('train2014/truncated.jpg', 'train', five('truncated')),
             entry('train2014/garbage.jpg', 'train', five('garbage')),
             entry('train2014/missing.jpg', 'train', five('missing')),
             entry('train2014/rgb5.jpg', 'train', ['', ' '])]  # no usable caption
  images += [entry(f'val2014/v{i}.jpg', 'val' if i < 3 else 'test', five(f'eval {i}'))
             for i in range(6)]
  text = json.dumps({'images': images, 'dataset': 'coco'}).encode()
  # JSON cannot hold invalid UTF-8, but real files do: splice raw bytes into the text.
  (root / 'dataset_coco.json').write_bytes(text.replace(b'BADUTF8', b'bad \xff\xfe text'))


@pytest.fixture(scope='module')
def coco(tmp_path_factory, synth):
  root = tmp_path_factory.mktemp('coco')
  _write_karpathy(root)
  vocab = tmp_path_factory.mktemp('tok') / 'vocab.txt'
  words = 'a an and the caption number sixth seventh one rgb eval restval gray'.split()
  vocab.write_text('\n'.join(list(tok_lib.SPECIAL_TOKENS) + words + list('0123456789')))
  cfg = defaults.data_config()
  cfg.update(dict(builder='karpathy', manual_dir=str(root), data_dir=synth.data_dir,
                  tokenizer=str(vocab), crop_scale=(0.5, 1.0), flip=True,
                  train_split='train+restval'))
  records = _Records()
  logger = logging.getLogger('absl')  # the builders log through absl
  logger.addHandler(records)
  try:
    builder = sources.get_builder(cfg)
  finally:
    logger.removeHandler(records)
  return cfg, builder, records.messages


# -- builders --


def test_synthetic_builder_sizes_captions_and_vocab(synth):
  builder = sources.get_builder(synth)
  splits = builder.info.splits
  assert [splits[s].num_examples for s in ('train', 'val', 'test')] == [TRAIN, EVAL, EVAL]
  val = list(sources.read(builder, 'val', ('image', 'captions')).as_numpy_iterator())
  assert all(len(ex['captions']) == 5 and len(set(ex['captions'])) == 5 for ex in val)
  image = np.asarray(Image.open(io.BytesIO(val[0]['image'])))
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  vocab = builder.info.metadata['vocab']
  assert 40 < len(vocab) <= 1024 and vocab[:4] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]']
  assert pipeline.tokenizer_vocab_size(synth) == len(vocab)
  # Generation is a pure function of (seed, split, index).
  assert scenes.example(0, 'val', 7, 64, 5)[:2] == scenes.example(0, 'val', 7, 64, 5)[:2]


def test_synthetic_vocabularies_are_the_same_bytes_on_every_build(tmp_path):
  """Each set built twice, in two folders: the stored vocabularies are identical.

  Hugging Face's trainer gave another vocabulary on every build (its ties went by
  hash-map order); since 1.1.0 both builders use `tok_lib.train_wordpiece`."""
  stored = {'synthetic': [], 'synthetic_video': []}
  for folder in ('first', 'second'):
    cfg = _synthetic_cfg(tmp_path / folder)
    cfg.synthetic_video.update(dict(train_clips=16, eval_clips=4))
    for builder in stored:
      cfg.builder = builder
      info = sources.get_builder(cfg).info
      assert str(info.version) == '1.2.0'
      stored[builder].append((pathlib.Path(info.data_dir) / 'metadata.json').read_bytes())
  for builder, (first, second) in stored.items():
    assert first == second, builder
    vocab = json.loads(first)['vocab']
    assert vocab[:5] == list(tok_lib.SPECIAL_TOKENS) and len(vocab) == len(set(vocab))
    assert {'red', 'blue', 'the'} <= set(vocab)  # whole words of both sets' captions


def test_wordpiece_training_ignores_order_and_hash_seed_and_breaks_ties_by_token():
  texts = ['ab cd', 'cd ab', 'abc']
  # Pairs by count: a+##b 3 (ab twice, abc), c+##d 2, then ab+##c 1.
  vocab = tok_lib.train_wordpiece(texts, 100)
  assert vocab == [*tok_lib.SPECIAL_TOKENS, 'a', 'c', '##b', '##c', '##d', 'ab', 'cd',
                   'abc']
  assert tok_lib.train_wordpiece(reversed(texts), 100) == vocab
  # A tie: 'xy' and 'pq' occur once each; the merge that sorts first is made first.
  assert tok_lib.train_wordpiece(['xy pq'], 100)[-2:] == ['pq', 'xy']
  assert tok_lib.train_wordpiece(texts, 11) == vocab[:11]  # stops at vocab_size
  # Python's string hashing is seeded per process: other seeds, the same vocabulary.
  code = ('import json, sys; from cookie_jax.data.builders import scenes; '
          'from cookie_jax.data.tokenizer import train_wordpiece; '
          "rows = scenes.examples(0, 'train', 16, 3, 0, 300); "
          'print(json.dumps(train_wordpiece([c for r in rows for c in r[2]], 1024)))')
  outs = [subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=dict(os.environ, PYTHONHASHSEED=seed)
                         ).stdout for seed in ('1', '2')]
  assert outs[0] == outs[1] and len(json.loads(outs[0])) > 100


def test_synthetic_scenes_need_composition_and_captions_are_true():
  swapped = 0
  for i in range(0, 400, 2):
    a, b = scenes.sample_scene(0, 'train', i), scenes.sample_scene(0, 'train', i + 1)
    if a.kind == 'pair' and b.relation == a.relation:
      (a1, a2), (b1, b2) = a.objects, b.objects
      # The twin uses the same words with the binding swapped.
      if (a1.colour, a2.colour) == (b2.colour, b1.colour) and a1.shape == b1.shape:
        swapped += 1
    for s in (a, b):
      if s.kind == 'pair':
        p, q = s.objects
        dx, dy = q.x - p.x, q.y - p.y
        expect = {'left': dx > 0.39, 'right': dx < -0.39, 'above': dy > 0.39,
                  'below': dy < -0.39}[s.relation]
        assert expect and min(abs(dx), abs(dy)) < 0.15, (i, s)
      if s.kind == 'count':
        assert len(s.objects) in (s.count, s.count + 1)
  assert swapped >= 10
  caps = scenes.captions(scenes.sample_scene(0, 'train', 0), 7, np.random.default_rng(0))
  assert len(set(caps)) == 7


def test_karpathy_builder_splits_conversions_and_skips(coco):
  cfg, builder, messages = coco
  splits = builder.info.splits
  assert {s: splits[s].num_examples for s in splits} == {
      'train': 6 + 5, 'restval': 2, 'val': 3, 'test': 3}
  skipped = builder.info.metadata['skipped']
  assert skipped == {'missing': 1, 'corrupt': 2, 'empty_caption': 3, 'bad_utf8': 1,
                     'no_caption': 1}
  text = '\n'.join(messages)
  for needle in ('missing.jpg', 'truncated.jpg', 'garbage.jpg', 'skipped 2 corrupt',
                 'skipped 1 captions that are not valid UTF-8', 'skipped 3 empty'):
    assert needle in text, needle
  images = {ex['filename'].decode(): ex for ex in builder.as_data_source('train')}
  assert len(images['train2014/rgb0.jpg']['captions']) == 7  # COCO's 5-7 all kept
  assert len(images['train2014/rgb1.jpg']['captions']) == 5
  assert b'rgb 2 caption number 0' in images['train2014/rgb2.jpg']['captions']
  px = {k.split('/')[1]: v['image'][12, 16].astype(int) for k, v in images.items()}
  assert all(v['image'].shape[-1] == 3 for v in images.values())
  np.testing.assert_allclose(px['gray.jpg'], [100] * 3, atol=3)
  np.testing.assert_allclose(px['palette.png'], [255, 0, 0], atol=3)
  np.testing.assert_allclose(px['cmyk.jpg'], [255, 0, 0], atol=3)
  np.testing.assert_allclose(px['deep16.png'], [128] * 3, atol=3)  # scaled, not clipped
  np.testing.assert_allclose(px['alpha.png'], [255] * 3, atol=3)  # transparent -> white


def test_karpathy_missing_folder_and_json_name_the_expected_place(tmp_path):
  cfg = defaults.data_config()
  cfg.update(dict(builder='karpathy', manual_dir=str(tmp_path / 'nope'),
                  data_dir=str(tmp_path), karpathy_dataset='flickr30k'))
  with pytest.raises(FileNotFoundError, match=r"manual_dir=.*nope.*dataset_flickr30k.json"):
    sources.get_builder(cfg)
  (tmp_path / 'nope').mkdir()
  with pytest.raises(FileNotFoundError, match=r'nope/dataset_flickr30k.json not found'):
    sources.get_builder(cfg)
  # Flickr30K's layout: no `filepath`, images in flickr30k-images/.
  (tmp_path / 'nope' / 'flickr30k-images').mkdir()
  images = []
  for i, split in enumerate(['train', 'train', 'val', 'test']):
    (tmp_path / 'nope' / 'flickr30k-images' / f'{i}.jpg').write_bytes(
        _jpeg(np.full((8, 8, 3), i, np.uint8)))
    images.append({'filename': f'{i}.jpg', 'split': split, 'imgid': i,
                   'sentences': [{'raw': f'image {i}'}]})
  (tmp_path / 'nope' / 'dataset_flickr30k.json').write_text(json.dumps({'images': images}))
  splits = sources.get_builder(cfg).info.splits
  assert {s: splits[s].num_examples for s in splits} == {'train': 2, 'val': 1, 'test': 1}


def test_a_built_karpathy_dataset_opens_without_its_manual_dir(coco, tmp_path):
  cfg, built, _ = coco
  cfg = cfg.copy_and_resolve_references()
  cfg.manual_dir = ''  # e.g. on a pod: built once into a gs:// data_dir, the images elsewhere
  defaults.validate_data_config(cfg)
  opened = sources.get_builder(cfg)
  assert opened.data_path == built.data_path
  assert ({s: opened.info.splits[s].num_examples for s in opened.info.splits} ==
          {s: built.info.splits[s].num_examples for s in built.info.splits})
  # Not built there: building it needs the folder, and the error names both keys.
  cfg.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"config.data.manual_dir='': "
                     r"karpathy_captions/coco/1.1.0 is not built in config.data.data_dir="):
    sources.get_builder(cfg)


def test_karpathy_stores_exif_rotated_jpegs_upright(tmp_path):
  """Stored 80 wide x 40 high (left red, right blue) with EXIF orientation 6: shown
  rotated 90 degrees clockwise, so upright it is 40 wide x 80 high with red on top."""
  (tmp_path / 'src' / 'flickr30k-images').mkdir(parents=True)
  arr = np.zeros((40, 80, 3), np.uint8)
  arr[:, :40], arr[:, 40:] = (255, 0, 0), (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='JPEG', exif=exif, quality=95)
  (tmp_path / 'src' / 'flickr30k-images' / 'rotated.jpg').write_bytes(buf.getvalue())
  (tmp_path / 'src' / 'flickr30k-images' / 'plain.jpg').write_bytes(_jpeg(arr))
  images = [{'filename': f'{name}.jpg', 'split': 'train', 'imgid': i,
             'sentences': [{'raw': f'image {name}'}]} for i, name in enumerate(['rotated',
                                                                                'plain'])]
  (tmp_path / 'src' / 'dataset_flickr30k.json').write_text(json.dumps({'images': images}))
  cfg = defaults.data_config()
  cfg.update(dict(builder='karpathy', manual_dir=str(tmp_path / 'src'),
                  data_dir=str(tmp_path / 'tfds'), karpathy_dataset='flickr30k'))
  builder = sources.get_builder(cfg)
  assert str(builder.version) == '1.1.0'
  got = {ex['filename'].decode().split('/')[-1]: ex['image'].astype(int)
         for ex in sources.read_examples(builder, 'train').as_numpy_iterator()}
  assert got['rotated.jpg'].shape == (80, 40, 3) and got['plain.jpg'].shape == (40, 80, 3)
  np.testing.assert_allclose(got['rotated.jpg'][10, 20], [255, 0, 0], atol=12)
  np.testing.assert_allclose(got['rotated.jpg'][70, 20], [0, 0, 255], atol=12)


def test_any_tfds_dataset_by_name_and_keys(coco):
  cfg = coco[0].copy_and_resolve_references()
  cfg.update(dict(builder='tfds', tfds_name='karpathy_captions/coco',
                  tfds_image_key='image', tfds_text_key='captions'))
  batch = next(pipeline.TrainIterator(cfg, image_size=24, global_batch_size=4, seed=0,
                                      mesh=None))
  assert batch['image'].shape == (4, 24, 24, 3) and batch['input_ids'].shape == (4, 32)
  ev = pipeline.eval_data(cfg, 'test', image_size=24, batch_size=4)
  assert (ev.num_images, ev.num_captions) == (3, 15)
  cfg.tfds_text_key = 'caption'
  with pytest.raises(ValueError, match=r"tfds_text_key='caption'.*'captions'"):
    pipeline.TrainIterator(cfg, image_size=24, global_batch_size=4, seed=0, mesh=None)


# -- tokenizer --


def test_tokenizer_truncates_pads_and_masks(coco, tmp_path):
  cfg = coco[0].copy_and_resolve_references()
  cfg.max_len = 8
  tok = pipeline.load_tokenizer(cfg)
  vocab = tok.get_vocab()
  out = tok_lib.encode(tok, ['a caption', 'the caption number one two three four five six'])
  ids, mask = out['input_ids'], out['attention_mask']
  assert ids.dtype == np.int32 and ids.shape == (2, 8)
  assert ids[0].tolist() == [vocab['[CLS]'], vocab['a'], vocab['caption'], vocab['[SEP]'],
                             0, 0, 0, 0]
  assert mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
  assert ids[1, 0] == vocab['[CLS]'] and ids[1, -1] == vocab['[SEP]']  # truncated
  # A Hugging Face folder with tokenizer.json works too; a folder without one names the key.
  (tmp_path / 'hf').mkdir()
  tok.save(str(tmp_path / 'hf' / 'tokenizer.json'))
  cfg.tokenizer = str(tmp_path / 'hf')
  again = tok_lib.encode(pipeline.load_tokenizer(cfg), ['the caption number one two three'])
  np.testing.assert_array_equal(again['input_ids'], out['input_ids'][1:])
  cfg.tokenizer = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='config.data.tokenizer'):
    pipeline.load_tokenizer(cfg)


# -- training stream --


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_train_batches_shapes_dtypes_and_content(synth):
  it = pipeline.TrainIterator(synth, image_size=32, global_batch_size=16, seed=0,
                              mesh=None, second_view=True)
  b = next(it)
  assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
      'image': ((16, 32, 32, 3), 'float32'), 'image_view2': ((16, 32, 32, 3), 'float32'),
      'input_ids': ((16, 32), 'int32'), 'attention_mask': ((16, 32), 'int32'),
      'bad_records': ((16,), 'int32')}
  assert not b['bad_records'].any()
  vocab = it.tokenizer.get_vocab()
  assert (b['input_ids'][:, 0] == vocab['[CLS]']).all()
  np.testing.assert_array_equal(b['attention_mask'], b['input_ids'] != vocab['[PAD]'])
  last = b['attention_mask'].sum(1) - 1
  assert (b['input_ids'][np.arange(16), last] == vocab['[SEP]']).all()
  # Normalised pixels: the dark background sits near (0 - mean) / std.
  assert -2.2 < b['image'].min() < -1.5 and b['image'].max() < 2.7
  assert not np.array_equal(b['image'], b['image_view2'])  # independent augmentations
  texts = set(it.tokenizer.decode_batch(b['input_ids'].tolist()))
  builder = sources.get_builder(synth)
  every = {c.decode() for ex in sources.read(builder, 'train', ('image', 'captions'))
           .as_numpy_iterator() for c in ex['captions']}
  normalised = {it.tokenizer.decode(it.tokenizer.encode(c).ids) for c in every}
  assert texts <= normalised


def test_same_seed_same_batches_other_seed_other_batches(synth):
  kw = dict(image_size=16, global_batch_size=8, mesh=None)
  a = _take(pipeline.TrainIterator(synth, seed=3, **kw), 3)
  b = _take(pipeline.TrainIterator(synth, seed=3, **kw), 3)
  c = _take(pipeline.TrainIterator(synth, seed=4, **kw), 3)
  assert all(_same(x, y) for x, y in zip(a, b))
  assert not _same(a[0], c[0])


@pytest.mark.parametrize('path', ['cached', 'fixed_size_streamed', 'photos'])
def test_resume_gives_the_uninterrupted_batches(synth, coco, path):
  # Synthetic: 96 / 16 = 6 steps per epoch; photos (train+restval): 13 / 4 = 3.25. Both
  # resume points sit in the first epoch, and the compared batches run into later ones.
  cfg, batch, start = synth.copy_and_resolve_references(), 16, 4
  if path == 'fixed_size_streamed':
    cfg.cache_mb = 0
  if path == 'photos':
    cfg, batch, start = coco[0], 4, 2
  kw = dict(image_size=16, global_batch_size=batch, seed=0, mesh=None, second_view=True)
  it = pipeline.TrainIterator(cfg, **kw)
  assert it._cache == (path == 'cached')  # pylint: disable=protected-access
  full = _take(it, 10)
  assert not _same(full[0], full[6])  # the epoch is reshuffled and re-augmented
  resumed = pipeline.TrainIterator(cfg, start_step=start, **kw)
  assert all(_same(x, y) for x, y in zip(_take(resumed, 10 - start), full[start:]))
  restored = pipeline.TrainIterator(cfg, **kw)
  next(restored)
  state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
  assert state['step'] == 10
  restored.set_state({**state, 'step': 5})
  assert all(_same(x, y) for x, y in zip(_take(restored, 3), full[5:8]))


def test_group_size_2_draws_each_scene_with_its_twin(synth):
  """The synthetic set is stored in index order (record i is scene i), so group_size=2
  puts scenes 2k and 2k+1, the twins, in consecutive rows of one batch."""
  builder = sources.get_builder(synth)
  stored = list(sources.read(builder, 'train', ('image', 'captions')).as_numpy_iterator())
  assert [int(ex['image_id']) for ex in stored] == list(range(TRAIN))
  pixels = {np.asarray(Image.open(io.BytesIO(ex['image']))).tobytes(): i
            for i, ex in enumerate(stored)}
  cfg = synth.copy_and_resolve_references()
  cfg.group_size = 2
  it = pipeline.TrainIterator(cfg, image_size=16, global_batch_size=16, seed=0, mesh=None)
  it._cached = it._fill_cache()  # pylint: disable=protected-access
  seen = []
  for step in range(TRAIN // 16):
    images = it._cached_batch(step)[0]  # pylint: disable=protected-access
    ids = np.array([pixels[im.tobytes()] for im in images])
    assert (ids[0::2] % 2 == 0).all() and (ids[1::2] == ids[0::2] + 1).all()
    seen += ids.tolist()
  assert sorted(seen) == list(range(TRAIN))  # one epoch: every scene once
  assert next(it)['image'].shape == (16, 16, 16, 3)
  with pytest.raises(ValueError, match=r'group_size=2 does not divide the per-process '
                                       r'batch of 7'):
    pipeline.TrainIterator(cfg, image_size=16, global_batch_size=7, seed=0, mesh=None)


def test_cached_and_streamed_synthetic_batches_agree(synth):
  cfg = synth.copy_and_resolve_references()
  cfg.cache_mb = 0
  kw = dict(image_size=16, global_batch_size=16, seed=1, mesh=None)
  cached = _take(pipeline.TrainIterator(synth, **kw), 8)
  streamed = _take(pipeline.TrainIterator(cfg, **kw), 8)
  assert all(_same(x, y) for x, y in zip(cached, streamed))


def test_global_arrays_on_the_mesh(synth):
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1})
  kw = dict(image_size=16, global_batch_size=16, seed=0)
  local = next(pipeline.TrainIterator(synth, mesh=None, **kw))
  glob = next(pipeline.TrainIterator(synth, mesh=mesh, **kw))
  for k, v in glob.items():
    assert isinstance(v, jax.Array) and v.sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(v), local[k])
  ev = pipeline.eval_data(synth, 'val', image_size=16, batch_size=16, mesh=mesh)
  t = next(ev.text_batches())
  assert t['input_ids'].sharding == sharding.batch_sharding(mesh)


@pytest.mark.parametrize('path', ['cached', 'photos'])
def test_two_processes_rows_side_by_side_are_the_one_process_batch(synth, coco, path):
  cfg, batch = (synth, 16) if path == 'cached' else (coco[0], 4)
  kw = dict(image_size=16, global_batch_size=batch, seed=0, mesh=None, second_view=True)
  whole = _take(pipeline.TrainIterator(cfg, **kw), 5)
  halves = [_take(pipeline.TrainIterator(cfg, process_index=p, process_count=2, **kw), 5)
            for p in range(2)]
  for k, full in enumerate(whole):
    joined = {key: np.concatenate([halves[0][k][key], halves[1][k][key]]) for key in full}
    assert _same(joined, full), k
  with pytest.raises(ValueError, match='divisible by the 3 processes'):
    pipeline.TrainIterator(synth, image_size=16, global_batch_size=16, seed=0, mesh=None,
                           process_count=3, process_index=0)


# -- evaluation --


def test_eval_visits_every_image_and_caption_once(synth):
  ev = pipeline.eval_data(synth, 'val', image_size=16, batch_size=8)
  assert (ev.num_images, ev.num_captions) == (EVAL, 5 * EVAL)
  np.testing.assert_array_equal(ev.caption_image_index, np.repeat(np.arange(EVAL), 5))
  images = list(ev.image_batches(with_ids=True))
  assert len(images) == 3 and all(b['image'].shape == (8, 16, 16, 3) for b in images)
  mask = np.concatenate([b['mask'] for b in images])
  assert mask.tolist() == [True] * EVAL + [False] * 4
  ids = np.concatenate([b['image_id'] for b in images])[mask]
  np.testing.assert_array_equal(ids, ev.image_ids)
  assert sorted(ids.tolist()) == list(range(EVAL))
  assert (np.concatenate([b['image'] for b in images])[~mask] == 0).all()
  texts = list(ev.text_batches())
  assert len(texts) == 13
  tmask = np.concatenate([t['mask'] for t in texts])
  assert tmask.sum() == 5 * EVAL and not tmask[5 * EVAL:].any()
  ids_all = np.concatenate([t['input_ids'] for t in texts])[tmask]
  expect = tok_lib.encode(pipeline.load_tokenizer(synth), ev.captions)['input_ids']
  np.testing.assert_array_equal(ids_all, expect)

  # Two processes' rows, put side by side per global batch, are the one-process batches.
  parts = [pipeline.eval_data(synth, 'val', image_size=16, batch_size=8, process_index=p,
                              process_count=2) for p in range(2)]
  two = [list(p.image_batches()) for p in parts]
  for i, whole in enumerate(images):
    joined = np.concatenate([two[0][i]['image'], two[1][i]['image']])
    np.testing.assert_allclose(joined, whole['image'], atol=1e-6)
  t0, t1 = (list(p.text_batches()) for p in parts)
  np.testing.assert_array_equal(
      np.concatenate([t0[-1]['mask'], t1[-1]['mask']]), texts[-1]['mask'])


def test_validate_data_config_names_key_value_and_fix():
  defaults.validate_data_config(defaults.data_config())
  cases = [({'flip': True}, r"config.data.flip=True: .*'left of'"),
           ({'crop_scale': (0.9, 0.5)}, r'config.data.crop_scale=\(0.9, 0.5\)'),
           ({'builder': 'web'}, r"config.data.builder='web'"),
           ({'builder': 'karpathy'}, r"config.data.tokenizer=''")]
  for change, message in cases:
    cfg = defaults.data_config()
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
      defaults.validate_data_config(cfg)


# -- the run's own tokenizer --


def test_run_tokenizer_is_kept_checked_and_refused_when_it_differs(tmp_path, caplog):
  words = ['red', 'blue', 'circle', 'square']
  tok = tok_lib.finalize(tok_lib.wordpiece_tokenizer([*tok_lib.SPECIAL_TOKENS, *words]), 8)
  run = tmp_path / 'run'
  run.mkdir()
  tok_lib.keep_run_tokenizer(str(run), tok, resuming=False)
  saved = tok_lib.read_run_tokenizer(str(run / 'checkpoints' / '5'))  # any folder of it
  assert saved.get_vocab() == tok.get_vocab() and saved.padding is None  # max_len-free
  same = tok_lib.finalize(tok_lib.wordpiece_tokenizer([*tok_lib.SPECIAL_TOKENS, *words]), 16)
  tok_lib.keep_run_tokenizer(str(run), same, resuming=True)  # resume: the same one
  tok_lib.check_run_tokenizer(str(run), same, 'evaluation')

  swapped = [*tok_lib.SPECIAL_TOKENS, 'red', 'blue', 'square', 'circle']
  other = tok_lib.finalize(tok_lib.wordpiece_tokenizer(swapped), 8)
  expected = (r"evaluation is not the one .*run was trained with \(9 tokens in the run, 9 "
              r"in the dataset; first difference at id 7: 'circle' in the run, 'square' in "
              r"the dataset\).*--config.data.tokenizer=.*run/tokenizer.json")
  with pytest.raises(tok_lib.TokenizerMismatchError, match=expected):
    tok_lib.check_run_tokenizer(str(run), other, 'evaluation')
  with pytest.raises(tok_lib.TokenizerMismatchError, match='resuming this run'):
    tok_lib.keep_run_tokenizer(str(run), other, resuming=True)
  # Fine-tuning from the run checks against it; the new run then keeps its own copy.
  new = tmp_path / 'finetune'
  new.mkdir()
  with pytest.raises(tok_lib.TokenizerMismatchError, match=f'fine-tuning from {run}'):
    tok_lib.keep_run_tokenizer(str(new), other, resuming=False, init_from=str(run))
  assert not (new / 'tokenizer.json').exists()
  tok_lib.keep_run_tokenizer(str(new), same, resuming=False, init_from=str(run))
  assert tok_lib.read_run_tokenizer(str(new)).get_vocab() == tok.get_vocab()

  # A run from before tokenizer.json: one note, and the dataset's tokenizer as before.
  old = tmp_path / 'old'
  old.mkdir()
  with caplog.at_level(logging.WARNING):
    tok_lib.check_run_tokenizer(str(old), other, 'evaluation')
  notes = [r.getMessage() for r in caplog.records if 'predates' in r.getMessage()]
  assert len(notes) == 1 and str(old) in notes[0], caplog.records
