"""SigLIP's sigmoid loss as a ring over devices: equal to a float64 reference, value and
gradients, on 1 and 8 devices; B_local x B_local logits in the compiled program; config."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from cookie_jax import objectives, sharding, step
from cookie_jax.config import ConfigError, default_config, validate_config
from cookie_jax.losses import compute_losses, sigmoid_loss, sigmoid_loss_all_gather

B, D = 32, 16


def _pair(seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  a = unit(rng.normal(size=(B, D)))
  b = unit(a + 0.6 * rng.normal(size=(B, D)))   # positives closer than chance
  return a, b


def _reference(a, b, t, c):
  """float64: -1/N sum_ij log sigmoid(z_ij (t a_i.b_j + c)), and its gradients."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  n = a.shape[0]
  sims = a @ b.T
  logits = t * sims + c
  z = 2.0 * np.eye(n) - 1.0
  loss = np.sum(np.logaddexp(0.0, -z * logits)) / n
  g = (1.0 / (1.0 + np.exp(-logits)) - np.eye(n)) / n    # d loss / d logits
  return loss, (t * g @ b, t * g.T @ a, np.sum(g * sims), np.sum(g))


# Moderate (t, c) exercise every gradient; SigLIP's init (10, -10) is the real start.
PARAMS = [(5.0, -2.0), (10.0, -10.0)]


def _check(got, want, what):
  (value, grads), (ref_value, ref_grads) = got, want
  assert abs(float(value) - ref_value) <= 1e-5, what
  for name, g, r in zip(('a', 'b', 't', 'c'), grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=0, atol=1e-5,
                               err_msg=f'{what}: d/d{name}')
    assert np.abs(r).max() > 1e-4, name  # a real gradient


@pytest.mark.parametrize('t,c', PARAMS)
@pytest.mark.parametrize('chunk', [0, 5])
def test_single_device_equals_float64_reference(t, c, chunk):
  a, b = _pair()
  fn = lambda a, b, t, c: sigmoid_loss(a, b, (t, c), chunk_size=chunk)
  got = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(a, b, np.float32(t), np.float32(c))
  _check(got, _reference(a, b, t, c), f'1 device, chunk {chunk}')


def _sharded(fn, mesh):
  return jax.jit(jax.value_and_grad(jax.shard_map(
      fn, mesh=mesh, in_specs=(P(sharding.BATCH_AXES), P(sharding.BATCH_AXES), P(), P()),
      out_specs=P()), argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize('layout', [(8, 1, 1), (2, 4, 1)], ids=['data8', 'data2xfsdp4'])
@pytest.mark.parametrize('chunk', [0, 3])
def test_ring_on_8_devices_equals_float64_reference(layout, chunk):
  a, b = _pair(1)
  t, c = PARAMS[0]
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, layout)))
  ring = _sharded(lambda a, b, t, c: sigmoid_loss(a, b, (t, c), sharding.BATCH_AXES,
                                                  chunk_size=chunk), mesh)
  args = jax.device_put((a, b), sharding.batch_sharding(mesh))
  want = _reference(a, b, t, c)
  _check(ring(*args, np.float32(t), np.float32(c)), want, f'ring {layout} chunk {chunk}')
  if chunk == 0:  # the all-gather peer agrees too
    gathered = _sharded(lambda a, b, t, c: sigmoid_loss_all_gather(
        a, b, (t, c), sharding.BATCH_AXES), mesh)
    _check(gathered(*args, np.float32(t), np.float32(c)), want, f'all-gather {layout}')


def _dot_shapes(fn, n, mesh):
  a = jax.device_put(jnp.zeros((n, D), jnp.float32), sharding.batch_sharding(mesh))
  hlo = _sharded(fn, mesh).lower(a, a, jnp.float32(10), jnp.float32(-10)).compile().as_text()
  dots = [line for line in hlo.splitlines() if ' dot(' in line]
  assert dots, 'no dot in the compiled program'
  return [line.split('=')[1].split('dot(')[0].strip() for line in dots], hlo


@pytest.mark.parametrize('chunk', [0, 4])
def test_per_device_logits_are_local_by_local_in_compiled_program(chunk):
  """Read the compiled HLO: the ring's dots are [B/8, B/8] (or [B/8, chunk]), never
  [B/8, B] as when gathering, nor [B, B]."""
  mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
  n, local = 64, 8
  shapes, hlo = _dot_shapes(lambda a, b, t, c: sigmoid_loss(
      a, b, (t, c), sharding.BATCH_AXES, chunk_size=chunk), n, mesh)
  block = f'f32[{local},{chunk or local}]'
  assert any(block in s for s in shapes), shapes
  assert not any(f'f32[{local},{n}]' in s or f'f32[{n},{local}]' in s for s in shapes), shapes
  assert f'f32[{n},{n}]' not in hlo and f'f32[{local},{n}]' not in hlo
  assert 'collective-permute' in hlo and 'all-gather' not in hlo
  # The peer that gathers b does build B_local x B logits.
  shapes, _ = _dot_shapes(lambda a, b, t, c: sigmoid_loss_all_gather(
      a, b, (t, c), sharding.BATCH_AXES), n, mesh)
  assert any(f'f32[{local},{n}]' in s for s in shapes), shapes


