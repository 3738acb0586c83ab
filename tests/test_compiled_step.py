"""A train step compiled ahead of time, saved, and loaded back (`train.compiled`): the
loaded executable gives the jitted step's parameters bit for bit, and an executable of
another jax, machine, mesh or program is refused in one line naming what differs."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cookie_jax import compiled_step, sharding, step as step_lib, train
from cookie_jax.config import ConfigError, default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(data_dir: str = ''):
  config = default_config('tiny')
  config.model.vision.image_size = 16
  config.data.max_len = 12
  config.data.data_dir = data_dir
  config.data.synthetic.train_images = 32
  config.data.synthetic.eval_images = 16
  config.data.synthetic.image_size = 16
  config.train.batch_size = 16
  config.train.steps = 2
  config.train.log_every = 1
  config.train.progress_bar = False
  config.eval.batch_size = 16
  config.eval.test_at_end = False
  return config


@pytest.fixture(scope='module')
def saved(tmp_path_factory) -> str:
  """The tiny step compiled for this host's 8 CPU devices (data=8), saved."""
  config = _config()
  mesh = sharding.make_mesh(config.mesh)
  lowered = compiled_step.lower_train_step(config, mesh)
  path = str(tmp_path_factory.mktemp('compiled') / 'step.bin')
  size = compiled_step.save_compiled(lowered.compile(), path,
                                     compiled_step.metadata(lowered, mesh, config))
  assert size == os.path.getsize(path) > 2**20
  return path


def _batch(config, mesh, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  b, s, t = config.train.batch_size, config.model.vision.image_size, config.data.max_len
  lengths = rng.integers(3, t + 1, size=(b, 1))
  return sharding.to_global(mesh, {
      'image': rng.standard_normal((b, s, s, 3), np.float32),
      'input_ids': rng.integers(5, 100, size=(b, t), dtype=np.int32),
      'attention_mask': (np.arange(t) < lengths).astype(np.int32)})


def test_the_record_says_what_the_executable_was_compiled_for(saved):
  meta = json.loads(pathlib.Path(compiled_step.meta_path(saved)).read_text())
  assert (meta['platform'], meta['device_kind'], meta['devices'], meta['processes']) == (
      'cpu', 'cpu', 8, 1)
  assert meta['mesh'] == {'axes': ['data', 'fsdp', 'tensor'], 'shape': [8, 1, 1],
                          'device_ids': list(range(8))}
  assert (meta['jax'], meta['jaxlib']) == (jax.__version__, jax.__version__)
  assert meta['batch_size'] == 16 and len(meta['program']) == 64
  assert meta['config']['train']['steps'] == 2 and 'compiled' not in meta['config']['train']


def test_a_loaded_step_gives_the_jitted_steps_parameters_bit_for_bit(saved):
  config = _config()
  mesh = sharding.make_mesh(config.mesh)
  loaded = compiled_step.load_train_step(saved, config, mesh)
  batches = [_batch(config, mesh, seed) for seed in (1, 2)]

  def two_steps(step_fn):
    state, _ = step_lib.create_train_state(config, mesh)
    for batch in batches:
      state, metrics = step_fn(state, batch)
    return jax.device_get(state), jax.device_get(metrics)

  _, setup = step_lib.train_state_setup(config, mesh)[1:]
  (got, got_metrics), (want, want_metrics) = (
      two_steps(loaded), two_steps(step_lib.make_train_step(config, setup)))
  assert int(got.step) == 2 and np.isfinite(got_metrics['loss'])
  assert got_metrics['loss'] == want_metrics['loss']
  leaves = zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params))
  assert all(np.array_equal(a, b) for a, b in leaves)
  initial = jax.device_get(step_lib.create_train_state(config, mesh)[0].params)
  assert not np.array_equal(got.params['log_logit_scale'], initial['log_logit_scale'])


def _tampered(saved: str, tmp_path, **changes) -> str:
  """A copy of the saved executable whose record has `changes`."""
  path = str(tmp_path / 'step.bin')
  shutil.copy(saved, path)
  meta = json.loads(pathlib.Path(compiled_step.meta_path(saved)).read_text())
  meta.update(changes)
  pathlib.Path(compiled_step.meta_path(path)).write_text(json.dumps(meta))
  return path


