"""launch/train.py as 2 processes x 4 CPU devices joined by gloo, for the tests of
multi-process training (test_distributed.py, test_data_distributed.py, test_stop.py,
test_slurm.py), and the uninterrupted run a stopped and resumed one must equal."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest

from cookie_jax import train
from cookie_jax.config import default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 600

# The tiny run of the multi-process tests, as `key: value` so that the children's config
# file and the in-process reference apply exactly the same settings.
OVERRIDES = {
    'model.vision.image_size': 16,
    'data.max_len': 12,
    'data.synthetic.train_images': 64,
    'data.synthetic.eval_images': 16,
    'data.synthetic.image_size': 16,
    'train.batch_size': 16,
    'train.log_every': 1,
    'train.progress_bar': False,
    # Constant after warmup, so a 2-step run is a prefix of the 4-step run.
    'optim.schedule': 'constant',
    'optim.warmup_steps': 1,
    'loss.textual.weight': 0.5,
    'eval.batch_size': 16,
    'eval.test_at_end': False,
    'checkpoint.every': 2,
    'checkpoint.keep_best': False,
}


def _settings(data_dir, steps, extra) -> dict:
  return {**OVERRIDES, 'data.data_dir': data_dir, 'train.steps': steps, **(extra or {})}


def config(data_dir, steps, extra=None):
  """The tiny run's config; `extra` overrides more keys (`{'checkpoint.every': 0}`)."""
  cfg = default_config('tiny')
  for key, value in _settings(data_dir, steps, extra).items():
    *path, last = key.split('.')
    node = cfg
    for part in path:
      node = node[part]
    node[last] = value
  return cfg


def config_file(tmp_path, data_dir, steps, extra=None) -> str:
  """The same config as a file for launch/train.py's --config."""
  settings = _settings(data_dir, steps, extra)
  digest = zlib.crc32(repr(sorted(settings.items())).encode())
  path = tmp_path / f'config_{steps}_{digest:08x}.py'
  path.write_text(
      'from cookie_jax.config import default_config\n\n\n'
      'def get_config():\n'
      "  config = default_config('tiny')\n"
      f'  for key, value in {settings!r}.items():\n'
      "    *path, last = key.split('.')\n"
      '    node = config\n'
      '    for part in path:\n'
      '      node = node[part]\n'
      '    node[last] = value\n'
      '  return config\n')
  return str(path)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(cache_dir: str | None = None) -> dict[str, str]:
  """The environment of a process of a multi-process test run: 4 CPU devices, gloo.

  Not the session's compilation cache: with it, the process that finds its program there
  starts its first collective minutes before the one that compiles, and gloo gives up
  after 30 s. `cache_dir`, a cache of these children alone, is safe: process 0 writes
  a program once compiled, so a process finds it only when process 0 is past that
  compile (in the first job), or both find it (in later jobs).
  """
  env = {k: v for k, v in os.environ.items()
         if k != 'JAX_COMPILATION_CACHE_DIR' and not k.startswith('SLURM_')}
  cache = (dict(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5') if cache_dir else
           dict(JAX_ENABLE_COMPILATION_CACHE='false'))
  return dict(env, **cache, XLA_FLAGS='--xla_force_host_platform_device_count=4',
              JAX_PLATFORMS='cpu', JAX_DEFAULT_MATMUL_PRECISION='highest',
              COOKIE_CPU_COLLECTIVES='gloo', PYTHONPATH=str(ROOT))


class TwoProcesses:
  """launch/train.py started as processes 0 and 1 of one job; each logs to its own file."""

  def __init__(self, config_path: str, workdir: str, log_dir: pathlib.Path,
               cache_dir: str | None = None):
    port = free_port()
    self.procs, self.log_paths = [], []
    for i in range(2):
      env = dict(child_env(cache_dir), COOKIE_COORDINATOR=f'127.0.0.1:{port}',
                 COOKIE_NUM_PROCESSES='2', COOKIE_PROCESS_ID=str(i))
      path = log_dir / f'process_{i}_{port}.log'
      self.log_paths.append(path)
      with open(path, 'w', encoding='utf-8') as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / 'launch' / 'train.py'), f'--config={config_path}',
             f'--workdir={workdir}'], env=env, stdout=log, stderr=subprocess.STDOUT,
            cwd=ROOT))

  def logs(self) -> list[str]:
    return [p.read_text(encoding='utf-8') for p in self.log_paths]

  def tails(self) -> str:
    return '\n'.join(f'--- process {i} ---\n{log[-3000:]}'
                     for i, log in enumerate(self.logs()))

  def wait(self, timeout: float = CHILD_TIMEOUT_S) -> tuple[list[int | None], float]:
    """(exit codes, seconds waited); both are killed if still running after `timeout`
    (their code is then None)."""
    start, deadline = time.monotonic(), time.monotonic() + timeout
    codes = []
    for p in self.procs:
      try:
        p.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
    waited = time.monotonic() - start
    for p in self.procs:
      codes.append(p.poll())
      if p.poll() is None:
        p.kill()
        p.wait()
    return codes, waited


def run_two_processes(config_path: str, workdir: str, log_dir: pathlib.Path) -> None:
  """launch/train.py as 2 processes x 4 CPU devices joined by gloo; kills both on failure."""
  job = TwoProcesses(config_path, workdir, log_dir)
  codes, _ = job.wait()
  failed = [(i, code) for i, code in enumerate(codes) if code != 0]
  if failed:
    pytest.fail(f'Processes (id, rc) {failed} failed:\n' + job.tails())


def metrics(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r for r in rows if 'train/loss' in r]


def last_step(workdir) -> int:
  """The last training step process 0 logged (with train.log_every=1), 0 for none; read
  while the run writes."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(l) for l in f if l.strip().endswith('}')]
  return max([r['step'] for r in rows if 'train/loss' in r], default=0)


def build_data(data_dir: str) -> str:
  """The tiny run's dataset, built here once, before processes that read it start."""
  from cookie_jax.data import sources  # pylint: disable=g-import-not-at-top
  sources.build(config(data_dir, 1).data)
  return data_dir


_UNINTERRUPTED = {}


def assert_same_as_uninterrupted(tmp_path_factory, data_dir, workdir, steps, extra=None):
  """The run in `workdir`, stopped and resumed, with its latest checkpoint at `steps`,
  against an uninterrupted run of 1 process x 8 devices (the batch of a step is the same
  on any number of processes): every step's metrics and the parameters at `steps`."""
  key = (steps, repr(sorted((extra or {}).items())))
  cfg = config(data_dir, steps, extra)
  if key not in _UNINTERRUPTED:
    reference = str(tmp_path_factory.mktemp('uninterrupted'))
    train.train_and_evaluate(cfg, reference)
    _UNINTERRUPTED[key] = (metrics(reference), train.restored_state(cfg, reference)[0])
  rows, state = _UNINTERRUPTED[key]
  got = metrics(workdir)
  assert [r['step'] for r in got] == [r['step'] for r in rows] == list(range(1, steps + 1))
  for want, have in zip(rows, got):
    for name in ('train/loss', 'train/loss/cross_modal', 'train/loss/textual',
                 'train/grad_norm'):
      np.testing.assert_allclose(have[name], want[name], rtol=1e-6, atol=1e-6,
                                 err_msg=f'{name} at step {want["step"]}')
  resumed, data_state = train.restored_state(cfg, workdir)
  assert int(resumed.step) == data_state['step'] == steps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               resumed.params, state.params)
