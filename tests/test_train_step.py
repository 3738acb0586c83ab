"""The jitted train step: sharded over 8 devices it trains exactly like on one device."""

import jax
import numpy as np
import pytest

from cookie_jax import models, optim, sharding, step
from cookie_jax.config import default_config, validate_config


def _config():
  config = default_config('tiny')
  config.model.vision.image_size = 16
  # Every COOKIE term on, with dropout, so the test covers rng handling under sharding.
  config.loss.visual.weight = 0.5
  config.loss.textual.weight = 0.3
  config.train.batch_size = 16
  config.train.steps = 10
  config.optim.warmup_steps = 2
  return config


def _batches(n, b=16, t=8, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    lengths = rng.integers(2, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    out.append(dict(
        image=rng.normal(size=(b, 16, 16, 3)).astype(np.float32),
        image_view2=rng.normal(size=(b, 16, 16, 3)).astype(np.float32),
        input_ids=(rng.integers(5, 1024, size=(b, t)) * mask).astype(np.int32),
        attention_mask=mask))
  return out


def _train(config, devices, batches):
  mesh = sharding.make_mesh(config.mesh, devices)
  validate_config(config, num_devices=len(devices))
  state, setup = step.create_train_state(config, mesh)
  train_step = step.make_train_step(config, setup)
  history = []
  for batch in batches:
    state, metrics = train_step(state, sharding.to_global(mesh, batch))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history, setup


@pytest.fixture(scope='module')
def single_device_run():
  config = _config()
  config.mesh.data = 1
  return _train(config, jax.devices()[:1], _batches(3))


def test_three_steps_on_8_devices_equal_one_device(single_device_run):
  ref_state, ref_hist, _ = single_device_run
  config = _config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  state, hist, setup = _train(config, jax.devices(), _batches(3))

  assert int(state.step) == 3
  for name in ('loss', 'loss/cross_modal', 'loss/visual', 'loss/textual', 'grad_norm',
               'temperature', 'learning_rate'):
    got = [float(h[name]) for h in hist]
    want = [float(h[name]) for h in ref_hist]
    # The gradient norm is O(50): compare it relatively, at fp32 resolution.
    tol = dict(rtol=1e-6, atol=0) if name == 'grad_norm' else dict(rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, want, err_msg=name, **tol)
  # The parameters moved, and identically.
  init_state, _ = step.create_train_state(_config(), sharding.make_mesh(
      dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
  moved = 0
  for (path, p), q, p0 in zip(jax.tree_util.tree_leaves_with_path(state.params),
                              jax.tree.leaves(ref_state.params),
                              jax.tree.leaves(jax.device_get(init_state.params))):
    np.testing.assert_allclose(p, q, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    moved += np.abs(p - p0).max() > 1e-4
  assert moved > 0.9 * len(jax.tree.leaves(state.params))
  # The loss goes down on repeated data? Not asserted: 3 steps of random data. The
  # learning rate follows the warmup: 0, lr/2, lr.
  np.testing.assert_allclose([h['learning_rate'] for h in hist], [0.0, 5e-4, 1e-3], atol=1e-9)


def test_parameters_and_optimizer_state_are_sharded_by_logical_axes():
  config = _config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
  mesh = sharding.make_mesh(config.mesh)
  state, setup = step.create_train_state(config, mesh)
  described = sharding.describe(setup.state_shardings.params)
  key = 'text/layer/0/intermediate/kernel'        # ('embed', 'mlp')
  assert described[key] == "P('fsdp', 'tensor')"
  kernel = state.params['text']['layer'][0]['intermediate']['kernel']
  assert kernel.shape == (32, 64)
  assert {s.data.shape for s in kernel.addressable_shards} == {(8, 32)}
  assert described['log_logit_scale'] == 'P()'
  # Adam's moments are laid out like their parameters.
  mu = state.opt_state[1][0].mu['text']['layer'][0]['intermediate']['kernel']
  assert mu.sharding.spec == kernel.sharding.spec
  # The per-device bytes of the parameters are about 1/8 of the total.
  total = sum(x.nbytes for x in jax.tree.leaves(state.params))
  device0 = sum(s.data.nbytes for x in jax.tree.leaves(state.params)
                for s in x.addressable_shards if s.device == jax.devices()[0])
  assert device0 < 0.25 * total


def test_weight_decay_mask():
  config = _config()
  abstract = jax.eval_shape(lambda: step.nnx.to_pure_dict(step.nnx.state(
      models.init_model(config.model, 0))))
  flat = jax.tree_util.tree_flatten_with_path(optim.decay_mask(abstract))[0]
  decayed = {'/'.join(str(getattr(k, 'key', k)) for k in path) for path, m in flat if m}
  assert 'text/layer/0/intermediate/kernel' in decayed
  assert 'vision/patch_embeddings/kernel' in decayed
  assert 'text/word_embeddings/embedding' in decayed
  for name in ('vision/position_embeddings', 'vision/cls_token', 'log_logit_scale',
               'text/layer/0/intermediate/bias', 'text/layer/0/attention_norm/scale',
               'shared/modality_embedding'):
    assert name not in decayed, name
  assert len(decayed) > 20


def test_schedules():
  config = _config().optim
  config.warmup_steps = 10
  config.end_lr_factor = 0.1
  cos = optim.learning_rate_schedule(config, 110)
  assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(5e-4)
  assert float(cos(10)) == pytest.approx(1e-3)
  assert float(cos(60)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-5)
  assert float(cos(110)) == pytest.approx(1e-4, rel=1e-5)
  config.schedule = 'linear'
  lin = optim.learning_rate_schedule(config, 110)
  assert float(lin(60)) == pytest.approx(1e-3 * 0.55, rel=1e-5)
  config.schedule = 'constant'
  assert float(optim.learning_rate_schedule(config, 110)(100)) == pytest.approx(1e-3)


def test_missing_second_view_is_a_clear_error():
  config = _config()
  config.mesh.data = 1
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, setup = step.create_train_state(config, mesh)
  batch = _batches(1)[0]
  del batch['image_view2']
  with pytest.raises(ValueError, match=r"partner='augmented' needs batch\['image_view2'\]"):
    step.make_train_step(config, setup)(state, sharding.to_global(mesh, batch))


def test_gradcache_accumulation_equals_one_large_batch_step():
  """4 micro-batches keep the whole batch's negatives: same loss, grads and update."""
  def run(accum):
    config = _config()
    config.model.text.dropout = config.model.text.attention_dropout = 0.0
    config.loss.textual.weight = 0.0  # dropout views differ by construction
    config.train.batch_size = 32
    config.train.accum_steps = accum
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 4, 1
    return _train(config, jax.devices(), _batches(2, b=32, seed=3))

  ref_state, ref_hist, _ = run(1)
  state, hist, _ = run(4)
  for name in ('loss', 'loss/cross_modal', 'loss/visual'):
    np.testing.assert_allclose([float(h[name]) for h in hist],
                               [float(h[name]) for h in ref_hist], rtol=0, atol=1e-5,
                               err_msg=name)
  np.testing.assert_allclose([h['grad_norm'] for h in hist],
                             [h['grad_norm'] for h in ref_hist], rtol=1e-5)
  for (path, p), q in zip(jax.tree_util.tree_leaves_with_path(state.params),
                          jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(p, q, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_nonfinite_step_freezes_the_state():
  config = _config()
  config.mesh.data = 1
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, setup = step.create_train_state(config, mesh)
  train_step = step.make_train_step(config, setup)
  good, bad = _batches(2)
  bad['image'][3, 2, 2, 1] = np.nan
  state, _ = train_step(state, sharding.to_global(mesh, good))
  snapshot = jax.device_get(state)
  state, metrics = train_step(state, sharding.to_global(mesh, bad))
  assert not np.isfinite(float(metrics['loss']))
  assert int(state.nonfinite_step) == 2
  state, _ = train_step(state, sharding.to_global(mesh, good))   # stays frozen
  assert int(state.nonfinite_step) == 2
  for p, q in zip(jax.tree.leaves(jax.device_get(state.params)),
                  jax.tree.leaves(snapshot.params)):
    np.testing.assert_array_equal(p, q)


def test_logit_scale_pushed_past_the_clamp_returns_and_moves_again():
  """A log scale above log(max_logit_scale) (say, carried there by Adam's momentum) is
  clipped back after the update, and from there the gradient moves it: at scale 100 the
  loss of unrelated images and captions asks for a lower one. (The program of
  `single_device_run`: one compile for both.)"""
  config = _config()
  config.mesh.data = 1
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, setup = step.create_train_state(config, mesh)
  bound = np.float32(np.log(config.model.max_logit_scale))
  params = dict(state.params, log_logit_scale=jax.numpy.asarray(bound + 0.5))
  state = state.replace(params=jax.device_put(params, setup.state_shardings.params))
  train_step = step.make_train_step(config, setup)
  seen = []
  for batch in _batches(4, seed=5):
    state, metrics = train_step(state, sharding.to_global(mesh, batch))
    seen.append(float(state.params['log_logit_scale']))
  # Step 1 (learning rate 0 in the warmup) returns it to the clamp; then it moves down.
  assert seen[0] == bound, seen
  assert seen[3] < seen[2] < seen[1] < bound, seen
  assert float(metrics['temperature']) > 1 / config.model.max_logit_scale


def test_no_step_key_is_an_initialisation_key():
  """Dropout draws from a stream of its own: none of the keys of steps 0..9,999 is a key
  that initialisation drew (nnx.Rngs' n-th draw is fold_in(key(seed), n))."""
  config = _config()
  config.model.num_prototypes, config.model.concept_gcn_depth = 8, 1  # more draws
  for seed in (0, 3):
    rngs = step.nnx.Rngs(params=jax.random.key(seed))
    models.CookieModel(config.model, rngs=rngs)
    count = int(rngs.params.count[...])
    assert count > 50
    replay = step.nnx.Rngs(params=jax.random.key(seed))
    init_keys = {tuple(np.asarray(jax.random.key_data(replay.params())))
                 for _ in range(count)}
    assert len(init_keys) == count
    step_keys = np.asarray(jax.random.key_data(jax.vmap(
        lambda s, seed=seed: step.step_rng(seed, s))(np.arange(10_000))))
    assert len({tuple(k) for k in step_keys}) == 10_000
    assert not init_keys & {tuple(k) for k in step_keys}
    # The same seed and step give the same key (what an exact resume needs).
    np.testing.assert_array_equal(jax.random.key_data(step.step_rng(seed, 1_234)),
                                  step_keys[1_234])
