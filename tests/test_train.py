"""The training loop: exact resume after SIGTERM, checkpoints across meshes, crash safety,
the non-finite guard, fine-tuning init, and the launcher's error lines."""

import gc
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import flops
from cookie_jax import sharding, step as step_lib, stop as stop_lib, train
from cookie_jax.config import default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _config(data_dir, steps=6):
  config = default_config('tiny')
  config.model.vision.image_size = 16
  config.data.data_dir = data_dir
  config.data.max_len = 12
  config.data.synthetic.train_images = 96
  config.data.synthetic.eval_images = 24
  config.data.synthetic.image_size = 16
  config.train.batch_size = 16
  config.train.steps = steps
  config.train.log_every = 1
  config.train.progress_bar = False
  config.optim.warmup_steps = 2
  config.loss.textual.weight = 0.5   # dropout randomness must resume exactly too
  config.eval.batch_size = 16
  config.eval.test_at_end = False
  config.checkpoint.every = 2
  config.train.peak_flops = 1e12   # for train/mfu, which CPUs do not get by default
  return config


def _metrics(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r for r in rows if 'train/loss' in r}


@pytest.mark.slow  # CI time: three train runs; test_stop.py's SIGTERM on 2 processes (equal
# to an uninterrupted run) and test_methods.py's exact resume stay
def test_sigterm_then_resume_is_identical_to_an_uninterrupted_run(tmp_path, data_dir,
                                                                   monkeypatch):
  config = _config(data_dir)
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight)

  # Preempt the second run with a real SIGTERM right after its third step.
  interrupted = str(tmp_path / 'interrupted')
  real_make = step_lib.make_train_step

  def make_with_sigterm(cfg, setup, *args):
    fn, calls = real_make(cfg, setup, *args), [0]
    def step_fn(state, batch):
      out = fn(state, batch)
      calls[0] += 1
      if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    return step_fn
  monkeypatch.setattr(step_lib, 'make_train_step', make_with_sigterm)
  handlers_before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
  with pytest.raises(train.PreemptedError, match='Preempted at step 3') as stopped:
    train.train_and_evaluate(config, interrupted)
  assert stopped.value.exit_code == 0  # a scheduler's request, done
  monkeypatch.setattr(step_lib, 'make_train_step', real_make)
  assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers_before
  assert signal.set_wakeup_fd(-1) == -1  # and no wakeup fd left behind
  assert sorted(os.listdir(os.path.join(interrupted, 'checkpoints'))) == ['2', '3']
  result = train.train_and_evaluate(config, interrupted)   # resumes at 3
  assert result['step'] == 6

  a, b = _metrics(straight), _metrics(interrupted)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for row in a.values():  # model FLOPs utilisation, from cookie_jax/flops.py
    assert row['train/tflops_per_device'] > 0 and 'train/nonfinite_step' not in row
    assert row['train/mfu'] == pytest.approx(row['train/tflops_per_device'] * 1e12 / 1e12)
    # Per device: the step's FLOPs are spread over the mesh's 8 devices.
    assert row['train/tflops_per_device'] == pytest.approx(
        row['train/pairs_per_sec'] / 16 * flops.train_step_flops(config)['total'] / 1e12
        / jax.device_count())
  for s in (4, 5, 6):  # the steps after the resume: same data, dropout and updates
    for key in ('train/loss', 'train/loss/cross_modal', 'train/loss/textual',
                'train/grad_norm', 'train/learning_rate'):
      assert abs(a[s][key] - b[s][key]) <= 1e-6 * max(1.0, abs(a[s][key])), (s, key)
  state_a, data_a = train.restored_state(config, straight)
  state_b, data_b = train.restored_state(config, interrupted)
  assert data_a == data_b and int(state_a.step) == int(state_b.step) == 6
  for p, q in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(p, q, rtol=0, atol=1e-6)
  # Both runs kept the tokenizer they trained with, the same one (checked on resume).
  assert (pathlib.Path(straight, 'tokenizer.json').read_bytes()
          == pathlib.Path(interrupted, 'tokenizer.json').read_bytes())
  tb = os.listdir(os.path.join(straight, 'tensorboard'))
  assert any(f.startswith('events.out.tfevents') for f in tb)


class _Crash(Exception):
  pass


