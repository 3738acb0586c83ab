"""Locked parameters (train.freeze): bit-identical after training, no optimiser moments,
no backward pass through a locked tower, checkpoints across meshes, init_from."""

import math
import os

from flax import nnx
import jax
import numpy as np
import optax
import pytest

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import freeze, sharding, step
from cookie_jax.config import ConfigError, default_config, validate_config

from test_train_step import _batches, _config  # pylint: disable=g-bad-import-order


def _frozen_config(patterns=('vision',)):
  config = _config()
  config.loss.visual.weight = 0.0  # the image view only adds compile time here
  config.train.freeze = patterns
  return config


def _run(config, mesh_layout=(1, 1, 1), steps=3):
  """(initial state on the host, state after `steps` steps, setup)."""
  devices = jax.devices()[:math.prod(mesh_layout)]
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_layout
  mesh = sharding.make_mesh(config.mesh, devices)
  validate_config(config, num_devices=len(devices))
  state, setup = step.create_train_state(config, mesh)
  init = jax.device_get(state)  # the step donates the state
  train_step = step.make_train_step(config, setup)
  for batch in _batches(steps):
    state, _ = train_step(state, sharding.to_global(mesh, batch))
  return init, state, setup


def _names(tree):
  return {freeze.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope='module')
def frozen_run():
  config = _frozen_config()
  init, state, setup = _run(config)
  return config, jax.device_get(init), jax.device_get(state), setup


def test_frozen_parameters_are_bit_identical_after_3_steps_others_change(frozen_run):
  _, init, state, _ = frozen_run
  before, after = _names(init.params), _names(state.params)
  frozen = [n for n in before if n.startswith('vision/')]
  assert len(frozen) > 10
  for name in frozen:  # with weight decay 0.05 and lr > 0: no update, no decay
    assert np.array_equal(before[name], after[name]), name
  moved = [n for n in before if n not in frozen and np.abs(after[n] - before[n]).max() > 0]
  trained = [n for n in before if n not in frozen]
  assert len(moved) >= 0.9 * len(trained), sorted(set(trained) - set(moved))


def test_optimiser_state_holds_no_moments_for_frozen_leaves(frozen_run):
  config, init, state, _ = frozen_run
  leaves = _names(state.opt_state)
  assert not [n for n in leaves if '/vision/' in f'/{n}'], 'moments of a frozen leaf'
  # AdamW's mu and nu exist for every trained leaf: twice the trained parameters' bytes.
  params = _names(init.params)
  trained = sum(x.nbytes for n, x in params.items() if not n.startswith('vision/'))
  moments = sum(x.nbytes for x in leaves.values() if x.dtype == np.float32)  # not counts
  assert moments == 2 * trained
  full = _names(jax.eval_shape(optax.adamw(1e-3).init, init.params))
  assert sum(math.prod(x.shape) * 4 for x in full.values()) > moments  # less memory


@pytest.mark.slow  # CI time: three compiles; test_flops.py's locked-tower count against
# XLA's FLOPs stays
def test_no_gradient_is_computed_through_a_locked_tower():
  """The compiled step of a locked image tower does fewer FLOPs: no backward pass of the
  tower (with stop_gradient before the loss there is nothing below it to train)."""
  def cost(compiled):
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])

  def step_flops(patterns):
    config = _frozen_config(patterns)
    config.mesh.data = 1
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, setup = step.create_train_state(config, mesh)
    batch = sharding.to_global(mesh, _batches(1)[0])
    return cost(step.make_train_step(config, setup).lower(state, batch).compile())
  trained, frozen = step_flops(()), step_flops(('vision',))
  # The tower's forward pass alone, compiled the same way; its backward is about twice it.
  vision = step.init_model(_frozen_config().model, 0).vision
  graphdef, params = nnx.split(vision)
  images = _batches(1)[0]['image']
  tower = cost(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)).lower(params, images).compile())
  assert trained - frozen >= 1.5 * tower, (trained, frozen, tower)


def test_patterns_match_whole_leading_components():
  params = jax.device_get(step.create_train_state(
      default_config('tiny'), sharding.make_mesh(dict(data=1, fsdp=1, tensor=1),
                                                 jax.devices()[:1]))[0].params)
  mask = _names(freeze.frozen_mask(params, ('text/layer/1',)))
  locked = sorted({n.split('/')[2] for n, f in mask.items() if f})
  assert locked == ['1'] and sum(mask.values()) == len(
      [n for n in mask if n.startswith('text/layer/1/')])
  mask = _names(freeze.frozen_mask(params, ('text/layer/[0-1]', 'log_logit_scale')))
  assert mask['log_logit_scale'] and not mask['vision/cls_token']
  assert sum(mask.values()) == 1 + len([n for n in mask if n.startswith('text/layer/')])


@pytest.mark.parametrize('patterns,match', [
    (('image_tower',), r"config.train.freeze: pattern 'image_tower' matches no parameter.*"
                       r"top-level names: \[.*'vision'.*Fix the pattern"),
    (('text/layer/[0-',), r"config.train.freeze: pattern 'text/layer/\[0-' is not a regular "
                          r"expression"),
    (('.*',), r"config.train.freeze=\('.\*',\) freezes every parameter"),
])
def test_freeze_errors_name_key_value_and_fix(patterns, match):
  config = _frozen_config(patterns)
  config.mesh.data = 1
  with pytest.raises(ConfigError, match=match):
    validate_config(config)
    step.create_train_state(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))


