"""Self-attention as one Pallas kernel for TPU: the scores never leave VMEM.

XLA's attention (`layers.MultiHeadAttention` on every platform but TPU) writes the
[B, H, T, T] scores and probabilities to HBM, casts them, and copies the projections into
64-wide heads and back: for `base` on v5p-32 the TPU compiler prices that at about 70 ms
of a 354 ms step (docs/BENCHMARKS.md, "Where the estimate goes"). Here each grid step
takes one row's whole sequence (T <= a few hundred tokens fits VMEM: no online softmax),
reads the projections in their own [B, T, heads * head_dim] layout, slices the heads in
VMEM and writes the output in the layout the output projection reads. Its backward is a
second kernel that recomputes the probabilities from the saved log-sum-exp.

A custom call enters the TPU cost model only through the cost it declares
(`pl.CostEstimate`). These kernels declare what the hardware does, not less: the FLOPs of
their matmuls as the MXU runs them, on whole tiles (`_mxu_flops`: a 64-wide head or 197
tokens are padded to 128 and 256), one exp per score, and the bytes of every block read
or written, in HBM's tiled layout (`_hbm_bytes`).
Under `interpreted()` the same kernels run on any backend (the tests, on CPU).
"""

import contextlib
import contextvars
import functools
import math

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

# Whether kernels run in Pallas' interpreter (any backend) instead of Mosaic (TPU only).
INTERPRET = contextvars.ContextVar('interpret', default=False)


@contextlib.contextmanager
def interpreted():
  """Runs the kernels in Pallas' interpreter: a model traced for TPU
  (`layers.TARGET_PLATFORM`) then runs, the same arithmetic, on CPU."""
  token = INTERPRET.set(True)
  try:
    yield
  finally:
    INTERPRET.reset(token)


# A large negative score for padded keys: exp() of it minus the row maximum is 0.
_MASKED = -1e30
# q @ k.T: contract the last dimensions.
_NT = (((1,), (1,)), ((), ()))
# The hardware the declared cost describes: an MXU (128 x 128 on v4, v5e and v5p)
# multiplies whole 128-wide tiles of the contraction and output dimensions and 8-row
# groups; HBM holds arrays in (8 * 4 / itemsize, 128) tiles of their last two dimensions.
# (v6e's MXU is 256 wide: there the kernel is priced below its real work.)
MXU = 128
_LANES, _SUBLANES = 128, 8


