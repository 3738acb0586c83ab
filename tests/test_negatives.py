"""VLDeformer's composed negatives and the concept mining they and CODER read."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cookie_jax import negatives, sharding
from cookie_jax.data import concepts, defaults, pipeline, sources
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.builders import scenes

TRAIN_IMAGES = 40


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
  """A 40-image synthetic dataset (built once for the module) and its tokenizer."""
  cfg = defaults.data_config()
  cfg.data_dir = str(tmp_path_factory.mktemp('tfds'))
  cfg.synthetic.train_images = TRAIN_IMAGES
  cfg.synthetic.eval_images = 4
  sources.get_builder(cfg)
  return cfg, pipeline.load_tokenizer(cfg)


@pytest.fixture(scope='module')
def tables(synth):
  cfg, tok = synth
  caps = concepts.training_captions(cfg, 10_000)
  vocab = concepts.mine_concepts(caps, tok, 16)
  groups = concepts.word_groups(cfg, vocab)
  return caps, groups, concepts.swap_tables(tok, groups)


def _hand_tokenizer():
  words = 'red blue dog cat the a ##s'.split()
  return tok_lib.wordpiece_tokenizer(list(tok_lib.SPECIAL_TOKENS) + words)


def test_mine_concepts_exact_counts_and_cooccurrence():
  tok = _hand_tokenizer()
  caps = ['The red dog.', 'a RED cat and a blue dog', 'red red dogs run', 'blue cat, 42']
  # 'dogs' is two tokens and 'run' unknown: not concepts; 'the'/'a'/'and' are stopwords.
  # Occurrences: red 4, dog 2, blue 2, cat 2 -> blue, cat, dog tie (alphabetical).
  v = concepts.mine_concepts(caps, tok, num_concepts=3)
  assert v.words == ['red', 'blue', 'cat']
  vocab = tok.get_vocab()
  np.testing.assert_array_equal(v.token_ids, [vocab['red'], vocab['blue'], vocab['cat']])
  assert v.token_ids.dtype == np.int32
  np.testing.assert_array_equal(v.counts, [4, 2, 2])
  # Captions holding both: red&blue {1}, red&cat {1}, blue&cat {1, 3}; red is in 3 captions.
  np.testing.assert_array_equal(v.cooccurrence, [[3, 1, 1], [1, 2, 2], [1, 2, 2]])
  assert v.cooccurrence.dtype == np.float32
  full = concepts.mine_concepts(iter(caps), tok, num_concepts=10)  # any iterable
  assert full.words == ['red', 'blue', 'cat', 'dog']


def test_mine_concepts_too_few_is_a_clear_error():
  with pytest.raises(ValueError, match=r'found 1 concept.*num_concepts=4.*tokenizer'):
    concepts.mine_concepts(['the red zebra', 'red'], _hand_tokenizer(), num_concepts=4)


def test_training_captions_and_synthetic_groups(synth, tables):
  cfg, tok = synth
  caps, groups, (token_group, members) = tables
  assert len(caps) == 3 * TRAIN_IMAGES
  assert concepts.training_captions(cfg, 7) == caps[:7]
  # tfds stores examples in its own order; the captions are those of the generated scenes.
  s = cfg.synthetic
  generated = [c for i in range(TRAIN_IMAGES)
               for c in scenes.example(s.seed, 'train', i, s.image_size, 3)[1]]
  assert sorted(caps) == sorted(generated)
  ids = lambda ws: [tok.token_to_id(w) for w in ws]
  colours = ids(['red', 'green', 'blue', 'yellow', 'purple', 'orange'])
  shapes = ids(['circle', 'square', 'triangle', 'diamond', 'cross'])
  assert None not in colours + shapes
  assert len(set(token_group[colours])) == 1 and token_group[colours[0]] >= 0
  assert len(set(token_group[shapes])) == 1 and token_group[shapes[0]] >= 0
  assert token_group[colours[0]] != token_group[shapes[0]]
  assert sorted(members[token_group[colours[0]]][members[token_group[colours[0]]] >= 0]) \
      == sorted(colours)
  small, little, large = ids(['small', 'little', 'large'])
  # Synonyms never swap into each other; opposites do.
  assert token_group[small] != token_group[little]
  assert token_group[small] == token_group[large]
  for w in ('the', 'a', 'is', '[CLS]'):
    assert token_group[tok.token_to_id(w)] == -1


def test_groups_file_and_swap_table_errors(tmp_path, synth):
  cfg, _ = synth
  tok = _hand_tokenizer()
  good = tmp_path / 'groups.json'
  good.write_text(json.dumps([['red', 'blue', 'zebra'], ['dog', 'cat'], ['dogs', 'cat2']]))
  groups = concepts.word_groups(cfg, None, groups_file=str(good))
  token_group, members = concepts.swap_tables(tok, groups)
  v = tok.get_vocab()
  # 'zebra' is unknown; the third group has no single-token word and is dropped.
  np.testing.assert_array_equal(members, [[v['red'], v['blue']], [v['dog'], v['cat']]])
  assert token_group.shape == (tok.get_vocab_size(),)
  assert sorted(np.flatnonzero(token_group >= 0)) == sorted(
      [v['red'], v['blue'], v['dog'], v['cat']])
  with pytest.raises(FileNotFoundError, match='missing.json'):
    concepts.word_groups(cfg, None, groups_file=str(tmp_path / 'missing.json'))
  bad = tmp_path / 'bad.json'
  for text, msg in (('[["red", ', 'not valid JSON'), ('{"a": 1}', 'list of lists'),
                    ('[["red", 3]]', 'list of lists')):
    bad.write_text(text)
    with pytest.raises(ValueError, match=msg):
      concepts.word_groups(cfg, None, groups_file=str(bad))
  with pytest.raises(ValueError, match=r"'red'.*one group only"):
    concepts.swap_tables(tok, [['red', 'blue'], ['cat', 'red']])
  with pytest.raises(ValueError, match='holds 2 words'):
    concepts.swap_tables(tok, [['red', 'zebra']])


def _encode(synth, texts):
  out = tok_lib.encode(synth[1], texts)
  return out['input_ids'], out['attention_mask']


def _images(b=8, s=16, dtype=np.float32):
  """Built in numpy (no op to compile); pixel (y, x) of image i differs from image i+1's."""
  base = np.random.default_rng(5).uniform(0.0, 0.4, (b, s, s, 3))
  base = base + np.arange(b)[:, None, None, None] * 0.5 / b
  return (base * 255).astype(np.uint8) if dtype == np.uint8 else base.astype(dtype)


