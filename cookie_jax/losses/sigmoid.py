"""SigLIP's pairwise sigmoid loss over the global batch, computed as a ring over devices.

    L = -1/N * sum_{i,j} log sigmoid(z_ij * (t * a_i . b_j + c)),   z_ii = +1, z_ij = -1

over all N x N pairs of the global batch, with t the learned logit scale (SigLIP
initialises log t = log 10) and c a learned bias (initialised at -10). **Normalisation:**
the sum over all pairs is divided by the global batch size N, as SigLIP does (Zhai et al.
2023, Algorithm 1: `-sum(log_sigmoid(labels * logits)) / n`), not by the N^2 pairs. The
loss is one-directional in form but symmetric in value: swapping a and b transposes the
pair matrix, so there is no second direction to average.

Over devices, `sigmoid_loss` never gathers the batch. Inside `jax.shard_map` each device
keeps its own a-shard and the b-shards travel around a ring of all batch devices (the
batch mesh axes flattened into one ring) with `jax.lax.ppermute`: at ring step k a device
holds the b-shard of the device k places before it, adds the loss of its B_local x B_local
block, and passes the shard on. The diagonal (the positives) is only in step 0, when a
device holds its own shard. With `chunk_size` the block is cut further into
B_local x chunk_size column chunks. The backward pass is a ring too (a custom VJP): the
b-shards go round again with a gradient accumulator travelling beside each one, which is
home after the last step. So no device ever holds more than B_local x B_local logits
(B_local x chunk_size with chunking), in the forward or the backward pass, against the
B_local x N of `sigmoid_loss_all_gather`, the peer that gathers b.
"""

import functools

import jax
import jax.numpy as jnp

from cookie_jax.losses.contrastive import AxisName, _column_chunks, _gather, _global_sum, _offset


def _ring_size(axis_name: AxisName) -> int:
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _pass_on(x: jax.Array, axis_name: AxisName, n: int) -> jax.Array:
  """x to the next device of the ring (the flattened batch axes)."""
  if n == 1:
    return x
  return jax.lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)])


def _varying(x: jax.Array, axis_name: AxisName) -> jax.Array:
  # A replicated scalar (t, c) made per-device before the custom VJP, which returns a
  # per-device cotangent for it; the transpose of this cast is the psum over devices.
  x = jnp.asarray(x, jnp.float32)
  return x if axis_name is None else jax.lax.pcast(x, axis_name, to='varying')


def _block(a, k, valid, own, col0):
  """(similarities, positive mask, valid mask) of a [n, chunk] block; `own`: k is a chunk
  of a's own shard, starting at column `col0`."""
  rows = jnp.arange(a.shape[0])[:, None]
  cols = col0 + jnp.arange(k.shape[0])[None, :]
  return a @ k.T, own & (rows == cols), valid[None, :]


def _chunked(b, chunk_size):
  chunks, valid = _column_chunks(b, chunk_size)
  starts = jnp.arange(chunks.shape[0]) * chunk_size
  return chunks, valid, starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring_sum(a, b, t, c, axis_name, chunk_size):
  """This device's rows' sum over all N columns of -log sigmoid(z * logits)."""
  return _ring_sum_fwd(a, b, t, c, axis_name, chunk_size)[0]


def _ring_sum_fwd(a, b, t, c, axis_name, chunk_size):
  n = _ring_size(axis_name)

  def ring_step(carry, k):
    total, b_here = carry

    def chunk(acc, xs):
      kb, valid, col0 = xs
      sims, pos, ok = _block(a, kb, valid, k == 0, col0)
      logits = t * sims + c
      terms = -jax.nn.log_sigmoid(jnp.where(pos, logits, -logits))
      return acc + jnp.sum(jnp.where(ok, terms, 0.0)), None
    total, _ = jax.lax.scan(chunk, total, _chunked(b_here, chunk_size))
    return (total, _pass_on(b_here, axis_name, n)), None
  # Derived from `a` so that the carry is per-device under shard_map.
  zero = jnp.sum(a[:1, :1]) * 0
  (total, _), _ = jax.lax.scan(ring_step, (zero, b), jnp.arange(n))
  return total, (a, b, t, c)


def _ring_sum_bwd(axis_name, chunk_size, res, g):
  a, b, t, c = res
  n = _ring_size(axis_name)
  n_local = b.shape[0]

  def ring_step(carry, k):
    da, dt, dc, b_here, db_here = carry

    def chunk(acc, xs):
      da, dt, dc = acc
      kb, valid, col0 = xs
      sims, pos, ok = _block(a, kb, valid, k == 0, col0)
      logits = t * sims + c
      # d/dx -log sigmoid(z x) = sigmoid(x) - [z = +1].
      p = jnp.where(ok, jax.nn.sigmoid(logits) - pos.astype(jnp.float32), 0.0) * g
      return (da + t * (p @ kb), dt + jnp.sum(p * sims), dc + jnp.sum(p)), t * (p.T @ a)
    (da, dt, dc), dk = jax.lax.scan(chunk, (da, dt, dc), _chunked(b_here, chunk_size))
    db_here = db_here + dk.reshape(-1, b.shape[1])[:n_local]
    # The accumulator travels with its shard; after n steps both are home.
    return (da, dt, dc, _pass_on(b_here, axis_name, n),
            _pass_on(db_here, axis_name, n)), None
  zero = jnp.sum(a[:1, :1]) * 0
  init = (jnp.zeros_like(a), zero, zero, b, jnp.zeros_like(b))
  (da, dt, dc, _, db), _ = jax.lax.scan(ring_step, init, jnp.arange(n))
  return da, db, dt, dc


_ring_sum.defvjp(_ring_sum_fwd, _ring_sum_bwd)


def sigmoid_loss(a: jax.Array, b: jax.Array, params, axis_name: AxisName = None, *,
                 chunk_size: int = 0) -> jax.Array:
  """SigLIP's loss of local shards `a`, `b` [B_local, D] over the global batch, as a ring.

  `params` = (t, c): the logit scale and the bias, replicated. With `axis_name=None` it
  is the single-device loss of the batch it is given. `chunk_size > 0` computes each ring
  step's block in column chunks of that many. Returns the global loss (divided by the
  global batch size N, see the module doc), identical on every device.
  """
  if chunk_size < 0:
    raise ValueError(f'chunk_size={chunk_size} must be >= 0 (0 = B_local x B_local blocks).')
  t, c = params
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  n_local = a.shape[0]
  chunk = min(chunk_size, n_local) if chunk_size else n_local
  local = _ring_sum(a, b, _varying(t, axis_name), _varying(c, axis_name), axis_name, chunk)
  return _global_sum(local, axis_name) / (n_local * _ring_size(axis_name))


def sigmoid_loss_all_gather(a: jax.Array, b: jax.Array, params,
                            axis_name: AxisName = None) -> jax.Array:
  """The same loss with b all-gathered: B_local x N logits per device, plain autodiff.

  The straightforward sharded form (each device against the whole gathered b), kept as
  the peer of the ring in tests and in benchmarks/memory_scaling.py.
  """
  t, c = params
  a = a.astype(jnp.float32)
  b_all = _gather(b.astype(jnp.float32), axis_name)
  n_local, n_global = a.shape[0], b_all.shape[0]
  logits = t * (a @ b_all.T) + c
  rows = _offset(n_local, axis_name) + jnp.arange(n_local)
  pos = rows[:, None] == jnp.arange(n_global)[None, :]
  local = jnp.sum(-jax.nn.log_sigmoid(jnp.where(pos, logits, -logits)))
  return _global_sum(local, axis_name) / n_global