def _up(n: int, m: int) -> int:
  return -(-n // m) * m


def _mxu_flops(m: int, k: int, n: int) -> int:
  """FLOPs the MXU spends on an [m, k] x [k, n] matmul: its padded tiles' work."""
  return 2 * _up(m, _SUBLANES) * _up(k, MXU) * _up(n, MXU)


def declared_flops(rows: int, t: int, heads: int, dim: int, backward: bool = False) -> int:
  """The FLOPs a kernel declares: per row and head, q @ k.T and p @ v forward; q @ k.T,
  do @ v.T, p.T @ do, ds @ k and ds.T @ q backward; each on the MXU's whole tiles."""
  over_dim, over_t = (2, 3) if backward else (1, 1)
  return rows * heads * (over_dim * _mxu_flops(t, dim, t) + over_t * _mxu_flops(t, t, dim))


# Mosaic refuses a kernel past its scoped VMEM limit (CompileTimeScopedVmemOom): on v5p
# 12 heads of 64 compiled up to 574 tokens (refused at 581) and 16 heads up to 431
# (refused at 439), where `vmem_bytes` counts 15.9-17.5 MB. This budget, 14.7 MB, stays
# below all four.
VMEM_BUDGET = 14 * 2**20


def vmem_bytes(t: int, width: int, dtype) -> int:
  """VMEM the backward kernel (the larger) asks for at sequence length t and width
  heads * head_dim: its 8 [t, width] blocks, each double-buffered, and two fp32 [t, t]
  tiles (scores and their gradient)."""
  itemsize = jnp.dtype(dtype).itemsize
  blocks = 2 * 8 * _up(t, _SUBLANES * 4 // itemsize) * _up(width, _LANES) * itemsize
  return blocks + 2 * _up(t, _SUBLANES) * _up(t, _LANES) * 4


def fits(t: int, width: int, dtype) -> bool:
  """Whether the kernels fit `VMEM_BUDGET` (`layers.MultiHeadAttention` keeps XLA's
  attention where they do not: e.g. ViT-B at 197 tokens fits, ViT-L/14 at 336 px with
  577 tokens of 1024 does not). Checked against Mosaic's compiles for v5p:
  tests/test_tpu_compile.py."""
  return vmem_bytes(t, width, dtype) <= VMEM_BUDGET


def _hbm_bytes(*arrays) -> int:
  """Bytes of arrays in HBM's tiled layout (the last two dimensions padded to tiles)."""
  total = 0
  for a in arrays:
    itemsize = jnp.dtype(a.dtype).itemsize
    *lead, rows, cols = a.shape
    total += (math.prod(lead) * _up(rows, _SUBLANES * 4 // itemsize) * _up(cols, _LANES) *
              itemsize)
  return total


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
  """a @ b (by default) accumulated in fp32. Operands below fp32 are multiplied as they
  are (Mosaic rejects an fp32 `jax_default_matmul_precision` for them); fp32 ones at the
  configured precision."""
  precision = jax.lax.Precision.DEFAULT if a.dtype.itemsize < 4 else None
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


def _scores(q, k, bias, scale):
  s = _dot(q, k, _NT) * scale
  return s if bias is None else s + bias


def _fwd_kernel(*refs, heads, dim, scale, masked):
  if masked:
    q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref = refs
    bias = bias_ref[0]  # [1, T]
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    bias = None
  for h in range(heads):
    cols = slice(h * dim, (h + 1) * dim)
    v = v_ref[0, :, cols]
    s = _scores(q_ref[0, :, cols], k_ref[0, :, cols], bias, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = _dot(p.astype(v.dtype), v)
    o_ref[0, :, cols] = (o / l).astype(o_ref.dtype)
    lse_ref[0, h, :] = (m + jnp.log(l))[:, 0]


def _bwd_kernel(*refs, heads, dim, scale, masked):
  if masked:
    q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, do_ref, dq_ref, dk_ref, dv_ref = refs
    bias = bias_ref[0]
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref, do_ref, dq_ref, dk_ref, dv_ref = refs
    bias = None
  for h in range(heads):
    cols = slice(h * dim, (h + 1) * dim)
    q, k, v = q_ref[0, :, cols], k_ref[0, :, cols], v_ref[0, :, cols]
    do = do_ref[0, :, cols]
    p = jnp.exp(_scores(q, k, bias, scale) - lse_ref[0, h, :][:, None])  # [T, T]
    # dv = p.T @ do; dp = do @ v.T; ds = p * (dp - rowsum(do * o)).
    dv = _dot(p.T.astype(do.dtype), do)
    dp = _dot(do, v, _NT)
    delta = jnp.sum(do.astype(jnp.float32) * o_ref[0, :, cols].astype(jnp.float32),
                    axis=-1, keepdims=True)
    ds = (p * (dp - delta) * scale).astype(q.dtype)
    dq = _dot(ds, k)
    dk = _dot(ds.T, q)
    dq_ref[0, :, cols] = dq.astype(dq_ref.dtype)
    dk_ref[0, :, cols] = dk.astype(dk_ref.dtype)
    dv_ref[0, :, cols] = dv.astype(dv_ref.dtype)


def _row_spec(t, w):
  return pl.BlockSpec((1, t, w), lambda i: (i, 0, 0))


def _call(kernel, inputs, outputs, *, heads, masked, backward, interpret):
  """`kernel` over the batch, a row per grid step, declaring its cost: its matmuls
  (`declared_flops`), one exp per score, each block read or written once."""
  b, t, w = inputs[0].shape
  dim = w // heads
  return pl.pallas_call(
      functools.partial(kernel, heads=heads, dim=dim, scale=dim ** -0.5, masked=masked),
      grid=(b,),
      in_specs=[_row_spec(*x.shape[1:]) for x in inputs],
      out_specs=[_row_spec(*x.shape[1:]) for x in outputs],
      out_shape=outputs,
      cost_estimate=pl.CostEstimate(
          flops=declared_flops(b, t, heads, dim, backward),
          transcendentals=b * heads * t * t,
          bytes_accessed=_hbm_bytes(*inputs, *outputs)),
      interpret=interpret,
  )(*inputs)


def _forward(q, k, v, bias, heads, interpret):
  b, t, _ = q.shape
  inputs = (q, k, v) if bias is None else (q, k, v, bias)
  outputs = [jax.ShapeDtypeStruct(q.shape, q.dtype),
             jax.ShapeDtypeStruct((b, heads, t), jnp.float32)]
  return _call(_fwd_kernel, inputs, outputs, heads=heads, masked=bias is not None,
               backward=False, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, bias, heads, interpret):
  return _forward(q, k, v, bias, heads, interpret)[0]


def _attention_fwd(q, k, v, bias, heads, interpret):
  o, lse = _forward(q, k, v, bias, heads, interpret)
  return o, (q, k, v, bias, o, lse)


def _attention_bwd(heads, interpret, res, do):
  q, k, v, bias, o, lse = res
  inputs = (q, k, v, o, lse, do) if bias is None else (q, k, v, bias, o, lse, do)
  outputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
  dq, dk, dv = _call(_bwd_kernel, inputs, outputs, heads=heads, masked=bias is not None,
                     backward=True, interpret=interpret)
  return dq, dk, dv, None if bias is None else jnp.zeros_like(bias)


_attention.defvjp(_attention_fwd, _attention_bwd)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None,
                    *, heads: int) -> jax.Array:
  """softmax(q_h k_h^T / sqrt(d)) v_h for each head h, on [B, T, heads * d] projections,
  returned as [B, T, heads * d] in q's dtype. `key_mask` [B, T] is True on real tokens
  (None: all are). Scores, softmax and their gradients are fp32 inside the kernel."""
  if q.shape[-1] % heads:
    raise ValueError(f'width {q.shape[-1]} is not divisible by {heads} heads.')
  bias = None
  if key_mask is not None:
    bias = jnp.where(key_mask.astype(bool), 0.0, _MASKED).astype(jnp.float32)[:, None, :]
  return _attention(q, k, v, bias, heads, INTERPRET.get())
