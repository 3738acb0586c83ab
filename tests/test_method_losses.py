"""VLDeformer / CODER loss math: extra negatives, negative weighting, Sinkhorn clustering.

Each is checked against a float64 numpy formulation of the whole batch, and sharded over 8
devices against one device, values and gradients.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from cookie_jax import sharding
from cookie_jax.losses import (NegativeWeighting, compute_losses, info_nce, sinkhorn,
                               swapped_prediction)

B, D, E, Q, K = 32, 16, 32, 24, 8


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  a = _unit(rng, (B, D))
  b = _unit(rng, (B, D)) * 0.4 + a
  b = (b / np.linalg.norm(b, axis=-1, keepdims=True)).astype(np.float32)
  neg_b = _unit(rng, (E, D))           # composed negatives in b's space (batch-sharded)
  neg_b_valid = rng.random(E) > 0.25
  queue_a = _unit(rng, (Q, D))         # a replicated queue in a's space
  queue_valid = np.arange(Q) < 17
  return a, b, neg_b, neg_b_valid, queue_a, queue_valid


def _reference(a, b, scale, extra_b=None, extra_a=None, weighting=None):
  """float64: per row, -z_pos + log(exp(z_pos) + sum_neg w exp(z_neg))."""
  a, b = a.astype(np.float64), b.astype(np.float64)

  def direction(q, keys, extra):
    sims = q @ keys.T
    valid = np.ones(keys.shape[0], bool)
    if extra is not None:
      sims = np.concatenate([sims, q @ extra[0].astype(np.float64).T], axis=1)
      valid = np.concatenate([valid, extra[1]])
    total = 0.0
    for i in range(q.shape[0]):
      neg = valid.copy()
      neg[i] = False
      s_neg = sims[i, neg]
      if weighting is None:
        w = np.ones_like(s_neg)
      elif weighting.kind == 'diversity':
        e = np.exp(weighting.beta * s_neg)
        w = e / e.mean()
      else:
        kth = np.sort(s_neg)[::-1][min(weighting.topk, s_neg.size) - 1]
        w = (s_neg >= kth).astype(np.float64)
      z_pos = scale * sims[i, i]
      total += -z_pos + np.log(np.exp(z_pos) + np.sum(w * np.exp(scale * s_neg)))
    return total
  return (direction(a, b, extra_b) + direction(b, a, extra_a)) / (2 * a.shape[0])


def test_diversity_weighting_with_beta_zero_is_info_nce():
  a, b, *_ = _data()
  plain = info_nce(jnp.asarray(a), jnp.asarray(b), 14.0)
  zero = info_nce(jnp.asarray(a), jnp.asarray(b), 14.0,
                  weighting=NegativeWeighting('diversity', beta=0.0))
  assert abs(float(zero) - float(plain)) <= 1e-6
  sharp = info_nce(jnp.asarray(a), jnp.asarray(b), 14.0,
                   weighting=NegativeWeighting('diversity', beta=5.0))
  assert float(sharp) > float(plain) + 1e-3  # up-weighting hard negatives raises the loss


@pytest.mark.parametrize('weighting', [None, NegativeWeighting('diversity', beta=4.0),
                                       NegativeWeighting('topk', topk=5)],
                         ids=['plain', 'diversity', 'topk'])
def test_extra_negatives_and_weighting_equal_float64_reference(weighting):
  a, b, neg_b, neg_valid, queue_a, queue_valid = _data(1)
  negatives = {'b': {'batch': (neg_b, neg_valid)}, 'a': {'queue': (queue_a, queue_valid)}}
  ours = info_nce(jnp.asarray(a), jnp.asarray(b), 12.0, negatives=negatives,
                  weighting=weighting)
  ref = _reference(a, b, 12.0, extra_b=(neg_b, neg_valid), extra_a=(queue_a, queue_valid),
                   weighting=weighting)
  assert float(ours) == pytest.approx(ref, abs=2e-5)
  # Invalid extra negatives are exactly ignored.
  only_valid = info_nce(jnp.asarray(a), jnp.asarray(b), 12.0, weighting=weighting,
                        negatives={'b': {'batch': (neg_b[neg_valid], np.ones(
                            neg_valid.sum(), bool))}, 'a': {'queue': (
                                queue_a[queue_valid], np.ones(queue_valid.sum(), bool))}})
  assert abs(float(only_valid) - float(ours)) <= 1e-5


def test_topk_covering_all_negatives_is_info_nce():
  a, b, *_ = _data(2)
  plain = info_nce(jnp.asarray(a), jnp.asarray(b), 9.0)
  topk = info_nce(jnp.asarray(a), jnp.asarray(b), 9.0,
                  weighting=NegativeWeighting('topk', topk=B - 1))
  assert abs(float(topk) - float(plain)) <= 1e-6


def _numpy_sinkhorn(scores, epsilon, iterations):
  q = np.exp(scores.astype(np.float64) / epsilon).T   # [K, N]
  q /= q.sum()
  k, n = q.shape
  for _ in range(iterations):
    q /= q.sum(axis=1, keepdims=True) * k
    q /= q.sum(axis=0, keepdims=True) * n
  return (q * n).T


def test_sinkhorn_marginals_and_reference():
  rng = np.random.default_rng(3)
  scores = rng.uniform(-1, 1, size=(B, K)).astype(np.float32)
  codes = np.asarray(sinkhorn(jnp.asarray(scores), epsilon=0.3, iterations=50))
  np.testing.assert_allclose(codes.sum(axis=1), 1.0, atol=1e-5)       # a distribution per row
  np.testing.assert_allclose(codes.sum(axis=0), B / K, atol=1e-3)     # equipartition
  few = np.asarray(sinkhorn(jnp.asarray(scores), epsilon=0.05, iterations=3))
  np.testing.assert_allclose(few, _numpy_sinkhorn(scores, 0.05, 3), atol=1e-5)


def test_swapped_prediction_reference():
  rng = np.random.default_rng(4)
  a, b, protos = _unit(rng, (B, D)), _unit(rng, (B, D)), rng.normal(size=(K, D))
  ours = float(swapped_prediction(jnp.asarray(a), jnp.asarray(b), jnp.asarray(protos),
                                  temperature=0.1, epsilon=0.05, iterations=3))
  c = protos / np.linalg.norm(protos, axis=1, keepdims=True)
  p_a, p_b = a.astype(np.float64) @ c.T, b.astype(np.float64) @ c.T
  q_a, q_b = _numpy_sinkhorn(p_a, 0.05, 3), _numpy_sinkhorn(p_b, 0.05, 3)

  def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
  ref = -(np.sum(q_b * log_softmax(p_a / 0.1)) + np.sum(q_a * log_softmax(p_b / 0.1))) / (2 * B)
  assert ours == pytest.approx(ref, abs=1e-5)


def test_method_losses_sharded_equal_single_device():
  """Every new term, with extra batch negatives, a replicated queue and weighting, on 8
  devices (2 x 4 data x fsdp) equals one device, values and all gradients."""
  a, b, neg_b, neg_valid, queue_a, queue_valid = _data(5)
  rng = np.random.default_rng(6)
  protos = rng.normal(size=(K, D)).astype(np.float32)
  pairs = {'cross_modal': (a, b), 'cluster': (a * 3.0, b * 2.0),
           'concept': (b, a)}
  scales = {'cross_modal': np.float32(11.0), 'cluster': protos, 'concept': np.float32(7.0)}
  negatives = {'cross_modal': {'b': {'batch': (neg_b, neg_valid)},
                               'a': {'queue': (queue_a, queue_valid)}}}
  options = {'cross_modal': {'weighting': NegativeWeighting('diversity', beta=3.0)},
             'concept': {'weighting': NegativeWeighting('topk', topk=4)},
             'cluster': {'temperature': 0.1, 'epsilon': 0.05, 'iterations': 3}}

  def total(terms):
    return terms['cross_modal'] + 0.5 * terms['cluster'] + 0.25 * terms['concept']

  def reference(pairs, scales, negatives):
    terms = compute_losses(pairs, scales, None, negatives=negatives, options=options)
    return total(terms), terms

  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  spec = P(sharding.BATCH_AXES)
  neg_specs = {'cross_modal': {'b': {'batch': (spec, spec)}, 'a': {'queue': (P(), P())}}}
  sharded_fn = jax.shard_map(
      lambda p, s, n: compute_losses(p, s, sharding.BATCH_AXES, negatives=n,
                                     options=options),
      mesh=mesh, in_specs=(spec, P(), neg_specs), out_specs=P())

  def sharded(pairs, scales, negatives):
    terms = sharded_fn(pairs, scales, negatives)
    return total(terms), terms

  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True, allow_int=True)
  (ref_total, ref_terms), ref_grads = grad(reference)(pairs, scales, negatives)
  placed = jax.device_put(pairs, sharding.batch_sharding(mesh))
  placed_neg = jax.tree_util.tree_map_with_path(
      lambda path, x: jax.device_put(x, jax.sharding.NamedSharding(
          mesh, P() if 'queue' in jax.tree_util.keystr(path) else spec)), negatives)
  (tot, terms), grads = jax.jit(grad(sharded))(placed, scales, placed_neg)
  for name in ref_terms:
    assert abs(float(terms[name]) - float(ref_terms[name])) <= 1e-5, name
  assert abs(float(tot) - float(ref_total)) <= 1e-5
  checked = 0
  for (path, g_ref), g in zip(jax.tree_util.tree_leaves_with_path(ref_grads),
                              jax.tree.leaves(grads)):
    if g_ref.dtype == jax.dtypes.float0:
      continue  # the boolean masks
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=0, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
    checked += 1
  assert checked == 11  # 6 pair embeddings, 2 scales, prototypes, 2 extra-negative sets
