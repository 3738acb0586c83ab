"""Transformer building blocks shared by the towers and the weight-sharing transformer.

Parameters are fp32 and carry logical axis names in their `logical_axes` metadata; matmuls
run in the configured compute dtype, LayerNorm and softmax in fp32.

Sub-module names follow transformers' BERT/ViT layout (query/key/value, output dense,
intermediate, ...) so that checkpoint conversion is a renaming and a transpose.
"""

import contextvars
import functools
import math
from typing import Sequence

from flax import nnx
import jax
import jax.extend
import jax.numpy as jnp

from cookie_jax.models import attention

# transformers' BERT and ViT both default to layer_norm_eps=1e-12.
LAYER_NORM_EPS = 1e-12
INIT_STD = 0.02


# How activations are pinned to the mesh: set by the step that traces the model
# (`sharding.activation_sharding`), unset (no constraint) everywhere else, so that the
# modules stay free of meshes. Called as fn(x, logical_axes).
ACTIVATION_SHARDING = contextvars.ContextVar('activation_sharding', default=None)


# The platform the step being traced will run on: set with the mesh by
# `sharding.activation_sharding`, so that a step traced on a CPU host for a TPU slice
# (`launch/compile.py`) is the program the slice runs. Elsewhere, the default backend.
TARGET_PLATFORM = contextvars.ContextVar('target_platform', default=None)


# Runs a function on each device's block of its arguments (`sharding.activation_sharding`
# sets it with the mesh): fn(f, args, arg_logical_axes), the result laid out like args[0],
# and fn.shards(x, logical_axes) the number of blocks per dimension. Unset: no mesh.
PER_SHARD = contextvars.ContextVar('per_shard', default=None)


def target_platform() -> str:
  return TARGET_PLATFORM.get() or jax.default_backend()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout by logical axis names (e.g. ('batch', 'length',
  'embed')), as MaxText's logical constraints do: without it XLA may follow an FSDP
  parameter's sharded `embed` axis into the activations and gather them instead."""
  fn = ACTIVATION_SHARDING.get()
  return x if fn is None else fn(x, logical_axes)


def normal_init(std: float = INIT_STD):
  return nnx.initializers.normal(std)


def _dense_dims(x):
  return ((x.ndim - 1,), (0,)), ((), ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, precision) -> jax.Array:
  return jax.lax.dot_general(x, w, _dense_dims(x), precision=precision)


def _matmul_fwd(x, w, precision):
  return _matmul(x, w, precision), (x, w)


