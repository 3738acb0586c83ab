"""One pass per tower: the views of a step run through each tower as one batch
(`layers.run_views`), with each view's own dropout, and equal one pass per view."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cookie_jax import negatives, objectives
from cookie_jax.config import default_config
from cookie_jax.models import init_model, l2_normalize, layers

from test_methods import _batches, _constants


def _config():
  config = default_config('tiny')
  config.model.vision.image_size = 16
  config.model.vision.patch_dropout = 0.5
  for tower in (config.model.vision, config.model.text, config.model.shared):
    tower.dropout, tower.attention_dropout = 0.2, 0.2
  config.loss.visual.weight = config.loss.textual.weight = 0.5
  config.loss.hard_negatives.images = config.loss.hard_negatives.captions = True
  return config


def _one_pass_per_view(model, batch, rng, loss_cfg, constants):
  """The embeddings of every view as separate passes: what loss_inputs computed before."""
  r_img, r_txt, r_img2, r_txt2 = layers.split_rng(rng, 4)
  extra = lambda i: jax.random.fold_in(rng, 1000 + i)
  mask = batch['attention_mask']
  mixed = negatives.compose_negative_images(
      batch['image'], extra(0), mode=loss_cfg.hard_negatives.image_mix,
      patch_size=model.vision_patch_size)
  ids, valid = negatives.compose_negative_captions(
      batch['input_ids'], mask, constants['token_group'], constants['group_members'],
      extra(2))
  return {'image': model.encode_image(batch['image'], rng=r_img),
          'image_view2': model.encode_image(batch['image_view2'], rng=r_img2),
          'image_negative': model.encode_image(mixed, rng=extra(1)),
          'text': model.encode_text(batch['input_ids'], mask, rng=r_txt),
          'text_view2': model.encode_text(batch['input_ids'], mask, rng=r_txt2),
          'text_negative': model.encode_text(ids, mask, rng=extra(3)),
          'caption_valid': valid}


def _one_pass_per_tower(model, batch, rng, loss_cfg, constants):
  pairs, extra = objectives.loss_inputs(model, batch, rng, loss_cfg, constants)
  side = extra['cross_modal']
  return {'image': pairs['cross_modal'][0], 'image_view2': pairs['visual'][1],
          'image_negative': side['a']['batch'][0], 'text': pairs['cross_modal'][1],
          'text_view2': pairs['textual'][1], 'text_negative': side['b']['batch'][0],
          'caption_valid': side['b']['batch'][1]}


def _weighted_sum(embeddings):
  """A scalar that weighs every embedding entry differently (for gradients)."""
  total = 0.0
  for i, (name, x) in enumerate(sorted(embeddings.items())):
    if name != 'caption_valid':
      total += jnp.sum(x * jnp.sin(jnp.arange(x.size, dtype=jnp.float32) + i).reshape(x.shape))
  return total


@pytest.mark.slow
def test_one_pass_per_tower_equals_one_pass_per_view_with_every_dropout_on():
  config = _config()
  model = init_model(config.model, 0)
  batch = jax.tree.map(jnp.asarray, _batches(1)[0])
  rng, constants = jax.random.key(7), jax.tree.map(jnp.asarray, _constants())
  fused = jax.jit(lambda: _one_pass_per_tower(model, batch, rng, config.loss, constants))()
  separate = jax.jit(lambda: _one_pass_per_view(model, batch, rng, config.loss, constants))()
  for name, want in separate.items():
    np.testing.assert_allclose(fused[name], want, rtol=0, atol=2e-6, err_msg=name)
  # Not vacuous: the two dropout passes of the same captions differ, by far more.
  assert np.max(np.abs(separate['text'] - separate['text_view2'])) > 0.05

  graphdef, params = nnx.split(model)

  def grads(embed):
    return jax.jit(jax.grad(lambda p: _weighted_sum(
        embed(nnx.merge(graphdef, p), batch, rng, config.loss, constants))))(params)

  got, want = grads(_one_pass_per_tower), grads(_one_pass_per_view)
  largest = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    # Per leaf, relative to its own size; a leaf whose gradient is zero in exact
    # arithmetic (the key biases: softmax ignores them) holds rounding noise only.
    scale = max(float(np.max(np.abs(w))), 1e-3 * largest)
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_fuse_views_switch_and_one_pass_per_view_path():
  config = _config()
  assert objectives.fuse_views(config.loss, 8) and not objectives.fuse_views(config.loss, 1)
  config.loss.fuse_views = 'on'
  assert objectives.fuse_views(config.loss, 1)
  config.loss.fuse_views = 'off'
  assert not objectives.fuse_views(config.loss, 8)
  # fuse=False is the one-pass-per-view path, and gives exactly the reference's numbers.
  model = init_model(config.model, 0)
  batch = jax.tree.map(jnp.asarray, _batches(1)[0])
  rng, constants = jax.random.key(3), jax.tree.map(jnp.asarray, _constants())
  pairs, extra = objectives.loss_inputs(model, batch, rng, config.loss, constants,
                                        fuse=False)
  want = _one_pass_per_view(model, batch, rng, config.loss, constants)
  np.testing.assert_array_equal(pairs['textual'][1], want['text_view2'])
  np.testing.assert_array_equal(extra['cross_modal']['a']['batch'][0], want['image_negative'])


def test_view_keys_draw_what_each_view_key_draws_alone():
  keys = [jax.random.key(1), jax.random.key(2), jax.random.key(3)]
  views = layers.ViewKeys(jnp.stack(keys))
  shape = (4, 5, 6)  # 4 rows per view
  bits = layers.draw_rows(layers._uniform_u16, views, (12, 5, 6))  # pylint: disable=protected-access
  split = [layers.split_rng(k, 2)[1] for k in keys]
  split_views = layers.split_rng(views, 2)[1]
  folded = layers.draw_rows(jax.random.uniform, layers.fold_in(views, 9), (12, 3))
  # Dropout draws its bits in place (each row hashing with its view's key): the same.
  np.testing.assert_array_equal(layers._uniform_u16(views, (12, 5, 6)), bits)  # pylint: disable=protected-access
  for i, key in enumerate(keys):
    np.testing.assert_array_equal(bits[i::3], layers._uniform_u16(key, shape))  # pylint: disable=protected-access
    np.testing.assert_array_equal(jax.random.key_data(split_views.keys[i]),
                                  jax.random.key_data(split[i]))
    np.testing.assert_array_equal(folded[i::3],
                                  jax.random.uniform(jax.random.fold_in(key, 9), (4, 3)))
  with pytest.raises(ValueError, match='cannot hold 3 interleaved views'):
    layers.draw_rows(jax.random.uniform, views, (10, 3))


def test_run_views_refuses_mixed_keys_and_clips():
  config = default_config('tiny')
  model = init_model(config.model, 0)
  x = jnp.zeros((2, 8))
  with pytest.raises(ValueError, match='every view has a key or none'):
    layers.run_views(lambda a, rng: a, [(x,), (x,)], [jax.random.key(0), None])
  clips = jnp.zeros((2, 2, config.model.vision.image_size, config.model.vision.image_size, 3))
  with pytest.raises(ValueError, match='Clips run one view per pass'):
    model.embed_image(clips, rng=layers.ViewKeys(jnp.stack([jax.random.key(0)] * 2)))
