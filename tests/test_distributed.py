"""Scale-out: 2 processes x 4 CPU devices (gloo) train and checkpoint exactly like 1 x 8,
the TPU pod launcher's command sequence, and the chunked loss against the plain one."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cookie_jax import sharding, train
from cookie_jax.config import default_config
from cookie_jax.data import pipeline
from cookie_jax.losses import contrastive

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 600

# The tiny run of the multi-process test, as `key: value` so that the children's config
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


def _config(data_dir, steps):
  config = default_config('tiny')
  for key, value in {**OVERRIDES, 'data.data_dir': data_dir, 'train.steps': steps}.items():
    *path, last = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[last] = value
  return config


def _config_file(tmp_path, data_dir, steps) -> str:
  path = tmp_path / f'config_{steps}.py'
  path.write_text(
      'from cookie_jax.config import default_config\n\n\n'
      'def get_config():\n'
      "  config = default_config('tiny')\n"
      f'  for key, value in {({**OVERRIDES, "data.data_dir": data_dir, "train.steps": steps})!r}.items():\n'
      "    *path, last = key.split('.')\n"
      '    node = config\n'
      '    for part in path:\n'
      '      node = node[part]\n'
      '    node[last] = value\n'
      '  return config\n')
  return str(path)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_two_processes(config_file: str, workdir: str, log_dir: pathlib.Path) -> None:
  """launch/train.py as 2 processes x 4 CPU devices joined by gloo; kills both on failure."""
  port = _free_port()
  procs, logs = [], []
  # No shared compilation cache: with one, the process that finds its program there starts
  # its first collective minutes before the one that compiles, and gloo gives up after 30 s.
  base_env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  for i in range(2):
    env = dict(base_env, JAX_ENABLE_COMPILATION_CACHE='false',
               XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu', JAX_DEFAULT_MATMUL_PRECISION='highest',
               COOKIE_COORDINATOR=f'127.0.0.1:{port}', COOKIE_NUM_PROCESSES='2',
               COOKIE_PROCESS_ID=str(i), COOKIE_CPU_COLLECTIVES='gloo',
               PYTHONPATH=str(ROOT))
    log = open(log_dir / f'process_{i}_{port}.log', 'w+', encoding='utf-8')
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, str(ROOT / 'launch' / 'train.py'), f'--config={config_file}',
         f'--workdir={workdir}'], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
  try:
    for p in procs:
      p.wait(timeout=CHILD_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
  if failed:
    tails = []
    for i, log in enumerate(logs):
      log.seek(0)
      tails.append(f'--- process {i} ---\n' + log.read()[-3000:])
    pytest.fail(f'Processes (id, rc) {failed} failed:\n' + '\n'.join(tails))
  for log in logs:
    log.close()


_TrainIterator = pipeline.TrainIterator  # the real one, before the test replaces it


class _TwoProcessStream(_TrainIterator):
  """The global batches a 2-process run sees, built in one process: process 0's rows then
  process 1's, each from the iterator that process would build."""

  def __init__(self, *args, mesh=None, **kwargs):
    super().__init__(*args, mesh=None, process_index=0, process_count=2, **kwargs)
    self.other = _TrainIterator(*args, mesh=None, process_index=1, process_count=2,
                                        **kwargs)
    self.global_mesh = mesh

  def __next__(self):
    first, second = super().__next__(), next(self.other)
    return sharding.to_global(self.global_mesh, {
        k: np.concatenate([first[k], second[k]]) for k in first})


def _metrics(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r for r in rows if 'train/loss' in r]



@pytest.mark.slow
def test_two_processes_train_and_resume_like_one(tmp_path, monkeypatch):
  data_dir = str(tmp_path / 'tfds')
  # Reference: 1 process x 8 devices fed the batches of the 2-process layout. It also
  # builds the synthetic dataset, so the children only read it.
  reference = str(tmp_path / 'reference')
  monkeypatch.setattr(pipeline, 'TrainIterator', _TwoProcessStream)
  train.train_and_evaluate(_config(data_dir, steps=4), reference)
  monkeypatch.undo()

  # 2 processes x 4 devices: 2 steps (checkpoint), then a second launch resumes from the
  # multi-host checkpoint and trains steps 3 and 4.
  multi = str(tmp_path / 'multi')
  _run_two_processes(_config_file(tmp_path, data_dir, 2), multi, tmp_path)
  _run_two_processes(_config_file(tmp_path, data_dir, 4), multi, tmp_path)

  ref_rows, multi_rows = _metrics(reference), _metrics(multi)
  # Process 0 alone writes metrics: one row per step across both launches.
  assert [r['step'] for r in multi_rows] == [1, 2, 3, 4]
  for ref, got in zip(ref_rows, multi_rows):
    for key in ('train/loss', 'train/loss/cross_modal', 'train/loss/textual',
                'train/grad_norm', 'train/learning_rate', 'train/temperature'):
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)

  config = _config(data_dir, steps=4)
  ref_state, _ = train.restored_state(config, reference)
  multi_state, data_state = train.restored_state(config, multi)
  assert int(multi_state.step) == 4 and data_state['process_count'] == 2
  assert data_state['step'] == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               multi_state.params, ref_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               multi_state.opt_state, ref_state.opt_state)


# -- TPU pod launcher -----------------------------------------------------------------