def test_compute_losses_selects_the_sigmoid_form():
  a, b = _pair(2)
  t, c = 4.0, -3.0
  pairs = {'cross_modal': (a, b), 'visual': (a, b)}
  scales = {'cross_modal': (np.float32(t), np.float32(c)), 'visual': np.float32(10.0)}
  losses = compute_losses(pairs, scales, options={'cross_modal': {'form': 'sigmoid'}})
  assert float(losses['cross_modal']) == pytest.approx(_reference(a, b, t, c)[0], abs=1e-5)
  softmax = compute_losses({'visual': (a, b)}, {'visual': np.float32(10.0)})
  assert float(losses['visual']) == float(softmax['visual'])  # the other terms unchanged


def _sigmoid_config():
  config = default_config('tiny')
  config.loss.cross_modal.form = 'sigmoid'
  config.model.logit_bias = True
  config.model.temperature_init = 0.1
  return config


def test_model_learns_siglip_scale_and_bias_from_their_init():
  config = _sigmoid_config()
  model = step.init_model(config.model, 0)
  t, c = objectives.replicated_args(model, config.loss)['cross_modal']
  assert float(t) == pytest.approx(10.0, rel=1e-6) and float(c) == -10.0
  # The default model has no bias parameter at all.
  assert step.init_model(default_config('tiny').model, 0).logit_bias is None


@pytest.mark.slow
def test_sigmoid_train_step_with_patch_dropout_on_8_devices_equals_one():
  from test_train_step import _batches, _config, _train  # pylint: disable=g-import-not-at-top
  runs = []
  for layout, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices())):
    config = _config()
    config.loss.visual.weight = config.loss.textual.weight = 0.0  # a smaller compile
    config.loss.cross_modal.form = 'sigmoid'
    config.model.logit_bias = True
    config.model.temperature_init = 0.1
    config.model.vision.patch_dropout = 0.5
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = layout
    runs.append(_train(config, devices, _batches(3)))
  (s1, h1, _), (s8, h8, _) = runs
  for name in ('loss', 'loss/cross_modal', 'grad_norm', 'temperature'):
    tol = dict(rtol=1e-5, atol=0) if name == 'grad_norm' else dict(rtol=0, atol=1e-5)
    np.testing.assert_allclose([float(h[name]) for h in h8], [float(h[name]) for h in h1],
                               err_msg=name, **tol)
  assert float(h1[0]['temperature']) == pytest.approx(0.1, rel=1e-5)
  for p, q in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(p, q, rtol=0, atol=1e-5)
  assert float(s1.params['logit_bias']) != -10.0  # the bias is learned


@pytest.mark.parametrize('change,key,fix', [
    (lambda c: setattr(c.loss.momentum, 'queue_size', 64), 'loss.momentum.queue_size',
     'queue_size=0'),
    (lambda c: setattr(c.loss.cross_modal, 'negative_weighting', 'diversity'),
     'loss.cross_modal.negative_weighting', "negative_weighting='none'"),
    (lambda c: setattr(c.loss.hard_negatives, 'captions', True),
     'loss.hard_negatives.captions', 'captions=False'),
    (lambda c: setattr(c.model, 'logit_bias', False), 'model.logit_bias',
     'set model.logit_bias=True'),
    (lambda c: setattr(c.loss.cross_modal, 'form', 'siglip'), 'loss.cross_modal.form',
     "use 'softmax'"),
])
def test_sigmoid_config_errors_name_key_value_and_fix(change, key, fix):
  config = _sigmoid_config()
  config.train.batch_size = 32
  change(config)
  with pytest.raises(ConfigError) as e:
    validate_config(config)
  message = str(e.value)
  assert message.startswith(f'config.{key}=') and fix in message, message


def test_logit_bias_without_the_sigmoid_form_is_refused():
  config = default_config('tiny')
  config.model.logit_bias = True
  with pytest.raises(ConfigError, match=r"config.model.logit_bias=True: only "
                     r"loss.cross_modal.form='sigmoid' uses"):
    validate_config(config)
  validate_config(_sigmoid_config())  # the consistent pair is fine
