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

from typing import Sequence

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


def info_nce(a: jax.Array, b: jax.Array, scale: jax.Array, axis_name: AxisName = None
             ) -> jax.Array:
  """Symmetric InfoNCE of local shards `a`, `b` [B_local, D] over the global batch.

  With `axis_name=None` it is the plain single-device loss over the batch it is given.
  Returns the global-batch mean, identical on every device.
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  n_local = a.shape[0]
  labels = _offset(n_local, axis_name) + jnp.arange(n_local)
  a_all, b_all = _gather(a, axis_name), _gather(b, axis_name)
  n_global = a_all.shape[0]
  loss_ab = _cross_entropy_sum(scale * (a @ b_all.T), labels)   # [B_local, B_global]
  loss_ba = _cross_entropy_sum(scale * (b @ a_all.T), labels)
  return _global_sum(loss_ab + loss_ba, axis_name) / (2.0 * n_global)
