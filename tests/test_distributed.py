"""Scale-out: 2 processes x 4 CPU devices (gloo) train and checkpoint exactly like 1 x 8,
the TPU pod launcher's command sequence, and the chunked loss against the plain one."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cookie_jax import sharding, train
from cookie_jax.data import pipeline
from cookie_jax.losses import contrastive
import two_processes

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Also imported from here by test_data_distributed.py.
_config, _config_file = two_processes.config, two_processes.config_file
_free_port, _run_two_processes = two_processes.free_port, two_processes.run_two_processes


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


_metrics = two_processes.metrics



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
