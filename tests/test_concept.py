"""CODER's concept branch: the normalised graph, the GCN and the attention over concepts."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cookie_jax import sharding
from cookie_jax.models import concept

CO = np.asarray([[5, 3, 0], [3, 4, 1], [0, 1, 2]], np.float32)
# Jitted: one compilation each instead of one per eager op.
adjacency = jax.jit(concept.normalized_adjacency, static_argnames='weighting')
attend = jax.jit(concept.attend_concepts, static_argnums=2)
run = nnx.jit(lambda model, x, adj: model(x, adj))
gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))  # exact, as BERT


def test_normalized_adjacency_matches_hand_computation():
  # log1p weights scaled by the largest off-diagonal count (3), self-loops of 1.
  w = np.asarray([[0, 1, 0], [1, 0, np.log(2) / np.log(4)], [0, np.log(2) / np.log(4), 0]])
  a = w + np.eye(3)
  d = a.sum(1)
  np.testing.assert_allclose(adjacency(CO),
                             a / np.sqrt(d[:, None] * d[None, :]), rtol=1e-6)
  # binary: edges 0-1 and 1-2; degrees with self-loops 2, 3, 2.
  hand = np.asarray([[1 / 2, 1 / np.sqrt(6), 0], [1 / np.sqrt(6), 1 / 3, 1 / np.sqrt(6)],
                     [0, 1 / np.sqrt(6), 1 / 2]])
  np.testing.assert_allclose(adjacency(CO, weighting='binary'), hand,
                             rtol=1e-6)
  np.testing.assert_allclose(adjacency(np.diag([4.0, 2.0])), np.eye(2))
  with pytest.raises(ValueError, match="weighting='pmi'"):
    adjacency(CO, weighting='pmi')
  with pytest.raises(ValueError, match=r'\(3, 2\)'):
    adjacency(np.zeros((3, 2)))


def _gcn(depth=2):
  return concept.ConceptGCN(6, 4, depth, dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_gcn_follows_the_formula_and_without_edges_is_per_node():
  gcn = _gcn()
  x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
  adj = adjacency(CO)
  out = np.asarray(run(gcn, x, adj))
  assert out.dtype == np.float32 and out.shape == (3, 4)
  k_in = np.asarray(gcn.input.kernel[...])
  w1, w2 = (np.asarray(g.kernel[...]) for g in gcn.graph)
  a = np.asarray(adj)
  h0 = x @ k_in + np.asarray(gcn.input.bias[...])
  h1 = h0 + gelu(a @ h0 @ w1)
  np.testing.assert_allclose(out, h1 + a @ h1 @ w2, rtol=1e-5, atol=1e-6)
  # No edges: the adjacency is the identity, and each node goes through alone.
  alone = np.concatenate([run(gcn, x[i:i + 1], np.ones((1, 1))) for i in range(3)])
  np.testing.assert_allclose(run(gcn, x, adjacency(np.zeros((3, 3)))), alone,
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(out, alone, atol=1e-3)  # and the edges do matter
  axes = nnx.state(gcn, nnx.Param)
  assert gcn.input.kernel.get_metadata()['logical_axes'] == ('embed', None)
  assert len(jax.tree.leaves(axes)) == 4  # input kernel + bias, two bias-free graph layers
  with pytest.raises(ValueError, match=r'adjacency \(2, 2\).*3 concepts'):
    run(gcn, x, np.eye(2))


def test_attend_concepts():
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(5, 4)).astype(np.float32)
  one = rng.normal(size=(1, 4)).astype(np.float32)
  np.testing.assert_allclose(attend(emb, one, 0.1), np.repeat(one, 5, 0),
                             rtol=1e-6)
  desc = rng.normal(size=(3, 4)).astype(np.float32)
  cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
      desc / np.linalg.norm(desc, axis=1, keepdims=True)).T
  p = np.exp(cos / 0.5) / np.exp(cos / 0.5).sum(1, keepdims=True)
  np.testing.assert_allclose(attend(emb, desc, 0.5), p @ desc, rtol=1e-5)
  # A cold softmax picks the most similar descriptor.
  np.testing.assert_allclose(attend(emb, desc, 1e-4),
                             desc[cos.argmax(1)], rtol=1e-5)
  with pytest.raises(ValueError, match='temperature=0'):
    attend(emb, desc, 0)
  with pytest.raises(ValueError, match='last dimensions'):
    attend(emb, desc[:, :3], 0.1)


def test_gradients_finite():
  gcn = _gcn()
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 6)).astype(np.float32)
  img, txt = (rng.normal(size=(8, 4)).astype(np.float32) for _ in range(2))
  adj = adjacency(CO)

  @nnx.jit
  def loss_and_grads(model, img, txt):
    def loss_fn(model, img, txt):  # InfoNCE between the two concept-level embeddings
      d = model(x, adj)
      a, b = (concept.attend_concepts(e, d, 0.1) for e in (img, txt))
      logits = a @ b.T / (jnp.linalg.norm(a, axis=1)[:, None] * jnp.linalg.norm(b, axis=1))
      return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits / 0.1)))
    return nnx.value_and_grad(loss_fn, argnums=(0, 1, 2))(model, img, txt)

  loss, grads = loss_and_grads(gcn, img, txt)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 6 and np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in leaves)


def test_attend_sharded_equals_unsharded():
  rng = np.random.default_rng(3)
  emb = rng.normal(size=(16, 4)).astype(np.float32)
  desc = rng.normal(size=(3, 4)).astype(np.float32)
  rows = sharding.batch_sharding(sharding.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1}))
  sharded = attend(jax.device_put(emb, rows), desc, 0.1)
  assert len(sharded.sharding.device_set) == 8
  # The cosines are divided by the temperature 0.1 before the softmax, so a last-bit
  # difference between the per-shard and the whole-batch matmul kernels (seen: 1.2e-6
  # relative on one CPU) comes out ten times larger; a row mixed wrongly is O(1).
  np.testing.assert_allclose(sharded, attend(emb, desc, 0.1), rtol=1e-5, atol=1e-6)
