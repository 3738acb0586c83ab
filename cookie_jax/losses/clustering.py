"""Online clustering pseudo-labels and the swapped pseudo-label prediction loss (CODER).

CODER (Wang et al., ECCV 2022) generates online clustering labels for each image and text
from their embeddings and adds a pseudo-label prediction loss. We follow SwAV (Caron et
al., NeurIPS 2020), which CODER's clustering builds on: K learnable prototypes c_k; the
scores of a sample are its cosine similarities to them; the codes Q are the
equipartitioned soft assignment of the *global* batch to the prototypes, found by a few
Sinkhorn-Knopp iterations on exp(scores / epsilon); each modality then predicts the other
modality's codes of the same pair (image predicts text's, text predicts image's):

    L = -1/(2N) sum_i [ q^text_i . log softmax(p^image_i / tau) + q^image_i . log softmax(p^text_i / tau) ]

The codes are held fixed (stop-gradient). Written for one device's shard inside
`jax.shard_map`: the batch sums of the Sinkhorn iterations are psums over the batch axes,
so the codes equal those of the whole batch on one device.
"""

import jax
import jax.numpy as jnp

from cookie_jax.losses.contrastive import AxisName, _global_sum


def _normalize(x):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def sinkhorn(scores: jax.Array, axis_name: AxisName = None, *, epsilon: float = 0.05,
             iterations: int = 3) -> jax.Array:
  """Codes [B_local, K] of local scores [B_local, K]: every row sums to 1 and, over the
  global batch of N rows, every prototype's column sums to N / K. No gradient flows
  through the codes (they are targets)."""
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
  # Subtract the global max for stability; Sinkhorn is invariant to a constant factor.
  top = jnp.max(scores)
  if axis_name is not None:
    top = jax.lax.pmax(top, axis_name)
  q = jnp.exp(scores - top)
  n_local, k = q.shape
  n_global = _global_sum(jnp.float32(n_local), axis_name)
  q = q / _global_sum(jnp.sum(q), axis_name)
  for _ in range(iterations):
    q = q / (_global_sum(jnp.sum(q, axis=0, keepdims=True), axis_name) * k)   # columns: 1/K
    q = q / (jnp.sum(q, axis=1, keepdims=True) * n_global)                     # rows: 1/N
  return q * n_global


def swapped_prediction(a: jax.Array, b: jax.Array, prototypes: jax.Array,
                       axis_name: AxisName = None, *, temperature: float = 0.1,
                       epsilon: float = 0.05, iterations: int = 3) -> jax.Array:
  """The loss above for local shards `a` (images), `b` (texts) [B_local, D] and the
  replicated `prototypes` [K, D]. Returns the global-batch mean."""
  c = _normalize(prototypes)
  p_a, p_b = _normalize(a) @ c.T, _normalize(b) @ c.T
  q_a = sinkhorn(p_a, axis_name, epsilon=epsilon, iterations=iterations)
  q_b = sinkhorn(p_b, axis_name, epsilon=epsilon, iterations=iterations)
  ce = (-jnp.sum(q_b * jax.nn.log_softmax(p_a / temperature, axis=1))
        - jnp.sum(q_a * jax.nn.log_softmax(p_b / temperature, axis=1)))
  n_global = _global_sum(jnp.float32(a.shape[0]), axis_name)
  return _global_sum(ce, axis_name) / (2.0 * n_global)