@pytest.mark.slow  # about 75 s on 2 cores; the resume tests beside it check what it restores
def test_a_resume_peaks_no_higher_than_a_start(tmp_path, data_dir, monkeypatch):
  """A resume restores straight into the abstract state: no initial state is alive beside
  the restored one. CPU devices have no memory_stats(), so the peak is read from the bytes
  of all live jax arrays where the state is restored and before each of a run's first two
  steps, up to its first save (orbax's copies in an async save, the same in both runs,
  come later); device prefetch is off, so the same batches are on the devices then.
  (On the code before this test, a resume peaked at 2,173,496 bytes, twice the state's
  1,086,748, against a start's 1,137,508.)"""
  config = _config(data_dir)  # the program of the SIGTERM test: compiled once for both
  config.data.device_prefetch = 0
  samples, calls = [], []

  def sample():
    gc.collect()
    samples.append(sum(a.nbytes for a in jax.live_arrays()))

  real_restore = ckpt_lib.Checkpointer.restore

  def restore(self, *args):
    out = real_restore(self, *args)
    sample()  # while restore_or_initialise and its caller still run
    return out
  real_make = step_lib.make_train_step

  def make(cfg, setup, *args):
    fn = real_make(cfg, setup, *args)
    calls.clear()  # once per run

    def step_fn(state, batch):
      calls.append(int(state.step))
      if calls == [0, 1, 2]:
        raise _Crash  # the start stops after its save of step 2
      if len(calls) <= 2:  # before the run's first save (checkpoint.every = 2)
        sample()
      return fn(state, batch)
    return step_fn
  monkeypatch.setattr(ckpt_lib.Checkpointer, 'restore', restore)
  monkeypatch.setattr(step_lib, 'make_train_step', make)
  workdir = str(tmp_path / 'run')
  with pytest.raises(_Crash):
    train.train_and_evaluate(config, workdir)
  start = max(samples)
  abstract = step_lib.train_state_setup(config, sharding.make_mesh(config.mesh))[1]
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  samples.clear()
  assert train.train_and_evaluate(config, workdir)['step'] == 6
  assert len(samples) == 3 and start > state_bytes  # the restore and steps 3-4
  # No higher, give or take a few scalars (1 KiB); the old code held 2 states here.
  assert max(samples) <= start + 1024, (samples, start, state_bytes)


def test_validation_reads_and_tokenises_its_split_once_per_run(tmp_path, data_dir,
                                                               monkeypatch):
  """Validating at steps 2 and 4 builds the val split's EvalData (captions read and
  tokenised) once; the second validation re-encodes the same rows. (The code before this
  test built it at every validation: ['val', 'val'].)"""
  from cookie_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _config(data_dir, steps=4)
  config.eval.every = 2
  config.checkpoint.every = 0
  built = []
  real_init = pipeline.EvalData.__init__

  def init(self, data_cfg, split, **kwargs):
    built.append(split)
    real_init(self, data_cfg, split, **kwargs)
  monkeypatch.setattr(pipeline.EvalData, '__init__', init)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'val/rsum' in r] == [2, 4]
  assert built == ['val'], built


def test_checkpoint_from_8x1_restores_onto_2x4(tmp_path):
  config = default_config('tiny')
  config.model.vision.image_size = 16
  config.mesh.data, config.mesh.fsdp = 8, 1
  state, setup = step_lib.create_train_state(config, sharding.make_mesh(config.mesh))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), config.checkpoint)
  ckpt.save(1, state, {'step': 1}, config, force=True)
  ckpt.close()

  config.mesh.data, config.mesh.fsdp = 2, 4
  target, target_setup = step_lib.create_train_state(config, sharding.make_mesh(config.mesh))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), config.checkpoint)
  restored, data_state, saved_config = ckpt.restore(1, ckpt_lib.abstract_with_shardings(
      target, target_setup.state_shardings))
  ckpt.close()
  assert data_state == {'step': 1} and saved_config['mesh']['data'] == 8
  kernel = restored.params['text']['layer'][0]['intermediate']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
  assert {s.data.shape for s in kernel.addressable_shards} == {(8, 64)}
  for p, q in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(
      jax.device_get(state))):
    np.testing.assert_array_equal(p, q)


