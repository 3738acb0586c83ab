"""The TPU attention kernel (cookie_jax/models/attention.py), run in Pallas' interpreter on
CPU: it equals an fp32 reference and XLA's attention, values and gradients, unsharded and
on each device's block of a mesh. (Its TPU compile and declared cost:
tests/test_tpu_compile.py.)"""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cookie_jax import sharding
from cookie_jax.models import CookieModel, layers, model_config
from cookie_jax.models.attention import fused_attention, interpreted


def _reference(q, k, v, key_mask, heads):
  b, t, w = q.shape
  split = lambda y: y.reshape(b, t, heads, w // heads)
  logits = jnp.einsum('bqhd,bkhd->bhqk', split(q), split(k)) / math.sqrt(w // heads)
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
  out = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), split(v))
  return out.reshape(b, t, w)


@pytest.mark.parametrize('masked', [False, True])
def test_the_kernel_equals_softmax_attention(masked):
  # An odd length (13, no tile multiple) and 3 heads of 8; the mask pads each row to its
  # own length. Gradients of q, k and v through the backward kernel.
  rng = np.random.default_rng(0)
  b, t, heads, dim = 3, 13, 3, 8
  q, k, v, g = (jnp.asarray(rng.normal(size=(b, t, heads * dim)), jnp.float32)
                for _ in range(4))
  key_mask = jnp.asarray(np.arange(t)[None] < np.array([[13], [7], [1]])) if masked else None
  kernel = lambda q, k, v: fused_attention(q, k, v, key_mask, heads=heads)
  reference = lambda q, k, v: _reference(q, k, v, key_mask, heads)
  with interpreted():
    out = kernel(q, k, v)
    grads = jax.grad(lambda *a: jnp.sum(kernel(*a) * g), (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(out, reference(q, k, v), atol=2e-6)
  expected = jax.grad(lambda *a: jnp.sum(reference(*a) * g), (0, 1, 2))(q, k, v)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, atol=1e-5)
  if masked:  # a padded key changes nothing
    moved = k.at[2, 5].add(3.0)
    with interpreted():
      np.testing.assert_array_equal(kernel(q, moved, v), out)


def _tiny(kernel: bool, remat: bool = False, depth: int = 2):
  cfg = model_config('tiny')
  cfg.vision.image_size = 16
  cfg.vision.depth = cfg.text.depth = depth
  cfg.attention_kernel = kernel
  cfg.remat = remat
  return cfg


def _inputs():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  ids = rng.integers(5, 1024, size=(4, 7)).astype(np.int32)
  mask = (np.arange(7)[None] < np.array([[7], [4], [2], [6]])).astype(np.int32)
  return images, jnp.asarray(ids * mask), jnp.asarray(mask)


def _loss(model, images, ids, mask):
  # Without rng: no dropout, so every attention of both towers and the shared layers runs
  # the kernel on 'tpu'.
  return (jnp.sum(model.encode_image(images) ** 2) +
          jnp.sum(model.encode_text(ids, mask)[:, 0]))


def test_a_model_traced_for_tpu_equals_xla_attention():
  # The model as a TPU runs it (layers.TARGET_PLATFORM), its attention the kernel, equals
  # the same weights with XLA's attention: the loss and every parameter's gradient, with
  # each block rematerialised (the kernel's custom VJP inside nnx.remat). One layer per
  # tower, to keep the interpreter's compile short.
  inputs = _inputs()
  results = {}
  token = layers.TARGET_PLATFORM.set('tpu')
  try:
    for kernel in (True, False):
      graphdef, state = nnx.split(CookieModel(_tiny(kernel, remat=True, depth=1),
                                              rngs=nnx.Rngs(0)))
      loss_fn = lambda s, *a: _loss(nnx.merge(graphdef, s), *a)
      with interpreted():
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state, *inputs)
        jaxpr = str(jax.make_jaxpr(loss_fn)(state, *inputs))
      results[kernel] = loss, jax.tree.leaves(grads), jaxpr.count('pallas_call')
  finally:
    layers.TARGET_PLATFORM.reset(token)
  (loss, grads, calls), (xla_loss, xla_grads, xla_calls) = results[True], results[False]
  # One kernel per attention: a layer of each tower, the shared layer on each side.
  assert (calls, xla_calls) == (4, 0)
  np.testing.assert_allclose(loss, xla_loss, rtol=1e-6)
  for got, want in zip(grads, xla_grads):
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize('tensor', [2, 4])
def test_the_kernel_runs_on_each_devices_block(tensor):
  # Under a mesh of 8 CPU devices the kernel runs on each device's rows and heads
  # (shard_map); its embeddings equal the unsharded kernel's. Tiny's 2 heads split over
  # tensor 2 (one head per device); tensor 4 would split a head, so there each device
  # runs both heads of its rows.
  images, ids, mask = _inputs()
  model = CookieModel(_tiny(True, depth=1), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def encode(state, images, ids, mask):
    m = nnx.merge(graphdef, state)
    return m.encode_image(images), m.encode_text(ids, mask)

  token = layers.TARGET_PLATFORM.set('tpu')
  try:
    with interpreted():
      expected = encode(state, images, ids, mask)
      mesh = sharding.make_mesh({'data': 4 // tensor, 'fsdp': 2, 'tensor': tensor},
                                jax.devices()[:8])

      def sharded(*args):
        with sharding.activation_sharding(mesh):
          inner = layers.TARGET_PLATFORM.set('tpu')
          try:
            return encode(*args)
          finally:
            layers.TARGET_PLATFORM.reset(inner)
      got = jax.jit(sharded)(state, images, ids, mask)
      text = str(jax.make_jaxpr(sharded)(state, images, ids, mask))
  finally:
    layers.TARGET_PLATFORM.reset(token)
  assert text.count('shard_map') == 4  # a layer of each tower, the shared one twice
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, atol=2e-6)


def test_a_sequence_too_long_for_the_kernel_keeps_xlas_attention():
  # ViT-L/14's attention (16 heads of 64) at 224 px (257 tokens) runs the kernel on TPU;
  # at 336 px (577 tokens) its blocks would not fit the kernel's VMEM
  # (`attention.fits`), so it stays XLA's attention instead of failing to compile.
  block = layers.MultiHeadAttention(1024, 16, attention_dropout=0.0, dtype=jnp.bfloat16,
                                    rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(block)
  token = layers.TARGET_PLATFORM.set('tpu')
  try:
    calls = {t: str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, None))(
        state, jax.ShapeDtypeStruct((2, t, 1024), jnp.bfloat16))).count('pallas_call')
             for t in (257, 577)}
  finally:
    layers.TARGET_PLATFORM.reset(token)
  assert calls == {257: 1, 577: 0}
