"""The COOKIE model: encoders alone, padding invariance, batch consistency, dtypes."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cookie_jax.models import CookieModel, layers, model_config
from cookie_jax.models.cookie import pool


def _tiny(**overrides):
  cfg = model_config('tiny')
  cfg.vision.image_size = 16
  for key, value in overrides.items():
    node = cfg
    *parents, last = key.split('.')
    for p in parents:
      node = node[p]
    node[last] = value
  return cfg


def _text(rng, b, t, lengths):
  ids = rng.integers(5, 1024, size=(b, t)).astype(np.int32)
  mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids * mask, mask


@pytest.mark.parametrize('pool_kind', ['cls', 'mean'])
def test_encode_text_invariant_to_extra_padding(pool_kind):
  model = CookieModel(_tiny(text_pool=pool_kind), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids, mask = _text(rng, 3, 8, [8, 5, 2])
  base = model.encode_text(ids, mask)
  pad = 13
  ids_p = np.pad(ids, ((0, 0), (0, pad)), constant_values=0)
  mask_p = np.pad(mask, ((0, 0), (0, pad)))
  # Garbage ids under the padding must not matter either.
  ids_p[:, 8:] = rng.integers(5, 1024, size=(3, pad))
  padded = model.encode_text(ids_p, mask_p)
  np.testing.assert_allclose(np.asarray(padded), np.asarray(base), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(base), axis=-1), 1.0, atol=1e-5)


def test_one_sample_equals_its_row_of_a_batch():
  model = CookieModel(_tiny(), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  images = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
  ids, mask = _text(rng, 4, 10, [10, 3, 7, 1])
  img_batch = np.asarray(model.encode_image(images))
  txt_batch = np.asarray(model.encode_text(ids, mask))
  for i in range(4):
    np.testing.assert_allclose(np.asarray(model.encode_image(images[i:i + 1]))[0],
                               img_batch[i], atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.encode_text(ids[i:i + 1], mask[i:i + 1]))[0],
                               txt_batch[i], atol=1e-5)
  # Different inputs give different embeddings (the encoders are not constant).
  assert np.abs(img_batch[0] - img_batch[1]).max() > 1e-3
  assert np.abs(txt_batch[0] - txt_batch[1]).max() > 1e-3


def test_shared_layers_are_one_set_of_weights_for_both_modalities():
  model = CookieModel(_tiny(**{'shared.depth': 2}), rngs=nnx.Rngs(0))
  state = nnx.to_pure_dict(nnx.state(model))
  shared = state['shared']
  assert sorted(shared['layer'].keys()) == [0, 1]
  assert 'image_in' in shared and 'text_in' in shared
  # Perturbing a shared layer changes both the image and the text embedding.
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  ids, mask = _text(rng, 2, 6, [6, 4])
  before = np.asarray(model.encode_image(images)), np.asarray(model.encode_text(ids, mask))
  kernel = model.shared.layer[1].intermediate.kernel
  kernel[...] = kernel[...] + jax.random.normal(jax.random.key(3), kernel.shape)
  after = np.asarray(model.encode_image(images)), np.asarray(model.encode_text(ids, mask))
  assert np.abs(after[0] - before[0]).max() > 1e-3
  assert np.abs(after[1] - before[1]).max() > 1e-3


def test_dual_encoder_without_shared_layers():
  model = CookieModel(_tiny(**{'shared.depth': 0}), rngs=nnx.Rngs(0))
  assert model.shared is None
  assert 'shared' not in nnx.to_pure_dict(nnx.state(model))
  out = model.encode_image(np.zeros((2, 16, 16, 3), np.float32))
  assert out.shape == (2, 32)


def test_mean_pool_counts_only_real_tokens():
  x = jnp.asarray([[[1.0], [3.0], [100.0]]])
  mask = jnp.asarray([[1, 1, 0]])
  assert float(pool(x, mask, 'mean', skip=0)[0, 0]) == pytest.approx(2.0)
  assert float(pool(x, None, 'mean', skip=1)[0, 0]) == pytest.approx(51.5)
  assert float(pool(x, mask, 'cls', skip=0)[0, 0]) == 1.0


def test_temperature_is_learned_in_log_space_and_clamped():
  model = CookieModel(_tiny(temperature_init=0.05, max_logit_scale=50.0), rngs=nnx.Rngs(0))
  assert float(model.logit_scale()) == pytest.approx(20.0, rel=1e-6)
  model.log_logit_scale[...] = jnp.log(1000.0)
  assert float(model.logit_scale()) == pytest.approx(50.0, rel=1e-6)


def test_bfloat16_compute_keeps_fp32_params_and_tracks_fp32():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  ids, mask = _text(rng, 2, 6, [6, 3])
  f32 = CookieModel(_tiny(), rngs=nnx.Rngs(0))
  bf16 = CookieModel(_tiny(dtype='bfloat16'), rngs=nnx.Rngs(0))
  leaves = jax.tree.leaves(nnx.state(bf16))
  assert leaves and all(x.dtype == jnp.float32 for x in leaves)
  for enc in ('encode_image', 'encode_text'):
    args = (images,) if enc == 'encode_image' else (ids, mask)
    a = np.asarray(getattr(f32, enc)(*args))
    b = getattr(bf16, enc)(*args)
    assert b.dtype == jnp.float32  # normalisation in fp32
    np.testing.assert_allclose(np.asarray(b), a, atol=5e-2)


def test_dropout_changes_text_embedding_only_with_rng():
  model = CookieModel(_tiny(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids, mask = _text(rng, 2, 6, [6, 3])
  a = np.asarray(model.encode_text(ids, mask))
  np.testing.assert_array_equal(a, np.asarray(model.encode_text(ids, mask)))
  k1, k2 = jax.random.split(jax.random.key(0))
  d1 = np.asarray(model.encode_text(ids, mask, rng=k1))
  d2 = np.asarray(model.encode_text(ids, mask, rng=k2))
  assert np.abs(d1 - d2).max() > 1e-4
  np.testing.assert_array_equal(d1, np.asarray(model.encode_text(ids, mask, rng=k1)))


@pytest.mark.parametrize('platform', ['cpu', 'tpu'])
def test_remat_policies_give_the_same_gradients(platform):
  # 'tpu' traces the program a TPU runs (jax's own matmul gradient, where the policies
  # decide which dense outputs are saved); 'cpu' the custom-VJP matmul, whose dots the
  # policies do not see. Either way every policy gives no-remat's gradients.
  rng = np.random.default_rng(0)
  ids, mask = _text(rng, 2, 6, [6, 3])
  loss = lambda m: jnp.sum(m.encode_text(ids, mask)[:, 0])
  grads, dots = {}, {}
  token = layers.TARGET_PLATFORM.set(platform)
  try:
    for name, remat, policy in (('none', False, 'full'), ('full', True, 'full'),
                                ('dots', True, 'dots'), ('all_dots', True, 'all_dots')):
      # XLA's attention, whose two einsums the policies see ('tpu' would otherwise run
      # the attention kernel, test_attention_kernel_equals_xla_attention).
      model = CookieModel(_tiny(remat=remat, remat_policy=policy, attention_kernel=False),
                          rngs=nnx.Rngs(0))
      grads[name] = jax.tree.leaves(nnx.grad(loss)(model))
      graphdef, state = nnx.split(model)
      jaxpr = jax.make_jaxpr(jax.grad(lambda s: loss(nnx.merge(graphdef, s))))(state)
      dots[name] = str(jaxpr).count('dot_general')  # forward, backward and recomputed
  finally:
    layers.TARGET_PLATFORM.reset(token)
  for name in ('full', 'dots', 'all_dots'):
    for x, y in zip(grads['none'], grads[name]):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
  if platform == 'tpu':  # each policy saves more matmuls, so fewer are recomputed
    assert dots['full'] > dots['dots'] > dots['all_dots'] >= dots['none']
  else:
    assert dots['full'] == dots['dots'] > dots['all_dots'] >= dots['none']