def test_kill_9_during_a_save_leaves_the_latest_checkpoint_restorable(tmp_path):
  """A child saves large checkpoints back to back; we SIGKILL it mid-write."""
  directory = str(tmp_path / 'ckpt')
  child = textwrap.dedent(f"""
      import sys, time
      import numpy as np, jax.numpy as jnp
      sys.path.insert(0, {str(ROOT)!r})
      from cookie_jax.checkpoint import Checkpointer
      from cookie_jax.config import default_config
      cfg = default_config().checkpoint
      cfg.keep = 100
      ckpt = Checkpointer({directory!r}, cfg)
      for step in range(1, 1000):
        # Random bits do not compress, so each save takes a while to write.
        w = np.random.default_rng(step).random((32, 1024, 1024), dtype=np.float32)
        w[0, 0, 0] = w[-1, -1, -1] = step
        state = {{'w': jnp.asarray(w)}}
        ckpt.save(step, state, {{'step': step}}, default_config(), force=True)
        if step == 1:
          ckpt.wait()
          print('first', flush=True)
      """)
  proc = subprocess.Popen([sys.executable, '-c', child], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'first'
  # Let it get well into the next writes, then kill without warning.
  import time  # pylint: disable=g-import-not-at-top
  time.sleep(2.0)
  proc.kill()
  proc.wait()
  entries = os.listdir(directory)
  print('after kill -9:', sorted(entries))
  ckpt = ckpt_lib.Checkpointer(directory, default_config().checkpoint)
  latest = ckpt.latest_step()
  assert latest is not None and latest >= 1, entries
  # When the kill caught a save in flight, its step is not offered for restore.
  in_flight = [int(e.split('.')[0]) for e in entries if 'tmp' in e]
  assert all(latest < s for s in in_flight), (latest, entries)
  abstract = {'w': jax.ShapeDtypeStruct((32, 1024, 1024), np.float32,
                                        sharding=sharding.replicated(
                                            sharding.make_mesh(dict(data=-1, fsdp=1,
                                                                    tensor=1))))}
  state, data_state, _ = ckpt.restore(latest, abstract)
  ckpt.close()
  assert data_state == {'step': latest}
  assert float(state['w'][0, 0, 0]) == float(latest) == float(state['w'][-1, -1, -1])


def test_nonfinite_loss_stops_and_saves_nothing_after(tmp_path, data_dir, monkeypatch):
  from cookie_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _config(data_dir)
  real_next = pipeline.TrainIterator.__next__

  def poisoned_next(self):
    batch = real_next(self)
    if self.step == 3:   # the batch of step 3
      image = np.asarray(batch['image']).copy()
      image[0, 0, 0, 0] = np.nan
      batch = dict(batch, image=sharding.to_global(self.mesh, {'image': image})['image'])
    return batch
  monkeypatch.setattr(pipeline.TrainIterator, '__next__', poisoned_next)
  workdir = str(tmp_path / 'nan')
  with pytest.raises(train.NonFiniteError,
                     match=r'NaN/Inf at step 3 .*nothing from step 3 on was saved.*'
                           r'checkpoints/2\b'):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']


def test_init_from_a_different_model_names_the_parameter(tmp_path):
  config = default_config('tiny')
  config.model.vision.image_size = 16
  state, _ = step_lib.create_train_state(config, sharding.make_mesh(config.mesh))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'run' / 'checkpoints'), config.checkpoint)
  ckpt.save(5, state, {'step': 5}, config, force=True)
  ckpt.close()

  same, _ = ckpt_lib.load_params(str(tmp_path / 'run'), jax.eval_shape(lambda: state.params))
  for p, q in zip(jax.tree.leaves(jax.device_get(same)), jax.tree.leaves(
      jax.device_get(state.params))):
    np.testing.assert_array_equal(p, q)

  config.model.text.mlp_dim = 48
  other, _ = step_lib.create_train_state(config, sharding.make_mesh(config.mesh))
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"'text/layer/0/intermediate/bias' has shape \(64,\) in the "
                           r'checkpoint but \(48,\)'):
    ckpt_lib.load_params(str(tmp_path / 'run'), jax.eval_shape(lambda: other.params))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    ckpt_lib.load_params(str(tmp_path / 'nowhere'), jax.eval_shape(lambda: other.params))


def test_finetuning_from_a_run_with_another_tokenizer_is_refused(tmp_path, data_dir):
  from cookie_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  pretrained = tmp_path / 'pretrained'
  pretrained.mkdir()
  tok_lib.save_run_tokenizer(
      str(pretrained), tok_lib.wordpiece_tokenizer([*tok_lib.SPECIAL_TOKENS, 'zebra']))
  config = _config(data_dir)
  config.train.init_from = str(pretrained)
  with pytest.raises(tok_lib.TokenizerMismatchError,
                     match=f'fine-tuning from {pretrained} is not the one'):
    train.train_and_evaluate(config, str(tmp_path / 'finetune'))
  assert not (tmp_path / 'finetune' / 'tokenizer.json').exists()


def test_second_ctrl_c_stops_at_once_while_the_main_thread_waits(tmp_path, monkeypatch,
                                                                 caplog):
  exits, exited = [], threading.Event()
  monkeypatch.setattr(os, '_exit', lambda code: (exits.append(code), exited.set()))
  stop = stop_lib.StopSignals()
  before = signal.getsignal(signal.SIGINT)
  directory = tmp_path / 'checkpoints'
  for name in ('2', '4', '6.orbax-checkpoint-tmp-1'):  # 6 was being written
    (directory / name).mkdir(parents=True)
  stop.install(str(directory))
  try:
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: a request to stop
    for _ in range(500):
      if stop.signal is not None:
        break
      time.sleep(0.01)
    assert stop.signal == signal.SIGINT and not exits
    os.kill(os.getpid(), signal.SIGINT)
    # This thread is blocked in a wait, as it would be in a compile or a device wait:
    # the watcher thread ends the process (here: records the exit) without it.
    assert exited.wait(10) and exits == [130]
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is before
  said = [r.getMessage() for r in caplog.records]
  assert any(m.startswith('Ctrl-C: saving a checkpoint') for m in said), said
  assert (f'Ctrl-C again: stopped without saving. Latest complete checkpoint: '
          f'{directory}/4.') in said, said