def test_freeze_must_be_a_tuple_of_patterns():
  config = _frozen_config(('vision', ''))
  with pytest.raises(ConfigError, match=r"config.train.freeze=\('vision', ''\): must be a "
                     r"tuple of parameter-path patterns, e.g."):
    validate_config(config)


@pytest.mark.slow
def test_frozen_checkpoint_restores_onto_another_mesh_resumes_inits_and_exports(tmp_path):
  config = _frozen_config()
  _, state8, _ = _run(config, (8, 1, 1), steps=2)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), config.checkpoint)
  ckpt.save(2, state8, {'step': 2}, config, force=True)
  ckpt.close()

  # Restored onto 2x4, then resumed for one more step: equal to 8x1 running on.
  config24 = _frozen_config()
  config24.mesh.data, config24.mesh.fsdp = 2, 4
  target, setup24 = step.create_train_state(config24, sharding.make_mesh(config24.mesh))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), config24.checkpoint)
  restored, _, _ = ckpt.restore(2, ckpt_lib.abstract_with_shardings(
      target, setup24.state_shardings))
  ckpt.close()
  for p, q in zip(jax.tree.leaves(jax.device_get(restored)),
                  jax.tree.leaves(jax.device_get(state8))):
    np.testing.assert_array_equal(p, q)
  batch = _batches(3)[2]
  mesh24 = setup24.mesh
  resumed, _ = step.make_train_step(config24, setup24)(restored,
                                                       sharding.to_global(mesh24, batch))
  _, straight, _ = _run(_frozen_config(), (8, 1, 1), steps=3)
  for (path, p), q in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(resumed.params)),
                          jax.tree.leaves(jax.device_get(straight.params))):
    np.testing.assert_allclose(p, q, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))

  # init_from: the parameters of the locked run initialise a run that trains everything.
  params, loaded = ckpt_lib.load_params(str(tmp_path / 'ckpt'), target.params)
  assert loaded == 2
  for p, q in zip(jax.tree.leaves(jax.device_get(params)),
                  jax.tree.leaves(jax.device_get(state8.params))):
    np.testing.assert_array_equal(p, q)

  # Export: the locked run leaves as a transformers folder like any other, whole and exact.
  from cookie_jax.interop import hf_export  # pylint: disable=g-import-not-at-top
  hf_export.export_params(jax.device_get(state8.params), config.model, str(tmp_path / 'out'))
  back = hf_export.read_export(str(tmp_path / 'out'))
  want = jax.device_get(state8.params)
  assert jax.tree.structure(back) == jax.tree.structure(want)
  for p, q in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(q))


def _recipe(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'base_recipes', os.path.join(os.path.dirname(__file__), '..', 'configs', 'base.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(name)


@pytest.mark.slow  # CI time: a train run; the locked-tower tests stay
def test_lit_recipe_imports_minilm_locks_it_and_trains_the_image_tower():
  """configs/base.py:lit as train.py sets it up (sizes from the checkpoint, validation,
  the state, the MiniLM weights), then 2 real train steps on 8 devices: every text-tower
  leaf is bit-identical to MiniLM's, the image tower moves."""
  from cookie_jax.interop import hf_import  # pylint: disable=g-import-not-at-top
  config = _recipe('lit')
  assert config.train.freeze == ('text',) and config.model.image_init == ''
  hf_import.configure_pretrained_towers(config)
  assert (config.model.text.width, config.model.text.depth) == (384, 6)  # MiniLM's
  config.train.batch_size = 8  # the recipe's 64 pairs, cut for the test
  validate_config(config, num_devices=8)
  mesh = sharding.make_mesh(config.mesh)
  state, setup = step.create_train_state(config, mesh)
  state = step.with_params(state, hf_import.apply_pretrained_towers(config, state.params))
  before = _names(jax.device_get(state.params))
  _, minilm = hf_import.tower_weights(config.model.text_init, 'text')
  minilm = {'text/' + '/'.join(map(str, p)): v for p, v in minilm.items()}
  assert len(minilm) > 90
  for name, value in minilm.items():
    np.testing.assert_array_equal(before[name], value, err_msg=name)

  rng = np.random.default_rng(0)
  size, length = config.model.vision.image_size, config.data.max_len
  train_step = step.make_train_step(config, setup)
  for _ in range(2):
    mask = (np.arange(length)[None] < rng.integers(3, length, size=(8, 1))).astype(np.int32)
    batch = dict(image=rng.normal(size=(8, size, size, 3)).astype(np.float32),
                 image_view2=rng.normal(size=(8, size, size, 3)).astype(np.float32),
                 input_ids=(rng.integers(1000, 30522, size=(8, length)) * mask
                            ).astype(np.int32), attention_mask=mask)
    state, metrics = train_step(state, sharding.to_global(mesh, batch))
    assert np.isfinite(float(metrics['loss']))
  after = _names(jax.device_get(state.params))
  text = [n for n in before if n.startswith('text/')]
  assert sorted(text) == sorted(minilm)  # the locked set is exactly the MiniLM tower
  for name in text:
    assert np.array_equal(after[name], before[name]), name
  vision = [n for n in before if n.startswith('vision/')]
  moved = [n for n in vision if np.abs(after[n] - before[n]).max() > 0]
  assert len(moved) >= 0.9 * len(vision), sorted(set(vision) - set(moved))
  assert np.abs(after['text_head/kernel'] - before['text_head/kernel']).max() > 0