@pytest.fixture(scope='module')
def composed(synth, tables):
  """Captions, region and patch negatives of one batch of 16, on 1 device and sharded on 8.

  One program for all three, compiled twice for the module: compilation is the cost here.
  """
  caps, _, (token_group, members) = tables
  ids, mask = _encode(synth, caps[:15] + ['there is the'])  # the last: nothing to swap
  images = _images(b=16, dtype=np.uint8)
  tg, gm = jnp.asarray(token_group), jnp.asarray(members)

  def compose(ids, mask, images, key):
    k1, k2, k3 = jax.random.split(key, 3)
    neg, valid = negatives.compose_negative_captions(ids, mask, tg, gm, k1)
    return (neg, valid, negatives.compose_negative_images(images, k2),
            negatives.compose_negative_images(images, k3, mode='patch', patch_size=4))

  key = jax.random.key(7)
  single = jax.jit(compose)(ids, mask, images, key)
  rows = sharding.batch_sharding(sharding.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1}))
  sharded = jax.jit(compose)(*[jax.device_put(a, rows) for a in (ids, mask, images)], key)
  assert all(len(a.sharding.device_set) == 8 for a in sharded)
  return (ids, mask, images), [np.asarray(a) for a in single], sharded


def test_sharded_equals_unsharded(composed):
  _, single, sharded = composed
  for a, b in zip(single, sharded):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_composed_captions_swap_one_word_in_its_group(composed, tables):
  (ids, mask, _), (neg, valid, _, _), _ = composed
  token_group = tables[2][0]
  np.testing.assert_array_equal(valid, [True] * 15 + [False])
  np.testing.assert_array_equal(neg[15], ids[15])
  diff = neg != ids
  np.testing.assert_array_equal(diff.sum(1), [1] * 15 + [0])
  rows, cols = np.nonzero(diff)
  assert mask[rows, cols].all()
  old, new = ids[rows, cols], neg[rows, cols]
  assert (token_group[old] >= 0).all()
  np.testing.assert_array_equal(token_group[new], token_group[old])
  assert (new != old).all()