def _refusal(path, config) -> str:
  with pytest.raises(ConfigError) as e:
    compiled_step.load_train_step(path, config, sharding.make_mesh(config.mesh))
  line = str(e.value)
  assert '\n' not in line and line.startswith(f'config.train.compiled={path!r} ')
  assert line.endswith("(python launch/compile.py ... --save=PATH), or set "
                       "train.compiled=''.")
  return line


def test_another_mesh_is_refused_in_one_line(saved):
  config = _config()
  config.mesh.fsdp = 2
  assert ('was compiled for mesh data=8, fsdp=1, tensor=1; this run has mesh data=4, '
          'fsdp=2, tensor=1;') in _refusal(saved, config)


def test_another_program_is_refused_naming_the_config_keys_that_differ(saved):
  config = _config()
  config.train.batch_size = 32
  line = _refusal(saved, config)
  assert 'is another program (StableHLO sha256 ' in line
  assert 'config keys that differ: train.batch_size 16 -> 32;' in line


def test_a_change_of_code_with_the_same_config_is_refused(saved, tmp_path):
  line = _refusal(_tampered(saved, tmp_path, program='0' * 64), _config())
  assert ("is another program (StableHLO sha256 000000000000, this run's " in line and
          'with the same config, so the code or a jax setting changed since' in line)


def test_another_jax_version_is_refused_before_anything_is_lowered(saved, tmp_path,
                                                                  monkeypatch):
  path = _tampered(saved, tmp_path, jax='0.4.35')
  monkeypatch.setattr(compiled_step, 'lower_train_step', None)  # never reached
  assert (f'was compiled for jax 0.4.35 / jaxlib {jax.__version__}; this run has jax '
          f'{jax.__version__} / jaxlib {jax.__version__};') in _refusal(path, _config())


def test_a_record_of_another_executable_is_refused(saved, tmp_path):
  # As after a save that wrote its record but not its executable (or the reverse).
  line = _refusal(_tampered(saved, tmp_path, executable_sha256='0' * 64), _config())
  assert 'is not the executable its record' in line


def test_a_broken_record_and_a_video_recipe_are_one_line(saved, tmp_path):
  path = _tampered(saved, tmp_path)
  pathlib.Path(compiled_step.meta_path(path)).write_text('{"format": 1,')
  assert 'that is not JSON' in _refusal(path, _config())
  config = _config()
  config.data.builder = 'synthetic_video'
  assert 'video recipes are not compiled ahead of time' in _refusal(saved, config)


def test_a_missing_file_is_one_line(tmp_path):
  path = str(tmp_path / 'nothing.bin')
  with pytest.raises(ConfigError, match=r'nothing.bin does not exist; write it with '
                     r'python launch/compile.py \.\.\. --save=PATH\.$'):
    compiled_step.load_train_step(path, _config(), sharding.make_mesh(_config().mesh))


def test_the_launcher_refuses_another_machines_step_in_one_line(saved, tmp_path):
  """launch/train.py on this host's one CPU device, given the 8-device step: one line,
  exit 1, before any data is read."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  out = subprocess.run(
      [sys.executable, str(ROOT / 'launch' / 'train.py'), '--config=configs/base.py:tiny',
       f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={tmp_path / "tfds"}',
       f'--config.train.compiled={saved}'],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False)
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert (f'error: config.train.compiled={saved!r} was compiled for 8 x cpu; this run '
          'has 1 x cpu;') in out.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'tfds').exists()  # refused before the data were built


@pytest.mark.slow
def test_two_train_steps_with_train_compiled_equal_a_jitted_run_bit_for_bit(saved,
                                                                            tmp_path, caplog):
  caplog.set_level(logging.INFO)
  data_dir = str(tmp_path / 'tfds')
  loaded = _config(data_dir)
  loaded.train.compiled = saved
  train.train_and_evaluate(loaded, str(tmp_path / 'loaded'))
  assert f'loaded the compiled train step from {saved}' in caplog.text
  assert 'compiling the train step' not in caplog.text
  train.train_and_evaluate(_config(data_dir), str(tmp_path / 'jitted'))
  got, want = (train.restored_state(_config(data_dir), str(tmp_path / run))[0]
               for run in ('loaded', 'jitted'))
  assert int(got.step) == int(want.step) == 2
  leaves = zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params))
  assert all(np.array_equal(a, b) for a, b in leaves)