def _tpu_pod(*args):
  out = subprocess.run([sys.executable, str(ROOT / 'launch' / 'tpu_pod.py'), *args],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
  return out


def _commands(stdout):
  return [l[2:] for l in stdout.splitlines() if l.startswith('$ ')]


COMMON = ['--name=cookie-v5p', '--zone=us-east5-a', '--project=my-proj', '--dry_run']


def test_tpu_pod_dry_run_prints_the_command_sequence():
  out = _tpu_pod('create', *COMMON, '--accelerator_type=v5p-32',
                 '--runtime_version=v2-alpha-tpuv5', '--spot')
  assert out.returncode == 0, out.stderr
  assert _commands(out.stdout) == [
      'gcloud compute tpus queued-resources create cookie-v5p --node-id=cookie-v5p '
      '--zone=us-east5-a --project=my-proj --accelerator-type=v5p-32 '
      '--runtime-version=v2-alpha-tpuv5 --spot']

  # (tests/test_preflight.py: the config is checked here first; skipped here for speed.)
  out = _tpu_pod('run', *COMMON, '--repo=https://github.com/acme/cookie_jax.git',
                 '--ref=main', '--accelerator_type=v5p-32', '--skip_preflight',
                 '--config=configs/base.py:base', '--workdir=gs://bucket/cookie/run1', '--',
                 '--config.train.steps=1000')
  assert out.returncode == 0, out.stderr
  ssh = ('gcloud compute tpus tpu-vm ssh cookie-v5p --zone=us-east5-a --project=my-proj '
         "--worker=all '--command=")
  cmds = _commands(out.stdout)
  assert len(cmds) == 3 and all(c.startswith(ssh) for c in cmds), cmds
  assert 'git clone' in cmds[0] and 'https://github.com/acme/cookie_jax.git' in cmds[0]
  assert '"jax[tpu]"' in cmds[1] and 'requirements.txt' in cmds[1]
  assert 'uv venv --clear --managed-python --python 3.11 ~/cookie_jax_venv' in cmds[1]
  assert ('nohup ~/cookie_jax_venv/bin/python launch/train.py '
          '--config=configs/base.py:base') in cmds[2]
  assert '--workdir=gs://bucket/cookie/run1 --config.train.steps=1000' in cmds[2]
  assert '> ~/cookie_jax_train.log 2>&1' in cmds[2]

  # Without --repo the working tree travels as a tarball, copied to every worker.
  out = _tpu_pod('run', *COMMON, '--accelerator_type=v5p-32', '--skip_preflight',
                 '--python=3.12', '--config=configs/base.py:base',
                 '--workdir=gs://bucket/cookie/run1')
  cmds = _commands(out.stdout)
  assert out.returncode == 0, out.stderr
  assert cmds[0].startswith('tar ') and cmds[1].startswith(
      'gcloud compute tpus tpu-vm scp ') and '--worker=all' in cmds[1]
  assert len(cmds) == 5 and 'tar xzf' in cmds[2] and '--python 3.12' in cmds[3]

  for sub, expected in (
      ('logs', "gcloud compute tpus tpu-vm ssh cookie-v5p --zone=us-east5-a "
               "--project=my-proj --worker=0 '--command=tail -n 100 ~/cookie_jax_train.log'"),
      ('stop', 'gcloud compute tpus tpu-vm ssh cookie-v5p --zone=us-east5-a '
               "--project=my-proj --worker=all '--command=test -f ~/cookie_jax_train.pid && "
               "kill -TERM $(cat ~/cookie_jax_train.pid) || true'"),
      ('delete', 'gcloud compute tpus queued-resources delete cookie-v5p --zone=us-east5-a '
                 '--project=my-proj --force --quiet')):
    out = _tpu_pod(sub, *COMMON)
    assert out.returncode == 0, out.stderr
    assert _commands(out.stdout) == [expected]


def test_tpu_pod_rejects_a_local_workdir():
  out = _tpu_pod('run', *COMMON, '--accelerator_type=v5p-32', '--config=configs/base.py:base',
                 '--workdir=/tmp/x')
  assert out.returncode != 0 and 'gs://' in out.stderr and 'Traceback' not in out.stderr


# -- chunked loss -----------------------------------------------------------------------


@pytest.mark.parametrize('chunk_size', [8, 12, 64])
def test_chunked_loss_equals_unchunked_loss_and_grads(chunk_size):
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1})
  ka, kb = jax.random.split(jax.random.key(0))
  normal = lambda k: jax.random.normal(k, (64, 16))
  unit = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
  a, b = unit(normal(ka)), unit(normal(kb))
  scale = jnp.float32(14.0)

  def sharded(fn):
    return jax.jit(jax.value_and_grad(jax.shard_map(
        lambda a, b, s: fn(a, b, s, sharding.BATCH_AXES), mesh=mesh,
        in_specs=(P(sharding.BATCH_AXES), P(sharding.BATCH_AXES), P()), out_specs=P()),
        argnums=(0, 1, 2)))

  plain, plain_grads = sharded(contrastive.info_nce)(a, b, scale)
  chunked, chunked_grads = sharded(
      lambda *x: contrastive.info_nce_chunked(*x, chunk_size=chunk_size))(a, b, scale)
  np.testing.assert_allclose(chunked, plain, atol=1e-5, rtol=1e-6)
  for got, want in zip(chunked_grads, plain_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_loss_chunk_size_config_routes_to_the_chunked_loss():
  from cookie_jax.losses import compute_losses
  a = jnp.eye(8, 4)
  pairs, scales = {'cross_modal': (a, a[::-1])}, {'cross_modal': jnp.float32(5.0)}
  plain = compute_losses(pairs, scales)['cross_modal']
  chunked = compute_losses(pairs, scales, chunk_size=3)['cross_modal']
  np.testing.assert_allclose(chunked, plain, rtol=1e-6)
