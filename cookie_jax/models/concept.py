r"""CODER's concept-level branch: a GCN over mined concepts, attended from each embedding.

CODER (Wang et al., ECCV 2022, "CODER: Coupled Diversity-Sensitive Momentum Contrastive
Learning for Image-Text Retrieval") adds to the instance-level embeddings a concept-level
representation: concepts mined from the training captions are nodes of a co-occurrence
graph, a graph convolutional network gives each a descriptor, and each image or text
embedding is re-expressed as an attention-weighted sum of the descriptors; the image and
text concept-level embeddings are aligned by the same contrastive loss. The paper does
not pin every detail; our reading:

* graph (`normalized_adjacency`): Kipf & Welling's renormalised adjacency
  $\hat A = D^{-1/2} (W + I) D^{-1/2}$, $D_{ii} = \sum_j (W + I)_{ij}$, where $W$ is
  the co-occurrence with its diagonal removed, either binarised ($W_{ij} = [C_{ij} > 0]$)
  or count-weighted as $W_{ij} = \log(1 + C_{ij}) / \log(1 + \max_{k \ne l} C_{kl})$.
  The log tames frequent pairs, and dividing by the largest keeps every edge at most as
  heavy as the self-loop, so a node is never drowned by one frequent neighbour.
* GCN (`ConceptGCN`): $H_0 = X W_{in}$ on node features $X$ (the text tower's word
  embeddings of the concept tokens), then $H_{l+1} = H_l + \sigma(\hat A H_l W_l)$ with
  GELU for $\sigma$, and no $\sigma$ on the last layer. The residual is ours: captions
  make a dense graph (a colour co-occurs with every shape), and plain stacked GCN layers
  then pull all descriptors to the same average (over-smoothing); the residual keeps
  each concept's own identity.
* attention (`attend_concepts`): $a = \mathrm{softmax}_k(\hat e \cdot \hat c_k / \tau)$
  with $\hat{}$ = L2 normalisation, and the concept-level embedding is $\sum_k a_k c_k$.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from cookie_jax.models import layers


def _l2n(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def normalized_adjacency(cooccurrence: jax.Array, *, weighting: str = 'log1p') -> jax.Array:
  """$D^{-1/2} (W + I) D^{-1/2}$ in fp32 of a symmetric [K, K] co-occurrence count.

  weighting: 'log1p' (count-weighted, scaled to at most 1) or 'binary' (any shared
  caption is an edge of weight 1). The diagonal of `cooccurrence` is ignored.
  """
  c = jnp.asarray(cooccurrence, jnp.float32)
  if c.ndim != 2 or c.shape[0] != c.shape[1]:
    raise ValueError(f'cooccurrence {c.shape}: expected a square [K, K] count matrix.')
  k = c.shape[0]
  off = jnp.where(jnp.eye(k, dtype=bool), 0.0, jnp.maximum(c, 0.0))
  if weighting == 'log1p':
    w = jnp.log1p(off) / jnp.maximum(jnp.log1p(jnp.max(off)), 1e-12)
  elif weighting == 'binary':
    w = (off > 0).astype(jnp.float32)
  else:
    raise ValueError(f"weighting={weighting!r}: use 'log1p' (count-weighted) or 'binary'.")
  a = w + jnp.eye(k, dtype=jnp.float32)
  inv_sqrt = jax.lax.rsqrt(jnp.sum(a, axis=1))
  return inv_sqrt[:, None] * a * inv_sqrt[None, :]


class ConceptGCN(nnx.Module):
  """Concept descriptors [K, embed_dim] (fp32) from node features and $\\hat A$."""

  def __init__(self, in_width: int, embed_dim: int, depth: int = 2, *, dtype,
               rngs: nnx.Rngs):
    if depth < 1:
      raise ValueError(f'depth={depth}: a concept GCN needs at least one graph layer.')
    self.depth = depth
    self.input = layers.dense(in_width, embed_dim, ('embed', None), dtype=dtype, rngs=rngs)
    self.graph = nnx.List([
        layers.dense(embed_dim, embed_dim, (None, None), dtype=dtype, rngs=rngs,
                     use_bias=False)  # as Kipf & Welling; and (A H) W = A (H W) holds
        for _ in range(depth)])

  def __call__(self, node_features: jax.Array, adjacency: jax.Array) -> jax.Array:
    k = node_features.shape[0]
    if adjacency.shape != (k, k):
      raise ValueError(f'adjacency {adjacency.shape} does not match {k} concepts in '
                       f'node_features {node_features.shape}; expected [{k}, {k}].')
    h = self.input(node_features).astype(jnp.float32)
    adjacency = adjacency.astype(jnp.float32)
    for i, layer in enumerate(self.graph):
      msg = adjacency @ layer(h).astype(jnp.float32)
      h = h + (msg if i == self.depth - 1 else layers.gelu(msg))
    return h


def attend_concepts(embeddings: jax.Array, descriptors: jax.Array,
                    temperature: float) -> jax.Array:
  """[B, D] fp32: each embedding as a softmax(cosine / temperature) mix of descriptors."""
  if embeddings.shape[-1] != descriptors.shape[-1]:
    raise ValueError(f'embeddings {embeddings.shape} and descriptors {descriptors.shape}: '
                     'the last dimensions (embed_dim) must match.')
  if isinstance(temperature, (int, float)) and temperature <= 0:  # a traced one is not checked
    raise ValueError(f'temperature={temperature}: must be > 0, e.g. 0.1.')
  e = _l2n(embeddings.astype(jnp.float32))
  c = descriptors.astype(jnp.float32)
  weights = jax.nn.softmax(e @ _l2n(c).T / temperature, axis=-1)
  return weights @ c
