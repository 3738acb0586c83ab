"""Contrastive losses over global negatives, written for one device's shard.

Every loss here is a symmetric InfoNCE between two sets of L2-normalised embeddings `a` and
`b` in which row i of `a` and row i of `b` are a positive pair and every other row of the
*global* batch is a negative:

    L = 1/(2N) * sum_i [ CE(s * a_i . b^T, i) + CE(s * b_i . a^T, i) ]

with N the global batch and s the logit scale (1 / temperature). It is used three ways:

* cross-modal (COOKIE's image<->text term): a = image embeddings, b = text embeddings,
  s = the model's learned scale;
* visual knowledge sharing: a = image embeddings, b = the partner view of the same images,
  either a second augmented view through the same path (both sides trained, as SimCLR /
  SimCSE do) or an external partner embedding (e.g. a frozen unimodal encoder; b is held
  fixed with stop_gradient and a is first mapped into b's space by a learned head);
  s = 1 / `loss.visual.temperature`;
* textual knowledge sharing: the same with texts, where the second view is a second pass
  with another dropout mask (SimCSE's unsupervised recipe).

The COOKIE paper describes its knowledge-sharing terms only in words; this two-view InfoNCE
is our reading of it, chosen because it is the standard contrastive form, shares one
implementation with the cross-modal term, and reduces to CLIP's loss for the cross-modal
pair (open_clip's `ClipLoss` with `local_loss=True, gather_with_grad=True`).

Local-loss form: inside `jax.shard_map`, each device all-gathers (tiled) `a` and `b` over
the batch axes and builds only its own B_local x B_global logits; the all-gather's
transpose (a reduce-scatter) carries gradients of the gathered negatives back to the
device that owns them. The psum of the local sums over the global N is the global mean.
"""

import functools
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

AxisName = str | Sequence[str] | None


def _gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _offset(n_local: int, axis_name: AxisName) -> jax.Array:
  if axis_name is None:
    return jnp.int32(0)
  return jax.lax.axis_index(axis_name) * n_local


def _global_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _cross_entropy_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Sum over rows of softmax cross-entropy with integer labels, in fp32."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jnp.sum(jax.nn.logsumexp(logits, axis=1) - picked)


class NegativeWeighting(NamedTuple):
  """Stop-gradient weights on the negatives of each row (see `_log_weights`).

  kind 'diversity': w_ij = exp(beta s_ij) / mean_k exp(beta s_ik) over row i's negatives,
    s = cosine similarity. CODER's diversity-sensitive contrastive loss (Wang et al., ECCV
    2022) weights negative pairs adaptively by their similarity; the paper gives no closed
    form we could check, so this self-normalised importance weight (Robinson et al., ICLR
    2021) is our reading. beta = 0 gives w = 1: plain InfoNCE.
  kind 'topk': w_ij = 1 for the `topk` most similar negatives of row i, 0 for the rest:
    in-batch hard-negative mining (VSE++'s hardest negative, softened to a top-k softmax),
    the alternative to VLDeformer's composed negatives.
  """
  kind: str
  beta: float = 0.0
  topk: int = 0


def _log_weights(sims: jax.Array, negative: jax.Array, weighting: NegativeWeighting | None
                 ) -> jax.Array:
  """log w for every column of `sims` [n, N]: 0 at the positive, -inf where not a negative."""
  neg_inf = jnp.float32(-jnp.inf)
  if weighting is None:
    return jnp.where(negative, 0.0, neg_inf)
  sims = jax.lax.stop_gradient(sims)
  if weighting.kind == 'diversity':
    z = jnp.where(negative, weighting.beta * sims, neg_inf)
    count = jnp.maximum(jnp.sum(negative, axis=1, keepdims=True), 1)
    log_mean = jax.nn.logsumexp(z, axis=1, keepdims=True) - jnp.log(count.astype(jnp.float32))
    logw = z - log_mean
  elif weighting.kind == 'topk':
    masked = jnp.where(negative, sims, neg_inf)
    k = min(weighting.topk, sims.shape[1])
    kth = jax.lax.top_k(masked, k)[0][:, -1:]
    logw = jnp.where(negative & (masked >= kth), 0.0, neg_inf)
  else:
    raise ValueError(f'Unknown negative weighting {weighting.kind!r}; '
                     "use 'diversity' or 'topk'.")
  return jnp.where(negative, logw, neg_inf)