def test_composed_caption_swaps_are_uniform(synth, tables):
  _, _, (token_group, members) = tables
  tok = synth[1]
  n = 6000
  ids, mask = _encode(synth, ['a red circle'] * n)
  neg, valid = jax.jit(negatives.compose_negative_captions)(
      ids, mask, jnp.asarray(token_group), jnp.asarray(members), jax.random.key(1))
  neg, valid = np.asarray(neg), np.asarray(valid)
  assert valid.all()
  red, circle = tok.token_to_id('red'), tok.token_to_id('circle')
  pos_red = int(np.flatnonzero(ids[0] == red)[0])
  assert circle in ids[0]
  new = neg[np.arange(n), np.argmax(neg != ids, axis=1)]
  at_red = neg[:, pos_red] != red
  assert abs(at_red.mean() - 0.5) < 0.03  # 2 swappable words: each chosen half the time
  for word, others, chosen in (('red', ['green', 'blue', 'yellow', 'purple', 'orange'],
                                at_red),
                               ('circle', ['square', 'triangle', 'diamond', 'cross'],
                                ~at_red)):
    got = new[chosen]
    assert tok.token_to_id(word) not in got
    freq = np.asarray([np.mean(got == tok.token_to_id(o)) for o in others])
    # Every other member, uniformly: ~3000 draws, one sigma <= 0.008, so 0.03 is ~4 sigma.
    np.testing.assert_allclose(freq, 1 / len(others), atol=0.03)
    assert freq.sum() == pytest.approx(1.0)


def test_region_negatives_paste_a_rectangle_of_the_partner(composed):
  (_, _, x), (_, _, y, _), _ = composed
  assert y.dtype == x.dtype == np.uint8 and y.shape == x.shape
  partner = np.roll(x, -1, axis=0)
  from_partner = (y == partner).all(-1) & (x != partner).any(-1)
  assert ((y == x).all(-1) | from_partner).all()  # each pixel is its own or the partner's
  for m in from_partner:
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    # One axis-aligned rectangle, filled, covering 30-60% of the area (up to rounding).
    assert m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert 0.3 - 2 / 16 <= m.mean() <= 0.6 + 2 / 16
  assert (from_partner.sum((1, 2)) > 0).all()  # every negative differs from its positive


def test_patch_negatives_swap_whole_patches(composed):
  (_, _, x), (_, _, _, y), _ = composed
  assert y.dtype == x.dtype and y.shape == x.shape
  taken = (y == np.roll(x, -1, axis=0)).all(-1)
  assert ((y == x).all(-1) | taken).all()
  grid = taken.reshape(16, 4, 4, 4, 4).transpose(0, 1, 3, 2, 4).reshape(16, 16, 16)
  assert (grid.all(-1) | ~grid.any(-1)).all()  # whole patches only
  counts = grid.all(-1).sum(1)
  assert ((counts >= 5) & (counts <= 10)).all()  # round(30-60% of 16 patches)
  assert (y != x).any((1, 2, 3)).all()


def test_float_images_keep_dtype_and_values():
  x = _images()
  y = np.asarray(jax.jit(negatives.compose_negative_images)(x, jax.random.key(2)))
  assert y.dtype == np.float32
  assert np.isin(y, x).all() and (y != x).any((1, 2, 3)).all()  # copied, never blended


def test_image_negative_errors():
  images = _images()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="mode='mixup'"):
    negatives.compose_negative_images(images, key, mode='mixup')
  with pytest.raises(ValueError, match='patch_size=5'):
    negatives.compose_negative_images(images, key, mode='patch', patch_size=5)
  with pytest.raises(ValueError, match=r'fraction=\(0.5, 1.0\)'):
    negatives.compose_negative_images(images, key, fraction=(0.5, 1.0))
  with pytest.raises(ValueError, match='batch size 1'):
    negatives.compose_negative_images(images[:1], key)
