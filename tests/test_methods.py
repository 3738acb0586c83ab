"""VLDeformer / CODER options in the train step: queues, EMA, sharding, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import models, objectives, sharding, step
from cookie_jax.config import ConfigError, default_config, validate_config
from cookie_jax.models import l2_normalize
from cookie_jax.models.presets import fully_shared
from flax import nnx

B, T, IMG = 16, 8, 16


def _config(**options):
  config = default_config('tiny')
  config.model.vision.image_size = IMG
  config.train.batch_size = B
  config.train.steps = 10
  config.optim.warmup_steps = 2
  for key, value in options.items():
    section, *rest = key.split('.')
    node = config[section]
    for part in rest[:-1]:
      node = node[part]
    node[rest[-1]] = value
  return config


def _all_options():
  """Every VLDeformer and CODER switch at once, with dropout. (COOKIE's visual and
  textual terms are left to test_train_step, to keep this program small to compile.)"""
  return _config(**{
      'loss.hard_negatives.captions': True, 'loss.hard_negatives.images': True,
      'loss.momentum.queue_size': 2 * B, 'loss.momentum.momentum': 0.9,
      'loss.cross_modal.negative_weighting': 'diversity',
      'loss.cross_modal.diversity_beta': 3.0,
      'model.num_prototypes': 8, 'loss.cluster.weight': 0.2,
      'model.concept_gcn_depth': 2, 'loss.concept.weight': 0.3})


def _constants():
  """Hand-made tables in place of the mined ones: two swap groups, a 6-concept graph."""
  token_group = np.full(1024, -1, np.int32)
  members = np.array([[5, 6, 7, 8], [9, 10, -1, -1]], np.int32)
  for g, row in enumerate(members):
    token_group[row[row >= 0]] = g
  adjacency = np.eye(6, dtype=np.float32) * 0.5 + 0.5 / 6
  return {'token_group': token_group, 'group_members': members,
          'concept_ids': np.arange(11, 17, dtype=np.int32), 'concept_adjacency': adjacency}


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    lengths = rng.integers(3, T + 1, size=B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, 40, size=(B, T))  # plenty of swappable tokens 5..10
    out.append(dict(image=rng.normal(size=(B, IMG, IMG, 3)).astype(np.float32),
                    image_view2=rng.normal(size=(B, IMG, IMG, 3)).astype(np.float32),
                    input_ids=(ids * mask).astype(np.int32), attention_mask=mask))
  return out


def _run(config, devices, batches, state=None, keep_history=False):
  mesh = sharding.make_mesh(config.mesh, devices)
  validate_config(config, num_devices=len(devices))
  fresh, setup = step.create_train_state(config, mesh)
  state = fresh if state is None else jax.device_put(state, setup.state_shardings)
  train_step = step.make_train_step(config, setup, _constants())
  history, states = [], []
  for batch in batches:
    if keep_history:
      states.append(jax.device_get(state))
    state, metrics = train_step(state, sharding.to_global(mesh, batch))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history, states, setup


def _assert_trees_close(got, want, atol):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def all_options_one_device():
  config = _all_options()
  config.mesh.data = 1
  return _run(config, jax.devices()[:1], _batches(3), keep_history=True)


def test_queue_holds_the_last_gathered_keys_and_ema_follows_params(all_options_one_device):
  final, _, before, setup = all_options_one_device
  batches = _batches(3)

  def keys(ema_params, batch):
    model = nnx.merge(setup.graphdef, ema_params)
    return (np.asarray(model.encode_image(jnp.asarray(batch['image']))),
            np.asarray(model.encode_text(jnp.asarray(batch['input_ids']),
                                         jnp.asarray(batch['attention_mask']))))
  k = [keys(s.extras['ema_params'], b) for s, b in zip(before, batches)]
  # 3 batches of 16 through a 32-slot FIFO: slots 0-15 hold step 3's keys, 16-31 step 2's.
  extras = final.extras
  np.testing.assert_allclose(extras['image_queue'], np.concatenate([k[2][0], k[1][0]]),
                             atol=1e-5)
  np.testing.assert_allclose(extras['text_queue'], np.concatenate([k[2][1], k[1][1]]),
                             atol=1e-5)
  assert int(extras['queue_count']) == 2 * B and int(extras['queue_ptr']) == B
  # Before any step the queue is empty, after one step half full.
  assert int(before[0].extras['queue_count']) == 0
  assert int(before[1].extras['queue_count']) == B
  # EMA: ema_{t+1} = m ema_t + (1 - m) params_{t+1}.
  expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, before[2].extras['ema_params'],
                          final.params)
  _assert_trees_close(final.extras['ema_params'], expected, atol=1e-6)
  # ... and it lags the parameters.
  drift = [np.abs(e - p).max() for e, p in zip(jax.tree.leaves(final.extras['ema_params']),
                                               jax.tree.leaves(final.params))]
  assert max(drift) > 1e-4


@pytest.mark.slow  # a second compile of the whole program, on 8 devices: ~1 min idle
def test_all_options_on_8_devices_equal_one_device(all_options_one_device):
  ref, ref_hist, _, _ = all_options_one_device
  config = _all_options()
  # Batch over 8 devices, parameters and EMA parameters sharded over fsdp=2. (Tensor
  # parallelism of the same layers is covered by test_train_step.)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 2, 1
  got, hist, _, _ = _run(config, jax.devices(), _batches(3))
  for name in ('loss', 'loss/cross_modal', 'loss/cluster', 'loss/concept'):
    np.testing.assert_allclose([float(h[name]) for h in hist],
                               [float(h[name]) for h in ref_hist], rtol=0, atol=1e-5,
                               err_msg=name)
  np.testing.assert_allclose([float(h['grad_norm']) for h in hist],
                             [float(h['grad_norm']) for h in ref_hist], rtol=1e-5)
  _assert_trees_close(got.params, ref.params, atol=1e-5)
  _assert_trees_close(got.extras, ref.extras, atol=1e-5)
  # Every option contributed: the terms are finite and the model's new parts trained.
  assert all(np.isfinite(float(hist[-1][f'loss/{n}'])) for n in ('cluster', 'concept'))
  assert int(got.extras['queue_count']) == 2 * B


def test_all_options_resume_exactly_from_a_checkpoint(all_options_one_device, tmp_path):
  """Save the state after step 2 (queues and EMA included), restore it into a fresh
  state and take step 3: the same as the uninterrupted run."""
  ref, ref_hist, before, setup = all_options_one_device
  config = _all_options()
  config.mesh.data = 1
  config.checkpoint.async_save = False
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), config.checkpoint)
  ckpt.save(2, before[2], {'step': 2}, config, force=True)
  ckpt.wait()
  fresh, _ = step.create_train_state(config, setup.mesh)
  abstract = ckpt_lib.abstract_with_shardings(fresh, setup.state_shardings)
  restored, _, _ = ckpt.restore(2, abstract)
  ckpt.close()
  _assert_trees_close(restored.extras, before[2].extras, atol=0)
  assert int(restored.extras['queue_count']) == 2 * B  # not a fresh, empty queue
  resumed, hist, _, _ = _run(config, jax.devices()[:1], _batches(3)[2:], state=restored)
  assert float(hist[0]['loss']) == pytest.approx(float(ref_hist[2]['loss']), abs=1e-6)
  _assert_trees_close(resumed.params, ref.params, atol=1e-6)
  _assert_trees_close(resumed.extras, ref.extras, atol=1e-6)


def test_fully_shared_model_shares_every_layer():
  config = _config()
  fully_shared(config.model)
  assert (config.model.vision.depth, config.model.text.depth, config.model.shared.depth) == (
      0, 0, 3)
  validate_config(config)
  model = models.init_model(config.model, 0)
  assert len(model.vision.layer) == 0 and len(model.text.layer) == 0
  batch = _batches(1)[0]
  img = model.encode_image(jnp.asarray(batch['image']))
  txt = model.encode_text(jnp.asarray(batch['input_ids']),
                          jnp.asarray(batch['attention_mask']))
  assert img.shape == txt.shape == (B, config.model.embed_dim)
  # The shared blocks are the only transformer layers, so zeroing their MLP output changes
  # both modalities.
  graphdef, params = nnx.split(model)
  zero = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if 'shared' in jax.tree_util.keystr(p)
      and 'output' in jax.tree_util.keystr(p) else x, params)
  other = nnx.merge(graphdef, zero)
  assert np.abs(np.asarray(other.encode_image(jnp.asarray(batch['image'])) - img)).max() > 1e-3
  assert np.abs(np.asarray(other.encode_text(jnp.asarray(batch['input_ids']),
                                             jnp.asarray(batch['attention_mask'])) - txt)
                ).max() > 1e-3


@pytest.mark.parametrize('key,value,needle', [
    ('loss.cluster.weight', 0.1, 'model.num_prototypes'),
    ('loss.concept.weight', 0.1, 'model.concept_gcn_depth'),
    ('loss.momentum.queue_size', 20, 'multiple of train.batch_size'),
    ('loss.cross_modal.negative_weighting', 'hardest', "'diversity' or 'topk'"),
    ('loss.hard_negatives.image_mix', 'cutout', "'region' or 'patch'"),
])
def test_bad_method_options_name_the_key(key, value, needle):
  config = _config(**{key: value})
  with pytest.raises(ConfigError, match=needle):
    validate_config(config)


def test_chunked_loss_with_extra_negatives_is_refused():
  config = _config(**{'loss.chunk_size': 8, 'loss.hard_negatives.images': True})
  with pytest.raises(ConfigError, match='chunked loss supports plain InfoNCE only'):
    validate_config(config)


def test_temperature_fixed_or_learned():
  model = models.init_model(_config().model, 0)
  learned = objectives.cross_modal_scale(model, _config().loss)
  assert float(learned) == pytest.approx(1 / 0.07, rel=1e-5)
  fixed = objectives.cross_modal_scale(model, _config(**{
      'loss.cross_modal.temperature': 0.02}).loss)
  assert float(fixed) == pytest.approx(50.0)
  # l2_normalize is what the queue keys use: unit rows.
  x = l2_normalize(jnp.ones((2, 4)))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(x), axis=1), 1.0, atol=1e-6)
