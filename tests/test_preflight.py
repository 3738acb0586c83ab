"""The pre-flight check: the config against the slice, here, before anything is launched
(cookie_jax/preflight.py, launch/preflight.py, and `launch/tpu_pod.py run`)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from cookie_jax import preflight
from cookie_jax.config import ConfigError, default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')
POD = ['--name=cookie-v5p', '--zone=us-east5-a', '--project=my-proj',
       '--repo=https://github.com/acme/cookie_jax.git', '--accelerator_type=v5p-32',
       '--config=configs/base.py:base', '--workdir=gs://bucket/cookie/run1']
TOKENIZER = '--config.data.tokenizer=gs://bucket/bert-base-uncased'


def _base():
  spec = importlib.util.spec_from_file_location('base', ROOT / 'configs' / 'base.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('base')
  config.data.tokenizer = 'gs://bucket/bert-base-uncased'
  return config


@needs_libtpu
def test_check_lays_the_mesh_on_the_slice_and_lists_the_worker_paths():
  lines = preflight.check(_base(), 'v5p-32')
  assert lines[0] == ("v5p-32: 16 TPU v5 devices on 4 hosts (torus 2x2x4); mesh {'data': 2, "
                      "'fsdp': 8, 'tensor': 1}; train.batch_size 4096 = 256 rows per device, "
                      '1024 per host.')
  assert "data.tokenizer='gs://bucket/bert-base-uncased'" in lines[-1]
  config = _base()
  config.mesh.dcn_data = 2  # two slices' worth of mesh on one slice: only the topology knows
  with pytest.raises(ConfigError, match=r'^config\.mesh\.dcn_data=2: 16 TPU v5 devices on 4 '
                     r'hosts \(torus 2x2x4\) form one slice; set mesh\.dcn_data=1\.$'):
    preflight.check(config, 'v5p-32')


def test_without_libtpu_the_chip_count_is_checked_and_the_note_says_so(monkeypatch):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  def no_libtpu(**unused_kwargs):
    raise RuntimeError('Unable to initialize backend tpu: no libtpu')
  monkeypatch.setattr(topologies, 'get_topology_desc', no_libtpu)
  lines = preflight.check(_base(), 'v5p-32')
  assert lines[0].startswith("v5p-32: 16 devices; mesh {'data': 2, 'fsdp': 8, 'tensor': 1}")
  assert 'pip install -e ".[tpu]"' in lines[1] and 'its 16 chips only, not the torus' in lines[1]
  config = _base()
  config.mesh.fsdp = 3
  with pytest.raises(ConfigError, match=r'does not divide the 16 devices'):
    preflight.check(config, 'v5p-32')
  with pytest.raises(ConfigError, match=r"Unknown TPU slice 'v5p-31'"):
    preflight.check(config, 'v5p-31')


def test_a_device_count_checks_any_cluster_and_nothing_names_none():
  config = default_config('tiny')
  assert preflight.check(config, num_devices=8)[0].startswith('8 devices: 8 devices; mesh')
  config.train.batch_size = 20
  with pytest.raises(ConfigError, match=r'config\.train\.batch_size=20: .*multiple of 8'):
    preflight.check(config, num_devices=8)
  with pytest.raises(ConfigError, match=r'--accelerator_type=SLICE .* or --num_devices=N'):
    preflight.check(config)


# -- launch/tpu_pod.py run: checked here first, with --dry_run and without ---------------


def _fake_gcloud(tmp_path):
  """A `gcloud` on PATH that only writes down how it was called."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "gcloud_calls"}\n')
  gcloud.chmod(0o755)
  return dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')


def _run_pod(tmp_path, *args):
  return subprocess.run([sys.executable, str(ROOT / 'launch' / 'tpu_pod.py'), 'run', *POD,
                         *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                        env=_fake_gcloud(tmp_path), check=False)


@pytest.mark.parametrize('dry_run', [True, False], ids=['dry_run', 'run'])
@pytest.mark.parametrize('overrides, line', [
    (['--config.train.stesp=5', TOKENIZER], "error: Unknown config key 'train.stesp' "
     "(--config.train.stesp=5). Did you mean 'train.steps'?"),
    ([], "error: config.data.tokenizer='': only the synthetic datasets ship a vocabulary"),
    ([TOKENIZER, '--config.mesh.fsdp=3'], "error: config.mesh={'data': -1, 'fsdp': 3, "
     "'tensor': 1}: the fixed axes use 3 devices, which does not divide the 16 devices "
     'available; change the fixed sizes.'),
], ids=['misspelt_key', 'no_tokenizer', 'mesh'])
def test_run_refuses_a_bad_config_here_in_one_line_before_any_gcloud(tmp_path, dry_run,
                                                                      overrides, line):
  out = _run_pod(tmp_path, *(['--dry_run'] if dry_run else []), '--', *overrides)
  assert out.returncode in (1, 2)
  assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
  assert out.stderr.startswith(line), out.stderr
  assert '$ ' not in out.stdout  # nothing printed to launch ...
  assert not (tmp_path / 'gcloud_calls').exists()  # ... and nothing run


def test_run_checks_then_installs_a_uv_python_venv_and_starts_training(tmp_path):
  out = _run_pod(tmp_path, '--', TOKENIZER, '--config.data.data_dir=gs://bucket/tfds')
  assert out.returncode == 0, out.stderr
  assert 'pre-flight: the config is valid for this slice.' in out.stdout
  calls = (tmp_path / 'gcloud_calls').read_text().splitlines()
  assert len(calls) == 3 and all(c.startswith('compute tpus tpu-vm ssh cookie-v5p') for c in calls)
  assert ('uv 0.13.8 -> CPython 3.11 (uv-managed) -> venv ~/cookie_jax_venv' in calls[1] and
          'uv venv --clear --managed-python --python 3.11 ~/cookie_jax_venv' in calls[1])
  assert ('~/.local/bin/uv pip install --python ~/cookie_jax_venv/bin/python -r '
          'requirements.txt "jax[tpu]" -e .') in calls[1]
  assert '~/cookie_jax_venv/bin/python launch/train.py --config=configs/base.py:base' in calls[2]


def test_the_slurm_recipe_command_checks_a_device_count():
  out = subprocess.run([sys.executable, str(ROOT / 'launch' / 'preflight.py'),
                        '--config=configs/base.py:base', '--num_devices=32', TOKENIZER,
                        '--config.train.batch_size=4100'],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
  assert out.returncode == 1
  assert out.stderr.startswith('error: config.train.batch_size=4100: the batch is split over '
                               'data*fsdp = 32 devices; use a multiple of 32'), out.stderr
