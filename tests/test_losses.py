"""Contrastive losses: global negatives over a sharded batch equal the full-batch loss."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from cookie_jax import sharding
from cookie_jax.losses import compute_losses, info_nce

B, D = 32, 16


def _unit(rng, shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _full_matrix_loss(a, b, scale):
  """The textbook form: a B x B logit matrix, cross-entropy over rows and over columns."""
  logits = scale * (a.astype(np.float64) @ b.astype(np.float64).T)
  def ce(l):
    l = l - l.max(axis=1, keepdims=True)
    logp = l - np.log(np.exp(l).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(logp))
  return 0.5 * (ce(logits) + ce(logits.T))


def _pairs(seed=0):
  rng = np.random.default_rng(seed)
  pairs = {name: (_unit(rng, (B, D)), _unit(rng, (B, D)))
           for name in ('cross_modal', 'visual', 'textual')}
  # Make positives more similar than chance, so the loss is not near log(B) everywhere.
  pairs['cross_modal'] = (pairs['cross_modal'][0],
                          _unit(rng, (B, D)) * 0.3 + pairs['cross_modal'][0])
  scales = {'cross_modal': np.float32(14.3), 'visual': np.float32(10.0),
            'textual': np.float32(20.0)}
  return pairs, scales


def test_cross_modal_equals_full_matrix_formulation():
  pairs, scales = _pairs()
  for name in pairs:
    a, b = pairs[name]
    ours = float(info_nce(jnp.asarray(a), jnp.asarray(b), scales[name]))
    assert ours == pytest.approx(_full_matrix_loss(a, b, scales[name]), abs=1e-5)


def test_loss_known_value_for_perfect_alignment():
  # a == b, orthonormal rows: each row's logits are [s, 0, ..., 0] up to permutation.
  a = np.eye(8, dtype=np.float32)
  s = 5.0
  expected = -np.log(np.exp(s) / (np.exp(s) + 7.0))
  assert float(info_nce(jnp.asarray(a), jnp.asarray(a), s)) == pytest.approx(expected, abs=1e-6)


def _total(losses):
  # Distinct weights so that every term's gradient is checked, not just their sum.
  return losses['cross_modal'] + 0.5 * losses['visual'] + 0.25 * losses['textual']


@pytest.mark.parametrize('layout', [(8, 1, 1), (1, 8, 1), (2, 4, 1)],
                         ids=['data8', 'fsdp8', 'data2xfsdp4'])
def test_sharded_losses_and_grads_equal_single_device(layout):
  pairs, scales = _pairs(1)
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, layout)))

  def reference(pairs, scales):
    losses = compute_losses(pairs, scales, axis_name=None)
    return _total(losses), losses

  sharded_fn = jax.shard_map(
      lambda p, s: compute_losses(p, s, axis_name=sharding.BATCH_AXES), mesh=mesh,
      in_specs=(P(sharding.BATCH_AXES), P()), out_specs=P())

  def sharded(pairs, scales):
    losses = sharded_fn(pairs, scales)
    return _total(losses), losses

  pairs_global = jax.device_put(pairs, sharding.batch_sharding(mesh))
  (ref_total, ref_terms), ref_grads = jax.value_and_grad(reference, argnums=(0, 1),
                                                         has_aux=True)(pairs, scales)
  (tot, terms), grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True))(
      pairs_global, scales)
  assert abs(float(tot) - float(ref_total)) <= 1e-5
  for name in ref_terms:
    assert abs(float(terms[name]) - float(ref_terms[name])) <= 1e-5, name
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  flat = jax.tree.leaves(grads)
  assert len(flat) == len(flat_ref) == 9
  for (path, g_ref), g in zip(flat_ref, flat):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=0, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
    assert np.abs(np.asarray(g_ref)).max() > 1e-4  # a real gradient, not all zeros


def test_per_device_logits_are_local_by_global_in_compiled_program():
  """Read the compiled HLO: each device's dots are [B/8, B], never [B, B]."""
  mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
  n = 64
  a = jnp.zeros((n, D), jnp.float32)
  fn = jax.shard_map(lambda x, y: info_nce(x, y, 10.0, sharding.BATCH_AXES), mesh=mesh,
                     in_specs=(P(sharding.BATCH_AXES), P(sharding.BATCH_AXES)),
                     out_specs=P())
  args = jax.device_put((a, a), sharding.batch_sharding(mesh))
  hlo = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile().as_text()
  local = n // 8
  dots = [line for line in hlo.splitlines() if ' dot(' in line]
  assert dots, 'no dot in the compiled program'
  shapes = [line.split('=')[1].split('dot(')[0].strip() for line in dots]
  assert any(f'f32[{local},{n}]' in s for s in shapes), shapes
  assert not any(f'f32[{n},{n}]' in s for s in shapes), shapes
  assert f'f32[{n},{n}]' not in hlo
