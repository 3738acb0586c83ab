"""The checkpoint room: saving, the run's checkpoint directory, steps, the saved config,
parameters alone, and the errors that name what is missing."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax.config import default_config


def _state(value):
  return {'params': {'w': jnp.full((4, 2), value, jnp.float32), 'b': jnp.zeros(2)},
          'opt': {'mu': jnp.ones((4, 2))}}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ckpt') / 'run')
  config = default_config()
  config.checkpoint.keep_best = False
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), config.checkpoint)
  for step in (2, 4):
    ckpt.save(step, _state(float(step)), {'step': step}, config, force=True)
  ckpt.close()
  return workdir, config


def test_steps_and_the_saved_config(run):
  workdir, config = run
  directory = ckpt_lib.find_checkpoints(workdir)
  assert directory == os.path.join(workdir, 'checkpoints')
  assert ckpt_lib.resolve_step(directory) == 4
  assert ckpt_lib.resolve_step(directory, 2) == 2
  assert ckpt_lib.saved_config(directory, 2)['train']['batch_size'] == \
      config.train.batch_size
  with pytest.raises(FileNotFoundError, match=r'--step=3: .* steps \[2, 4\] only'):
    ckpt_lib.resolve_step(directory, 3)


def test_restore_latest_and_parameters_alone(run):
  workdir, config = run
  abstract = jax.eval_shape(lambda: _state(0.0))
  state, data, saved = ckpt_lib.restore_latest(workdir, abstract, config.checkpoint)
  np.testing.assert_array_equal(np.asarray(state['params']['w']), 4.0)
  assert data == {'step': 4} and saved['seed'] == config.seed
  params, step = ckpt_lib.load_params(workdir, abstract['params'], 2)
  assert step == 2 and set(params) == {'w', 'b'}
  np.testing.assert_array_equal(np.asarray(params['w']), 2.0)
  # A workdir, its checkpoints/ folder and one step's folder name the same checkpoint.
  for path in (ckpt_lib.checkpoint_dir(workdir), os.path.join(workdir, 'checkpoints', '2')):
    again, _ = ckpt_lib.load_params(path, abstract['params'], None if path[-1] == '2' else 2)
    np.testing.assert_array_equal(np.asarray(again['w']), 2.0)


def test_a_mismatch_names_the_parameter(run):
  workdir, _ = run
  wrong = {'w': jax.ShapeDtypeStruct((4, 3), jnp.float32),
           'b': jax.ShapeDtypeStruct((2,), jnp.float32)}
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"parameter 'w' has shape \(4, 2\) in the checkpoint but \(4, 3\)"):
    ckpt_lib.load_params(workdir, wrong)


def test_missing_runs_and_folders_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"--workdir='.*nowhere' does not exist"):
    ckpt_lib.find_checkpoints(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match=r'holds no checkpoints/ folder, so no '
                                              r'checkpoint to evaluate'):
    ckpt_lib.find_checkpoints(str(tmp_path / 'empty'))
  # Export also takes a checkpoint directory itself.
  assert ckpt_lib.find_checkpoints(str(tmp_path / 'empty'), accept_checkpoint_dir=True) == \
      str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match=r'holds no finished checkpoint'):
    ckpt_lib.resolve_step(str(tmp_path / 'empty'))