def _extra_keys(negatives, axis_name):
  """(keys [E, D], valid [E]) of the extra negatives of one direction, or None.

  `negatives` maps 'batch' -> (emb, valid) sharded like the batch (gathered here) and
  'queue' -> (emb, valid) replicated on every device (a momentum queue)."""
  keys, valid = [], []
  for kind in ('batch', 'queue'):
    if kind in negatives:
      emb, ok = negatives[kind]
      if kind == 'batch':
        emb, ok = _gather(emb, axis_name), _gather(ok, axis_name)
      keys.append(emb.astype(jnp.float32))
      valid.append(ok.astype(bool))
  if not keys:
    return None
  return jnp.concatenate(keys), jnp.concatenate(valid)


def _directional_sum(q, keys, labels, scale, extra, weighting):
  """sum_i [-z_i,pos + log(exp(z_i,pos) + sum_j w_ij exp(z_ij))] over local query rows."""
  sims = q @ keys.T                                     # [B_local, B_global]
  n_keys = keys.shape[0]
  valid = jnp.ones((n_keys,), bool)
  if extra is not None:
    sims = jnp.concatenate([sims, q @ extra[0].T], axis=1)
    valid = jnp.concatenate([valid, extra[1]])
  positive = jnp.arange(sims.shape[1])[None, :] == labels[:, None]
  logw = _log_weights(sims, valid[None, :] & ~positive, weighting)
  logits = scale * sims
  picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jnp.sum(jax.nn.logsumexp(jnp.where(positive, logits, logits + logw), axis=1)
                 - picked)