def _launch(*args, timeout=300):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, str(ROOT / 'launch' / 'train.py'), *args],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _tiny_run_flags(tmp_path, steps):
  return ['--config=configs/base.py:tiny', f'--workdir={tmp_path / "run"}',
          f'--config.data.data_dir={tmp_path / "tfds"}',
          '--config.data.synthetic.train_images=64', '--config.data.synthetic.eval_images=16',
          '--config.data.synthetic.image_size=16', '--config.model.vision.image_size=16',
          '--config.model.vision.depth=1', '--config.model.text.depth=1',
          f'--config.train.steps={steps}', '--config.train.log_every=1',
          '--config.train.progress_bar=False', '--config.eval.test_at_end=False']


def test_ctrl_c_saves_exits_130_in_one_line_and_the_rerun_says_it_resumes(tmp_path):
  """A real SIGINT to launch/train.py, as a terminal's Ctrl-C sends it."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  proc = subprocess.Popen([sys.executable, str(ROOT / 'launch' / 'train.py'),
                           *_tiny_run_flags(tmp_path, 100_000)], stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr[-3000:]
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-3000:]
  directory = tmp_path / 'run' / 'checkpoints'
  assert f'no checkpoint in {directory}: starting at step 0' in stderr
  last = stderr.strip().splitlines()[-1]
  saved = re.fullmatch(r'Interrupted \(Ctrl-C\) at step (\d+); saved (.+)/(\d+)\. Re-run the '
                       r'same command to resume\.', last)
  assert saved and saved[2] == str(directory) and saved[1] == saved[3], last
  step = int(saved[1])
  assert step >= 3 and str(step) in os.listdir(directory)
  out = _launch(*_tiny_run_flags(tmp_path, step))  # nothing left to train: it resumes, ends
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming from {directory}/{step}' in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize('override, line', [
    ('--config.train.stepz=10', "error: Unknown config key 'train.stepz' "
     "(--config.train.stepz=10). Did you mean 'train.steps'?"),
    ('--config.optim.lr=abc', "error: --config.optim.lr=abc: could not convert string to "
     "float: 'abc'; config.optim.lr takes a number, e.g. --config.optim.lr=0.001."),
])
def test_launcher_bad_override_is_one_clean_line(tmp_path, override, line):
  out = _launch('--config=configs/base.py:tiny', override, f'--workdir={tmp_path}')
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [line], out.stderr


@pytest.mark.parametrize('config, override, code, line', [
    ('configs/bsae.py', '--config.train.steps=3', 2, "error: --config=configs/bsae.py: no "
     "such config file 'configs/bsae.py'. Did you mean configs/base.py?"),
    ('configs/base.py:bsae', '--config.train.steps=3', 2, "error: bad command-line flags: "
     "ValueError: Unknown variant 'bsae' of configs/base.py; choose one of ('demo', "),
    ('configs/base.py:tiny', '--config.mesh.fsdp=3', 1, "error: config.mesh={'data': -1, "
     "'fsdp': 3, 'tensor': 1}: the fixed axes use 3 devices, which does not divide the 1 "
     "devices available; change the fixed sizes."),
])
def test_launcher_unknown_config_file_or_variant_and_an_impossible_mesh_are_one_line(
    tmp_path, config, override, code, line):
  out = _launch(f'--config={config}', override, f'--workdir={tmp_path}')
  assert out.returncode == code
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert out.stderr.startswith(line), out.stderr


def test_launcher_misspelt_key_in_config_file_is_one_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text(textwrap.dedent("""
      from cookie_jax.config import default_config
      def get_config():
        c = default_config()
        c.train.stpes = 5
        return c
      """))
  out = _launch(f'--config={bad}', f'--workdir={tmp_path / "w"}')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(
      "error: Unknown config key 'train.stpes'. Did you mean 'train.steps'?"), out.stderr
  assert 'Traceback' not in out.stderr


def test_launcher_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  out = _launch('--config=configs/base.py:tiny', f'--workdir={blocker / "run"}')
  assert out.returncode == 1
  assert 'cannot be written' in out.stderr and 'Traceback' not in out.stderr, out.stderr
