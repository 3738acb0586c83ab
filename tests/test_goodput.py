"""Seeing inside a run: the profiler switch, goodput accounting, one record per step across
a crash and resume, and the optional W&B mirror."""

import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import goodput, metric_writer, train
from cookie_jax.config import ConfigError, default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _config(data_dir, steps=4):
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
  config.eval.batch_size = 16
  config.eval.test_at_end = False
  config.checkpoint.every = 2
  # A schedule that does not depend on train.steps: every run of this file, whatever its
  # length, is the same program, compiled once per session (tests/conftest.py's cache).
  config.optim.schedule = 'constant'
  config.optim.warmup_steps = 0
  return config


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _goodput(workdir):
  with open(os.path.join(workdir, 'goodput.json'), encoding='utf-8') as f:
    return json.load(f)


def _slow_input(monkeypatch, seconds):
  real = train._input

  class Slow:
    def __init__(self, it):
      self.it = it

    def __next__(self):
      time.sleep(seconds)
      return next(self.it)

    def __getattr__(self, name):
      return getattr(self.it, name)

  monkeypatch.setattr(train, '_input', lambda *a: (lambda p, it: (p, Slow(it)))(*real(*a)))


@pytest.mark.slow
def test_profile_steps_write_a_trace(tmp_path, data_dir):
  config = _config(data_dir, steps=3)
  config.train.profile_steps = (2, 3)
  train.train_and_evaluate(config, str(tmp_path / 'profiled'))
  traces = glob.glob(str(tmp_path / 'profiled/profile/plugins/profile/*/*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000, traces


@pytest.mark.slow  # CI time: a whole train run to see no trace; test_profile_steps_are_checked stays
def test_no_profile_steps_no_profile(tmp_path, data_dir):
  workdir = str(tmp_path / 'plain')
  train.train_and_evaluate(_config(data_dir, steps=2), workdir)
  assert not os.path.exists(os.path.join(workdir, 'profile'))


def test_profile_steps_are_checked():
  from cookie_jax.config import validate_config  # pylint: disable=g-import-not-at-top
  config = default_config('tiny')
  for bad in ((3, 2), (0, 4), (5,)):
    config.train.profile_steps = bad
    with pytest.raises(ConfigError, match=r'train\.profile_steps'):
      validate_config(config)


@pytest.mark.slow  # CI time: a train run; the slow save's run below checks its split too
def test_slow_input_dominates_and_the_split_sums_to_the_wall_time(tmp_path, data_dir,
                                                                  monkeypatch):
  _slow_input(monkeypatch, 0.8)
  workdir = str(tmp_path / 'run')
  config = _config(data_dir, steps=6)
  config.checkpoint.every = 0  # one save, at the end
  begin = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - begin
  g = _goodput(workdir)
  s = g['seconds']
  assert sum(s.values()) == pytest.approx(g['wall'], rel=1e-9)
  assert abs(g['wall'] - wall) <= 0.05 * wall, (g['wall'], wall)
  assert s['input_wait'] >= 5 * 0.8  # the first batch's wait is start-up
  # Of the loop's own time, waiting for input dominates the device step (5 tiny steps:
  # a fraction of a second idle, up to 2 s at a load of 40 on 2 cores). The first save's
  # one-off orbax start-up can take longer on a loaded machine, so it is not compared.
  assert s['input_wait'] > s['step'], s
  assert s['compile'] > 0 and s['startup'] > 0 and len(g['segments']) == 1
  last = [r for r in _records(workdir) if 'train/loss' in r][-1]
  assert last['step'] == 6 and last['time/input_wait'] >= 5 * 0.8
  assert 0 < last['time/goodput'] < 1


def test_slow_save_shows_in_checkpoint_time(tmp_path, data_dir, monkeypatch):
  real = ckpt_lib.Checkpointer.save
  saves = []

  def slow_save(self, step, *args, **kwargs):
    time.sleep(1.0)
    saves.append(step)
    return real(self, step, *args, **kwargs)
  monkeypatch.setattr(ckpt_lib.Checkpointer, 'save', slow_save)
  workdir = str(tmp_path / 'run')
  begin = time.perf_counter()
  train.train_and_evaluate(_config(data_dir, steps=4), workdir)
  wall = time.perf_counter() - begin
  g = _goodput(workdir)
  s = g['seconds']
  # The buckets split the run's wall time exactly, and that is the time it took.
  assert sum(s.values()) == pytest.approx(g['wall'], rel=1e-9)
  assert abs(g['wall'] - wall) <= 0.05 * wall, (g['wall'], wall)
  assert sorted(set(saves)) == [2, 4]
  assert s['checkpoint'] >= 2.0, s  # both sleeps are counted as checkpoint time ...
  assert s['step'] + s['input_wait'] < 2.0, s  # ... and not as anything else


@pytest.mark.slow  # CI time: two train runs; test_drop_records_after_keeps_each_step_once stays
def test_resume_appends_to_the_goodput_record_and_redone_steps_appear_once(tmp_path,
                                                                         data_dir):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(data_dir, steps=4), workdir)
  # What a crash at step 6 after the checkpoint at 4 leaves: records of steps 5 and 6,
  # the last one cut short, and a goodput segment that reached step 6.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write(json.dumps({'step': 5, 'train/loss': 9.0}) + '\n{"step": 6, "train/lo')
  g = _goodput(workdir)
  g['segments'][0]['end_step'] = 6
  with open(os.path.join(workdir, 'goodput.json'), 'w', encoding='utf-8') as f:
    json.dump(g, f)

  train.train_and_evaluate(_config(data_dir, steps=8), workdir)
  steps = [r['step'] for r in _records(workdir) if 'train/loss' in r]
  assert steps == list(range(1, 9))
  assert all(r['train/loss'] != 9.0 for r in _records(workdir) if 'train/loss' in r)
  g = _goodput(workdir)
  first, second = g['segments']
  assert (first['start_step'], first['end_step']) == (0, 4)
  assert (second['start_step'], second['end_step']) == (4, 8) and g['steps'] == 8
  # Two of the first segment's six steps were redone.
  assert first['recomputed'] == pytest.approx(first['seconds']['step'] * 2 / 6)
  assert g['wall'] == pytest.approx(first['wall'] + second['wall'])
  assert g['goodput'] == pytest.approx(
      (g['seconds']['step'] - g['recomputed']) / g['wall'])


def test_drop_records_after_keeps_each_step_once(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  rows = [{'step': 1, 'train/loss': 1.0}, {'step': 2, 'train/loss': 2.0},
          {'step': 2, 'val/rsum': 5.0}, {'step': 2, 'test/rsum': 6.0},
          {'step': 2, 'time/total': 3.0}, {'step': 3, 'train/loss': 3.0}]
  with open(path, 'w', encoding='utf-8') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 4, "tr')
  assert metric_writer.drop_records_after(path, 2) == 4
  assert _records(str(tmp_path)) == rows[:3]
  assert metric_writer.drop_records_after(path, 2) == 0


@pytest.mark.slow
def test_kill_9_then_resume_leaves_each_step_once(tmp_path, data_dir):
  """A real crash: a child trains with checkpoints every 2 steps and is killed with
  SIGKILL after logging a step past a checkpoint; a second run resumes.

  Slow (a minute or more on a shared 2-core machine): the child process starts JAX and
  the input pipeline anew. test_resume_appends_... covers the same records in-process.
  """
  workdir = str(tmp_path / 'run')
  config = _config(data_dir, steps=400)
  child = textwrap.dedent(f"""
      import json, sys
      sys.path.insert(0, {str(ROOT)!r})
      from cookie_jax import train
      from cookie_jax.config import config_from_dict
      train.train_and_evaluate(config_from_dict(json.loads({config.to_json()!r})),
                               {workdir!r})
      """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-c', child], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 120
  try:
    while time.time() < deadline and proc.poll() is None:
      done = [r['step'] for r in _records(workdir)] if os.path.exists(metrics) else []
      if done and max(done) >= 7 and max(done) % 2 == 1:
        break
      time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  crashed_at = max(r['step'] for r in _records(workdir))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint)
  restored = ckpt.latest_step()
  ckpt.close()
  assert restored < crashed_at

  config.train.steps = crashed_at + 2
  train.train_and_evaluate(config, workdir)
  steps = [r['step'] for r in _records(workdir) if 'train/loss' in r]
  assert steps == list(range(1, crashed_at + 3))
  g = _goodput(workdir)
  assert [(s['start_step'], s['end_step']) for s in g['segments']][-1] == (
      restored, crashed_at + 2)
  assert g['steps'] == crashed_at + 2 and g['recomputed'] > 0


@pytest.mark.slow  # CI time: two train runs with the optional W&B extra
def test_wandb_offline_mirrors_metrics_and_resumes_the_same_run(tmp_path, data_dir,
                                                               monkeypatch, capsys):
  try:
    import wandb  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    with capsys.disabled():
      print('\nSKIPPED W&B test: the wandb package is not installed '
            "(pip install -e '.[wandb]').")
    pytest.skip('wandb is not installed (the [wandb] extra)')
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  workdir = str(tmp_path / 'run')
  config = _config(data_dir, steps=2)
  config.train.wandb_project = 'cookie-jax-test'
  config.train.wandb_run = 'offline-test'
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'wandb_run.json'), encoding='utf-8') as f:
    stored = json.load(f)
  assert stored['last_step'] == 2
  config.train.steps = 4
  train.train_and_evaluate(config, workdir)
  runs = sorted(glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*')))
  assert len(runs) == 2 and all(r.endswith('-' + stored['id']) for r in runs)
  assert all(glob.glob(os.path.join(r, '*.wandb')) for r in runs)
  loss = {r['step']: r['train/loss'] for r in _records(workdir) if 'train/loss' in r}
  logged = []
  for run in runs:
    records = list(_wandb_records(glob.glob(os.path.join(run, '*.wandb'))[0]))
    meta = next(r.run for r in records if r.WhichOneof('record_type') == 'run')
    assert (meta.run_id, meta.project, meta.display_name) == (
        stored['id'], 'cookie-jax-test', 'offline-test')
    for r in records:
      if r.WhichOneof('record_type') == 'history':
        items = {i.key or '/'.join(i.nested_key): json.loads(i.value_json)
                 for i in r.history.item}
        assert items['train/loss'] == pytest.approx(loss[items['_step']], rel=1e-6)
        assert 'time/goodput' in items and 'train/grad_norm' in items
        logged.append(items['_step'])
  assert logged == [1, 2, 3, 4]  # each step once, over both starts


def _wandb_records(path):
  """The protobuf records of a W&B run file (a LevelDB-style log of 32 KiB blocks)."""
  import struct  # pylint: disable=g-import-not-at-top
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B'
  pos, block, chunks = 7, 32768, b''
  while pos + 7 <= len(data):
    left = block - pos % block
    _, size, kind = struct.unpack('<IHB', data[pos:pos + 7])
    if left < 7 or (size == 0 and kind == 0):  # block trailer
      pos += left
      continue
    chunks += data[pos + 7:pos + 7 + size]
    pos += 7 + size
    if kind in (1, 4):  # a whole record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunks)
      chunks = b''
      yield record


def test_wandb_without_the_package_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb -> ImportError
  config = default_config('tiny')
  config.train.wandb_project = 'p'
  with pytest.raises(ConfigError, match=r"train.wandb_project.*\[wandb\]"):
    train.train_and_evaluate(config, str(tmp_path))


def test_clock_buckets_add_up():
  clock = goodput.Clock('startup')
  clock.call('input_wait', time.sleep, 0.05)
  clock.switch('step')
  time.sleep(0.02)
  t = clock.totals()
  assert t['input_wait'] >= 0.05 and t['step'] >= 0.02
  assert sum(t.values()) == pytest.approx(time.perf_counter() - clock.start, abs=1e-3)