def _matmul_bwd(precision, res, g):
  # jax's own transpose of x @ w computes the kernel gradient as (g^T x)^T over [..., K]
  # and [..., N]; XLA's CPU backend then copies g transposed and runs a slower GEMM
  # (26.7 against 34.0 GFLOP/s for both gradients at [32, 32, 384] x [384, 1536] on one
  # core). Over the rows flattened, x^T g is one plain GEMM on every backend.
  x, w = res
  k, n = w.shape
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  dw = jax.lax.dot_general(x.reshape(-1, k), g.reshape(-1, n), (((0,), (0,)), ((), ())),
                           precision=precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
  """`lax.dot_general` for `nnx.Linear`; on CPUs x @ kernel gets the gradients above.
  Elsewhere JAX's own: the TPU compiler's estimate for `base` on v5p-32 was 392.5 ms per
  step with `_matmul` and 354.2 ms without (docs/BENCHMARKS.md, "TPU compile")."""
  if (target_platform() == 'cpu' and dimension_numbers == _dense_dims(lhs) and rhs.ndim == 2
      and all(v is None for v in kwargs.values())):
    return _matmul(lhs, rhs, precision)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def dense(in_features: int, out_features: int, axes: Sequence[str | None], *, dtype,
          rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  """A Linear whose kernel and bias carry logical axis names."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=normal_init(), bias_init=nnx.initializers.zeros_init(),
      dot_general=dense_dot_general, kernel_metadata={'logical_axes': tuple(axes)},
      bias_metadata={'logical_axes': (axes[-1],)}, rngs=rngs)


def layer_norm(features: int, *, rngs: nnx.Rngs, eps: float = LAYER_NORM_EPS) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      features, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
      scale_metadata={'logical_axes': ('embed',)},
      bias_metadata={'logical_axes': ('embed',)}, rngs=rngs)


@jax.tree_util.register_pytree_node_class
class ViewKeys:
  """The keys of several views that run through a module as one batch (`run_views`).

  `keys` holds one key per view, [S]. The views' rows alternate one by one: row r of the
  batch is row r // S of view r % S. Every random draw of the model goes through
  `split_rng`, `fold_in` and `draw_rows`, which give each row the numbers its own view's
  key would give it in a pass of its own, so one pass over S views equals S passes.
  """

  def __init__(self, keys: jax.Array):
    self.keys = keys

  @property
  def views(self) -> int:
    return self.keys.shape[0]

  def tree_flatten(self):
    return (self.keys,), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)


Key = jax.Array | ViewKeys | None


def split_rng(rng: Key, n: int) -> list[Key]:
  """`n` keys from `rng`, or `n` Nones in deterministic mode."""
  if rng is None:
    return [None] * n
  if isinstance(rng, ViewKeys):
    keys = jax.vmap(lambda k: jax.random.split(k, n))(rng.keys)
    return [ViewKeys(keys[:, i]) for i in range(n)]
  return list(jax.random.split(rng, n))


def fold_in(rng: jax.Array | ViewKeys, data: int) -> jax.Array | ViewKeys:
  """`jax.random.fold_in`, per view for `ViewKeys`."""
  if isinstance(rng, ViewKeys):
    return ViewKeys(jax.vmap(lambda k: jax.random.fold_in(k, data))(rng.keys))
  return jax.random.fold_in(rng, data)


def draw_rows(draw, rng: jax.Array | ViewKeys, shape: tuple[int, ...]):
  """`draw(rng, shape)`; for `ViewKeys` over S views, each view's draw of its
  shape[0] // S rows, the rows interleaved as `run_views` lays them out. `draw` may
  return None (the caller's fallback), and then so does this."""
  if not isinstance(rng, ViewKeys):
    return draw(rng, shape)
  s = rng.views
  if shape[0] % s:
    raise ValueError(f'{shape[0]} rows cannot hold {s} interleaved views.')
  out = jax.vmap(lambda k: draw(k, (shape[0] // s, *shape[1:])))(rng.keys)
  return None if out is None else jnp.swapaxes(out, 0, 1).reshape(shape)


def run_views(fn, views: Sequence[Sequence[jax.Array]], keys: Sequence[jax.Array | None]):
  """`[fn(*view, rng=key) for view, key in zip(views, keys)]` in one call of `fn`.

  The views' arguments (each a batch of the same shape) are interleaved row by row and
  `fn` runs once with `ViewKeys`, so that a tower shared by several views (a second
  image view, a second dropout pass, composed negatives) runs as one batch: under FSDP
  its weights are gathered, and their gradients reduced, once per step rather than once
  per view. The outputs equal the separate calls' (each row draws its own view's dropout,
  `ViewKeys`) up to float rounding. `fn` must be row-wise: nothing may mix rows.
  """
  if len(views) == 1:
    return [fn(*views[0], rng=keys[0])]
  if any(k is None for k in keys) and any(k is not None for k in keys):
    raise ValueError('run_views: either every view has a key or none has.')
  s = len(views)
  args = [jnp.stack(parts, axis=1).reshape(parts[0].shape[0] * s, *parts[0].shape[1:])
          for parts in zip(*views)]
  rng = None if keys[0] is None else ViewKeys(jnp.stack(keys))
  out = fn(*args, rng=rng)
  out = out.reshape(out.shape[0] // s, s, *out.shape[1:])
  return [out[:, i] for i in range(s)]


def _uniform_u16(rng: jax.Array | ViewKeys, shape: tuple[int, ...]) -> jax.Array | None:
  """Uniform 16-bit integers of `shape` (as uint32), four from each Threefry hash.

  `jax.random.bernoulli` spends one Threefry-2x32 hash (20 rounds on two words) per
  element and keeps 32 bits of its 64. Dropout needs far fewer: 16 bits resolve a rate to
  1.5e-5, so each hash here gives four elements. The counter of a hash is its index in
  the array, as in jax's partitionable Threefry, so the bits do not depend on how the
  array is sharded and a sharded step draws the same masks as an unsharded one.
  With `ViewKeys` over S views, row r hashes with view r % S's key and counts as row
  r // S of that view's array: the bits `draw_rows` would give, drawn in place.
  Returns None where this does not apply (a non-Threefry key, or 2**32 hashes or more).
  """
  views, keys = (rng.views, rng.keys) if isinstance(rng, ViewKeys) else (1, rng)
  if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(keys)) != 'threefry2x32':
      return None
    keys = jax.random.key_data(keys)
  *lead, last = shape
  words = -(-last // 4)
  grid = (*lead, words)
  view_grid = (grid[0] // views, *grid[1:])  # (the grid itself for one view)
  if math.prod(view_grid) >= 2**32 or grid[0] % views:
    return None
  counts = jnp.zeros(grid, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(grid))):
    index = jax.lax.broadcasted_iota(jnp.uint32, grid, axis)
    if axis == 0 and views > 1:
      index = index // jnp.uint32(views)
    counts = counts + index * jnp.uint32(stride)
    stride *= view_grid[axis]
  k0, k1 = keys[..., 0], keys[..., 1]
  if views > 1:  # row r's key: view r % S's
    rows = jnp.tile(keys, (grid[0] // views, 1)).reshape(grid[0], *[1] * (len(grid) - 1), 2)
    k0, k1 = (jnp.broadcast_to(rows[..., i], grid) for i in range(2))
  hi, lo = jax.extend.random.threefry2x32_p.bind(k0, k1, jnp.zeros_like(counts), counts)
  mask = jnp.uint32(0xFFFF)
  parts = [hi & mask, hi >> 16, lo & mask, lo >> 16]
  return jnp.stack(parts, axis=-1).reshape(*lead, 4 * words)[..., :last]


def dropout(x: jax.Array, rate: float, rng: Key) -> jax.Array:
  if rng is None or rate == 0.0:
    return x
  bits = _uniform_u16(rng, x.shape)
  if bits is None:
    keep = draw_rows(lambda k, shape: jax.random.bernoulli(k, 1.0 - rate, shape), rng,
                     x.shape)
    keep_prob = 1.0 - rate
  else:
    # Dropped with probability threshold / 2**16, and the kept values scaled by the
    # inverse of the exact keep probability, so that the expectation is x.
    threshold = round(rate * 65536)
    keep, keep_prob = bits >= threshold, 1.0 - threshold / 65536
  return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


def gelu(x: jax.Array) -> jax.Array:
  # BERT and ViT use the exact erf GELU, not the tanh approximation, written as PyTorch
  # writes it: 0.5 x (1 + erf(x / sqrt 2)). jax.nn.gelu's 0.5 x erfc(-x / sqrt 2) is the
  # same function but XLA's erfc needs an exp (two fusions per use on CPU); erf does not.
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


def gelu_tanh(x: jax.Array) -> jax.Array:
  # PyTorch's gelu(approximate='tanh') (transformers' 'gelu_pytorch_tanh'; SigLIP).
  return jax.nn.gelu(x, approximate=True)


def quick_gelu(x: jax.Array) -> jax.Array:
  # x * sigmoid(1.702 x): OpenAI CLIP's activation (transformers' 'quick_gelu').
  return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)


# config name -> function; the names are the `hidden_act` values transformers writes.
ACTIVATIONS = {'gelu': gelu, 'gelu_pytorch_tanh': gelu_tanh, 'quick_gelu': quick_gelu}


def layer_scale(width: int, init: float) -> nnx.Param:
  """LayerScale's per-channel factor on a residual branch (CaiT; DINOv2's `lambda1`)."""
  return nnx.Param(jnp.full((width,), init, jnp.float32), logical_axes=('embed',))


class MultiHeadAttention(nnx.Module):
  """Self-attention with a padding mask; queries, keys and values are full-width Linears."""

  def __init__(self, width: int, heads: int, *, attention_dropout: float, dtype,
               rngs: nnx.Rngs):
    self.heads = heads
    self.head_dim = width // heads
    self.attention_dropout = attention_dropout
    # On TPU, attention without dropout runs as one Pallas kernel (`_kernel`);
    # `CookieModel` sets it from `model.attention_kernel`.
    self.kernel = True
    self.dtype = dtype
    self.query = dense(width, width, ('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.key = dense(width, width, ('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.value = dense(width, width, ('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.out = dense(width, width, ('heads', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None, *,
               rng: jax.Array | None = None) -> jax.Array:
    b, t, _ = x.shape
    q, k, v = self.query(x), self.key(x), self.value(x)
    dropout_on = rng is not None and self.attention_dropout > 0.0
    if self.kernel and not dropout_on and target_platform() == 'tpu':
      out = self._kernel(q, k, v, mask)
      if out is not None:
        return self.out(out)
    split = lambda y: y.reshape(b, t, self.heads, self.head_dim)
    q, k, v = split(q), split(k), split(v)
    # mask: [B, T] with True on real tokens -> [B, 1, 1, T] over (batch, heads, q, k).
    attn_mask = None if mask is None else mask[:, None, None, :].astype(bool)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
    if attn_mask is not None:
      logits = jnp.where(attn_mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_on:
      probs = dropout(probs, self.attention_dropout, rng)
    probs = probs.astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return self.out(out.reshape(b, t, self.heads * self.head_dim))

  def _kernel(self, q, k, v, mask):
    """`attention.fused_attention` on each device's rows (and heads, where the mesh
    splits whole heads); attention without dropout on TPU. None where a device's block
    would not fit the kernel's VMEM (`attention.fits`)."""
    local = PER_SHARD.get()
    axes = ('batch', 'length', 'heads')
    split = 1 if local is None else local.shards(q, axes)[-1]
    if self.heads % split:  # the mesh would split a head: keep heads whole
      axes, split = ('batch', 'length', None), 1
    heads = self.heads // split
    if not attention.fits(q.shape[1], heads * self.head_dim, q.dtype):
      return None
    args = (q, k, v) if mask is None else (q, k, v, mask.astype(jnp.int32))
    fn = lambda q, k, v, m=None: attention.fused_attention(q, k, v, m, heads=heads)
    if local is None:
      return fn(*args)
    return local(fn, args, (axes,) * 3 + (axes[:2],))


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def residual_add(x: jax.Array, h: jax.Array) -> jax.Array:
  """x + h summed in fp32 and kept in x's dtype: the residual stream (and every block
  input remat saves) stays in the compute dtype, half the bytes in bf16, rounded once per
  sum. (The TPU compiler's estimate for `base` on v5p-32: docs/BENCHMARKS.md.)"""
  return (_f32(x) + _f32(h)).astype(x.dtype)


class PreNormBlock(nnx.Module):
  """A pre-LN transformer block laid out like transformers' `ViTLayer`; with
  `layer_scale` > 0 each residual branch is scaled per channel (DINOv2's LayerScale,
  initialised at that value), with `activation` one of `ACTIVATIONS` (CLIP, SigLIP)."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, dropout_rate: float,
               attention_dropout: float, dtype, rngs: nnx.Rngs, activation: str = 'gelu',
               eps: float = LAYER_NORM_EPS, layer_scale_init: float = 0.0):
    self.dtype = dtype
    self.dropout_rate = dropout_rate
    self.activation = ACTIVATIONS[activation]
    self.layernorm_before = layer_norm(width, rngs=rngs, eps=eps)
    self.attention = MultiHeadAttention(width, heads, attention_dropout=attention_dropout,
                                        dtype=dtype, rngs=rngs)
    self.layernorm_after = layer_norm(width, rngs=rngs, eps=eps)
    self.intermediate = dense(width, mlp_dim, ('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.output = dense(mlp_dim, width, ('mlp', 'embed'), dtype=dtype, rngs=rngs)
    scaled = layer_scale_init > 0
    self.layer_scale1 = layer_scale(width, layer_scale_init) if scaled else None
    self.layer_scale2 = layer_scale(width, layer_scale_init) if scaled else None

  def _scale(self, h, factor):
    return h if factor is None else h * factor[...].astype(h.dtype)

  def __call__(self, x, mask=None, *, rng=None):
    r_attn, r1, r2 = split_rng(rng, 3)
    h = self._scale(self.attention(self.layernorm_before(x), mask, rng=r_attn),
                    self.layer_scale1)
    x = residual_add(x, dropout(h, self.dropout_rate, r1))
    h = self.output(self.activation(self.intermediate(self.layernorm_after(x))))
    return residual_add(x, dropout(self._scale(h, self.layer_scale2), self.dropout_rate, r2))


class PostNormBlock(nnx.Module):
  """A post-LN transformer block laid out like transformers' `BertLayer` (and
  `RobertaLayer`, the same block)."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, dropout_rate: float,
               attention_dropout: float, dtype, rngs: nnx.Rngs,
               eps: float = LAYER_NORM_EPS):
    self.dtype = dtype
    self.dropout_rate = dropout_rate
    self.attention = MultiHeadAttention(width, heads, attention_dropout=attention_dropout,
                                        dtype=dtype, rngs=rngs)
    self.attention_norm = layer_norm(width, rngs=rngs, eps=eps)
    self.intermediate = dense(width, mlp_dim, ('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.output = dense(mlp_dim, width, ('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.output_norm = layer_norm(width, rngs=rngs, eps=eps)

  def __call__(self, x, mask=None, *, rng=None):
    r_attn, r1, r2 = split_rng(rng, 3)
    h = self.attention(x, mask, rng=r_attn)
    x = self.attention_norm(_f32(x) + _f32(dropout(h, self.dropout_rate, r1))).astype(x.dtype)
    h = self.output(gelu(self.intermediate(x)))
    return self.output_norm(_f32(x) + _f32(dropout(h, self.dropout_rate, r2))).astype(x.dtype)


# What a rematerialised block keeps from its forward pass for the backward pass
# (model.remat_policy); the rest is computed again. Each keeps the block's input.
REMAT_POLICIES = {
    # Nothing more: the backward runs the whole block again (least memory).
    'full': None,
    # The outputs of the dense layers (matmuls whose operands have no batch dimension:
    # the attention's projections and the MLP); LayerNorm, GELU, softmax and the
    # attention's two einsums are recomputed.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Every matmul's output, the attention's scores and weighted values included.
    'all_dots': jax.checkpoint_policies.dots_saveable,
}


def run_blocks(blocks, x, mask, rng, *, remat: bool | str):
  """Applies a list of blocks in order, each with its own dropout key. The residual
  stream between them is in the blocks' compute dtype (`residual_add`). `remat`: False,
  or a `REMAT_POLICIES` name (True = 'full') to rematerialise each block with it.

  On CPU the dense layers' matmul has its own gradient (`_matmul`, a custom VJP), which
  the policies do not see inside: there 'dots' keeps what 'full' keeps."""
  keys = split_rng(rng, len(blocks))
  policy = REMAT_POLICIES['full' if remat is True else remat] if remat else None
  residual = ('batch', 'length', 'embed')
  if blocks:
    x = x.astype(blocks[0].dtype)
  x = constrain(x, residual)
  for block, key in zip(blocks, keys):
    if remat:
      x = nnx.remat(lambda blk, y, m, r: blk(y, m, rng=r), policy=policy)(block, x, mask,
                                                                           key)
    else:
      x = block(x, mask, rng=key)
    x = constrain(x, residual)
  return x