def info_nce(a: jax.Array, b: jax.Array, scale: jax.Array, axis_name: AxisName = None, *,
             negatives: Mapping[str, Mapping] | None = None,
             weighting: NegativeWeighting | None = None) -> jax.Array:
  """Symmetric InfoNCE of local shards `a`, `b` [B_local, D] over the global batch.

  With `axis_name=None` it is the plain single-device loss over the batch it is given.
  Returns the global-batch mean, identical on every device.

  `negatives` appends extra negatives: `negatives['b']` are more keys in b's space for
  the a -> b direction (composed negative captions, a text queue), `negatives['a']` the
  same for b -> a; each maps 'batch' / 'queue' to (embeddings, valid mask), see
  `_extra_keys`. `weighting` re-weights the negatives (`NegativeWeighting`). Without
  either it is the plain loss above.
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  n_local = a.shape[0]
  labels = _offset(n_local, axis_name) + jnp.arange(n_local)
  a_all, b_all = _gather(a, axis_name), _gather(b, axis_name)
  n_global = a_all.shape[0]
  negatives = negatives or {}
  if not negatives and weighting is None:
    loss_ab = _cross_entropy_sum(scale * (a @ b_all.T), labels)   # [B_local, B_global]
    loss_ba = _cross_entropy_sum(scale * (b @ a_all.T), labels)
  else:
    loss_ab = _directional_sum(a, b_all, labels, scale,
                               _extra_keys(negatives.get('b', {}), axis_name), weighting)
    loss_ba = _directional_sum(b, a_all, labels, scale,
                               _extra_keys(negatives.get('a', {}), axis_name), weighting)
  return _global_sum(loss_ab + loss_ba, axis_name) / (2.0 * n_global)


# Chunked form --------------------------------------------------------------------------
# At a global batch of 64k the B_local x B_global logits of `info_nce` (and the softmax
# kept for its backward) dominate memory. The chunked form never holds more than
# B_local x chunk of them: the logsumexp over the gathered negatives runs as an online
# logsumexp over column chunks, and its custom VJP recomputes each chunk's softmax in the
# backward instead of storing it (FlashAttention's trick, one level up). The gathered
# embeddings themselves (B_global x D) are still materialised; they are D/chunk times
# smaller than the logits they replace.


def _column_chunks(k: jax.Array, chunk_size: int):
  """[B, D] -> ([C, chunk, D] zero-padded, [C, chunk] validity mask)."""
  n = k.shape[0]
  n_chunks = -(-n // chunk_size)
  pad = n_chunks * chunk_size - n
  k = jnp.pad(k, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, k.shape[1])
  valid = (jnp.arange(n_chunks * chunk_size) < n).reshape(n_chunks, chunk_size)
  return k, valid


def _chunk_logits(q, k_chunk, valid):
  return jnp.where(valid[None, :], q @ k_chunk.T, -jnp.inf)


# chunk_size is static (a Python int), hence a non-differentiable argument. The scale is
# folded into `q` by the caller, so its gradient comes from ordinary autodiff (and, inside
# shard_map, with the right replication type).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _chunked_logsumexp(q: jax.Array, k: jax.Array, chunk_size: int) -> jax.Array:
  """logsumexp_j(q_i . k_j) for every row i, over column chunks of `k`."""
  return _chunked_logsumexp_fwd(q, k, chunk_size)[0]


def _chunked_logsumexp_fwd(q, k, chunk_size):
  chunks, valid = _column_chunks(k, chunk_size)

  def body(carry, xs):
    m, s = carry
    logits = _chunk_logits(q, *xs)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
    return (m_new, s), None
  # Derived from q so that the carry has q's type under shard_map (varying over the batch).
  zero = q[:, 0] * 0
  (m, s), _ = jax.lax.scan(body, (zero - jnp.inf, zero), (chunks, valid))
  lse = m + jnp.log(s)
  return lse, (q, k, lse)


def _chunked_logsumexp_bwd(chunk_size, res, g):
  q, k, lse = res
  chunks, valid = _column_chunks(k, chunk_size)

  def body(dq, xs):
    k_chunk, valid_chunk = xs
    # d lse_i / d logit_ij = softmax_ij, recomputed from the saved lse.
    p = jnp.exp(_chunk_logits(q, k_chunk, valid_chunk) - lse[:, None]) * g[:, None]
    return dq + p @ k_chunk, p.T @ q
  dq, dk = jax.lax.scan(body, q * 0, (chunks, valid))
  return dq, dk.reshape(-1, k.shape[1])[:k.shape[0]]


_chunked_logsumexp.defvjp(_chunked_logsumexp_fwd, _chunked_logsumexp_bwd)


def info_nce_chunked(a: jax.Array, b: jax.Array, scale: jax.Array,
                     axis_name: AxisName = None, chunk_size: int = 1024) -> jax.Array:
  """`info_nce` with O(B_local x chunk_size) logits memory instead of O(B_local x B_global).

  Same value and gradients as `info_nce` (up to fp32 summation order). The positive logit
  of row i pairs local row i with the gathered row offset+i, which is the local row of
  the other side, so it needs no gathered lookup.
  """
  if chunk_size <= 0:
    raise ValueError(f'chunk_size={chunk_size} must be positive (use info_nce for 0).')
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)
  a_all, b_all = _gather(a, axis_name), _gather(b, axis_name)
  n_global = a_all.shape[0]
  chunk_size = min(chunk_size, n_global)
  positives = scale * jnp.sum(a * b, axis=1)
  loss_ab = jnp.sum(_chunked_logsumexp(scale * a, b_all, chunk_size) - positives)
  loss_ba = jnp.sum(_chunked_logsumexp(scale * b, a_all, chunk_size) - positives)
  return _global_sum(loss_ab + loss_ba, axis_name) / (2.0 * n_global)
