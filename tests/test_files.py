"""Every file through one path API (cookie_jax/files.py): each writer of a run, an
evaluation, an index build and an export keeps its files in a `gs://` workdir as in a
local one, against a real Cloud Storage emulator (tests/gcs_emulator.py: fake-gcs-server),
and nothing makes a local folder named `gs:`."""

import dataclasses
import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from cookie_jax import files, goodput, metric_writer, train
from cookie_jax.config import default_config
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.eval import index as index_lib
from cookie_jax.eval import pictures

import gcs_emulator

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fresh_clients():
  """epath decides once (cached) whether gs:// goes to TensorFlow, reading EPATH_USE_TF;
  fsspec keeps a GCS filesystem made with the endpoint of its day."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  import gcsfs  # pylint: disable=g-import-not-at-top
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  emulator = gcs_emulator.Emulator(str(tmp_path_factory.mktemp('gcs') / 'server.log'))
  try:
    with pytest.MonkeyPatch.context() as mp:
      for key, value in emulator.env.items():
        mp.setenv(key, value)
      _fresh_clients()
      yield emulator
  finally:
    _fresh_clients()
    emulator.stop()


@pytest.fixture
def cwd(tmp_path, monkeypatch):
  """An empty working directory, which must stay empty (no local `gs:` folder)."""
  here = tmp_path / 'cwd'
  here.mkdir()
  monkeypatch.chdir(here)
  yield here
  assert not os.listdir(here)


def _records(data: bytes) -> list[dict]:
  return [json.loads(line) for line in data.decode().splitlines()]


def _scalars(event_file: bytes) -> list[tuple[int, str, float]]:
  """(step, tag, value) of each scalar in a TensorBoard event file (TFRecord framing:
  length, its CRC, the Event proto, its CRC)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out, pos = [], 0
  while pos < len(event_file):
    (length,) = struct.unpack('<Q', event_file[pos:pos + 8])
    event = event_pb2.Event.FromString(event_file[pos + 12:pos + 12 + length])
    pos += 16 + length
    out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return out


def test_metric_writer_on_gs_keeps_each_step_once_across_a_resume(gcs, cwd):
  workdir = 'gs://bucket/metrics'
  writer = metric_writer.MetricWriter(workdir, 10, progress=False)
  for step in range(1, 5):
    writer.write(step, {'loss': 1.0 / step})
  writer.write(4, {'rsum': 150.0}, prefix='test/')
  writer.close()
  assert [(r['step'], r.get('loss', r.get('test/rsum'))) for r in _records(
      gcs.read('metrics/metrics.jsonl'))] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25),
                                               (4, 150.0)]
  # A run resumed from the checkpoint at step 2 drops what it redoes, in the bucket.
  writer = metric_writer.MetricWriter(workdir, 10, start_step=2, progress=False)
  writer.write(3, {'loss': 9.0})
  writer.close()
  assert [(r['step'], r['loss']) for r in _records(gcs.read('metrics/metrics.jsonl'))] == [
      (1, 1.0), (2, 0.5), (3, 9.0)]
  events = [n for n in gcs.names('metrics/') if n.startswith('metrics/tensorboard/events.')]
  assert len(events) == 2  # one event file per start, as TensorBoard expects
  first, second = sorted((gcs.read(n) for n in events), key=len, reverse=True)
  assert _scalars(first) == [(s, 'loss', pytest.approx(1.0 / s)) for s in range(1, 5)] + [
      (4, 'test/rsum', 150.0)]
  assert _scalars(second) == [(3, 'loss', 9.0)]


def test_drop_records_after_rewrites_a_gs_object(gcs, cwd):
  path = 'gs://bucket/drop/metrics.jsonl'
  lines = [json.dumps({'step': s, 'loss': s}) for s in range(1, 6)] + ['{"step": 6, "lo']
  files.write_text(path, '\n'.join(lines))
  assert metric_writer.drop_records_after(path, 3) == 3
  assert [r['step'] for r in _records(gcs.read('drop/metrics.jsonl'))] == [1, 2, 3]


def test_run_files_upload_when_due_or_forced_and_only_what_changed(gcs, cwd, monkeypatch):
  uploads = []
  real_upload = files.upload
  monkeypatch.setattr(files, 'upload', lambda src, dst: (uploads.append(dst),
                                                         real_upload(src, dst)))
  files.write_text('gs://bucket/sync/old.txt', 'from an earlier start')
  run = files.RunFiles('gs://bucket/sync', every_s=3600)
  with open(run.fetch('old.txt'), 'a', encoding='utf-8') as f:
    f.write(', continued')
  with open(run.local('new.txt'), 'w', encoding='utf-8') as f:
    f.write('new')
  assert not run.sync() and not gcs.has('sync/new.txt')  # not due yet
  assert run.sync(force=True)
  assert sorted(uploads) == ['gs://bucket/sync/new.txt', 'gs://bucket/sync/old.txt']
  assert gcs.read('sync/old.txt') == b'from an earlier start, continued'
  run.sync(force=True)
  assert len(uploads) == 2  # nothing changed, nothing sent
  root = run.root
  run.close()
  assert not os.path.exists(root)
  local = files.RunFiles(str(cwd.parent / 'local'))
  assert local.root == str(cwd.parent / 'local') and local.sync()


def test_open_whole_leaves_nothing_when_the_block_fails(gcs, cwd, tmp_path):
  for path in ('gs://bucket/whole/a.bin', str(tmp_path / 'whole' / 'a.bin')):
    with pytest.raises(RuntimeError):
      with files.open_whole(path) as f:
        f.write(b'half')
        raise RuntimeError('failed mid-write')
    assert not files.exists(path)
    with files.open_whole(path) as f:
      f.write(b'whole')
    assert files.read_bytes(path) == b'whole'
  assert gcs.names('whole/') == ['whole/a.bin'] and gcs.read('whole/a.bin') == b'whole'
  assert os.listdir(tmp_path / 'whole') == ['a.bin']


def test_goodput_record_on_gs_cuts_back_the_segment_a_resume_redoes(gcs, cwd):
  workdir = 'gs://bucket/goodput'
  run = files.RunFiles(workdir)
  clock = goodput.Clock('step', start=time.perf_counter() - 4.0)
  record = goodput.GoodputRecord(workdir, clock, start_step=0, run_files=run)
  record.advance(4)
  record.write()
  run.close()
  first = json.loads(gcs.read('goodput/goodput.json'))
  assert [(s['start_step'], s['end_step']) for s in first['segments']] == [(0, 4)]
  run = files.RunFiles(workdir)
  record = goodput.GoodputRecord(workdir, goodput.Clock(), start_step=3, run_files=run)
  record.write()
  run.close()
  again = json.loads(gcs.read('goodput/goodput.json'))
  assert [(s['start_step'], s['end_step']) for s in again['segments']] == [(0, 3), (3, 3)]
  step_seconds = first['segments'][0]['seconds']['step']
  assert again['recomputed'] == pytest.approx(step_seconds / 4)


def test_write_json_pictures_and_the_run_tokenizer_on_gs(gcs, cwd, tmp_path):
  metric_writer.write_json('gs://bucket/eval/eval/result.json', {'rsum': 1.5, 'step': 2})
  assert json.loads(gcs.read('eval/eval/result.json')) == {'rsum': 1.5, 'step': 2}
  curve = {'k': [1, 2, 3], 'i2t': [10.0, 20.0, 40.0], 't2i': [5.0, 15.0, 30.0]}
  pictures.draw_recall_curve('gs://bucket/eval/eval/recall.png', curve, title='t')
  pictures.draw_recall_curve(str(tmp_path / 'recall.png'), curve, title='t')
  assert gcs.read('eval/eval/recall.png') == (tmp_path / 'recall.png').read_bytes()
  tok = tok_lib.wordpiece_tokenizer(['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'red', 'circle'])
  tok_lib.save_run_tokenizer('gs://bucket/eval', tok)
  assert gcs.names('eval/') == ['eval/eval/recall.png', 'eval/eval/result.json',
                                'eval/tokenizer.json']
  back = tok_lib.read_run_tokenizer('gs://bucket/eval/checkpoints/7')
  assert back.get_vocab() == tok.get_vocab()
  assert tok_lib.tokenizer_from_path('gs://bucket/eval').get_vocab() == tok.get_vocab()


def test_wandb_run_file_on_gs(gcs, cwd, tmp_path, monkeypatch):
  pytest.importorskip('wandb')
  from cookie_jax import wandb_log  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.setenv('WANDB_DIR', str(tmp_path / 'wandb'))  # W&B's own files stay local
  (tmp_path / 'wandb').mkdir()
  config = default_config('tiny')
  config.train.wandb_project = 'cookie-jax-test'
  run = files.RunFiles('gs://bucket/wandb')
  mirror = wandb_log.WandbMirror('gs://bucket/wandb', config, run)
  mirror.log(1, {'train/loss': 2.0})
  run_id = mirror.run_id
  mirror.close()
  run.close()
  assert json.loads(gcs.read('wandb/wandb_run.json')) == {'id': run_id, 'last_step': 1}
  assert gcs.names('wandb/') == ['wandb/wandb_run.json']


def test_check_workdir_on_gs_leaves_no_probe(gcs, cwd):
  train._check_workdir('gs://bucket/probe')  # pylint: disable=protected-access
  assert gcs.names('probe') == []


class _FakeEncoder:
  """Image i of the source embeds as row i of `table` (what index.py needs of one)."""
  image_size, mean, std, batch_size, source = 8, (0.0,) * 3, (1.0,) * 3, 4, {'fake': 1}
  config = types.SimpleNamespace(model=types.SimpleNamespace(embed_dim=4))

  def __init__(self, table):
    self.table = table

  def encode_images(self, batches):
    return np.concatenate([self.table[b['rows'][b['mask']]] for b in batches])


@dataclasses.dataclass
class _RowSource(index_lib.Source):
  def batches(self, lo, hi, encoder):
    for start in range(lo, hi, encoder.batch_size):
      rows = np.arange(start, start + encoder.batch_size)
      ok = (rows < hi) & (rows != 5)  # row 5 is unreadable
      yield {'rows': np.minimum(rows, hi - 1), 'mask': ok,
             'error': ['' if o else 'corrupt' for o in ok]}


def test_an_index_builds_resumes_and_loads_on_gs(gcs, cwd):
  table = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
  source = _RowSource({'fake': 'rows'}, [f'img{i}' for i in range(10)])
  enc = _FakeEncoder(table)
  built = []

  def stop(chunk):
    built.append(chunk)
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):  # a build cut after its first chunk...
    index_lib.build_index(enc, source, 'gs://bucket/index', chunk_size=4, progress=False,
                          on_chunk=stop)
  assert gcs.names('index/chunks/') == ['index/chunks/00000.npz']
  # ...resumes from the bucket.
  manifest = index_lib.build_index(enc, source, 'gs://bucket/index', chunk_size=4,
                                   progress=False, on_chunk=built.append)
  assert built == [0, 1, 2] and manifest['num_indexed'] == 9 and manifest['complete']
  kept = [i for i in range(10) if i != 5]
  stored = np.load(io.BytesIO(gcs.read('index/embeddings.npy')))
  np.testing.assert_array_equal(stored, table[kept])
  assert json.loads(gcs.read('index/skipped.json')) == [{'path': 'img5', 'error': 'corrupt'}]
  loaded = index_lib.Index.load('gs://bucket/index')
  assert loaded.keys == [f'img{i}' for i in kept]
  np.testing.assert_array_equal(loaded.embeddings, table[kept])


# Runs in a gs:// workdir ----------------------------------------------------------------


def _tiny_config(data_dir, steps):
  """tests/test_goodput.py's config: the same program, compiled once per session."""
  config = default_config('tiny')
  config.model.vision.image_size = 16
  config.data.data_dir = str(data_dir)
  config.data.max_len = 12
  config.data.synthetic.train_images = 96
  config.data.synthetic.eval_images = 24
  config.data.synthetic.image_size = 16
  config.train.batch_size = config.eval.batch_size = 16
  config.train.steps, config.train.log_every = steps, 1
  config.train.progress_bar = False
  config.eval.test_at_end = False
  config.checkpoint.every = 2
  config.optim.schedule, config.optim.warmup_steps = 'constant', 0
  return config


@pytest.mark.slow  # two starts, each with its pipeline and a compile: 85 s (quiet VM) to 3 min
def test_training_in_a_gs_workdir_resumes_from_the_bucket(gcs, cwd, tmp_path):
  """Two starts of `train_and_evaluate` in gs://bucket/train (in this process): the
  second restores from the bucket, and every file of both is there."""
  config = _tiny_config(tmp_path / 'tfds', steps=2)
  train.train_and_evaluate(config, 'gs://bucket/train')
  config.train.steps = 4
  config.train.profile_steps = (3, 4)
  result = train.train_and_evaluate(config, 'gs://bucket/train')
  assert result['step'] == 4
  records = _records(gcs.read('train/metrics.jsonl'))
  assert [r['step'] for r in records if 'train/loss' in r] == [1, 2, 3, 4]
  # The first start's closing record at step 2 is dropped: the resume writes its own.
  assert [r['step'] for r in records if 'time/goodput' in r and 'train/loss' not in r] == [4]
  segments = json.loads(gcs.read('train/goodput.json'))['segments']
  assert [(s['start_step'], s['end_step']) for s in segments] == [(0, 2), (2, 4)]
  names = gcs.names('train/')
  assert 'train/tokenizer.json' in names
  assert {n.split('/')[2] for n in names if n.startswith('train/checkpoints/')} == {'2', '4'}
  events = [n for n in names if n.startswith('train/tensorboard/events.')]
  assert len(events) == 2
  logged = [(s, v) for e in events for s, tag, v in _scalars(gcs.read(e))
            if tag == 'train/loss']
  assert sorted(logged) == sorted((r['step'], pytest.approx(r['train/loss']))
                                  for r in records if 'train/loss' in r)
  traces = [n for n in names if n.startswith('train/profile/plugins/profile/')
            and n.endswith('.xplane.pb')]
  assert len(traces) == 1 and len(gcs.read(traces[0])) > 1000, names


# A whole run in a gs:// workdir: train, SIGTERM, resume, evaluate, export ---------------


def _launch(script, *args, env, cwd, timeout=600):
  return subprocess.run([sys.executable, str(ROOT / 'launch' / script), *args],
                        capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def _train_flags(data_dir, steps, *extra):
  return [f'--config={ROOT / "configs" / "base.py"}:tiny', '--workdir=gs://bucket/run',
          f'--config.data.data_dir={data_dir}', '--config.data.synthetic.train_images=64',
          '--config.data.synthetic.eval_images=16', '--config.data.synthetic.image_size=16',
          '--config.model.vision.image_size=16', '--config.model.vision.depth=1',
          '--config.model.text.depth=1', f'--config.train.steps={steps}',
          '--config.train.log_every=1', '--config.train.progress_bar=False',
          '--config.checkpoint.every=2', *extra]


def _wait_for_records(gcs, proc, count, timeout=600):
  """Until the bucket's metrics.jsonl holds `count` records (uploaded at each save)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if gcs.has('run/metrics.jsonl') and len(_records(gcs.read('run/metrics.jsonl'))) >= count:
      return
    time.sleep(0.5)
  raise AssertionError(f'no {count} records in time: {proc.communicate()[1][-3000:]}')


@pytest.mark.slow  # four launcher processes: 110 s on the quiet 2-core VM, 4 min when busy
def test_a_gs_workdir_keeps_everything_of_train_resume_eval_and_export(gcs, tmp_path):
  """launch/train.py, SIGTERM, a resume, launch/eval.py and launch/export_torch.py, all
  with --workdir=gs://bucket/run, in an empty working directory and an empty HOME: every
  file is in the bucket, none on local disk."""
  here, home, tmp = tmp_path / 'cwd', tmp_path / 'home', tmp_path / 'tmp'
  for d in (here, home, tmp):
    d.mkdir()
  env = dict(os.environ, **gcs.env, HOME=str(home), TMPDIR=str(tmp))
  env.pop('XLA_FLAGS', None)  # one CPU device
  data_dir = tmp_path / 'tfds'  # the dataset stays local: this test is about the workdir
  proc = subprocess.Popen([sys.executable, str(ROOT / 'launch' / 'train.py'),
                           *_train_flags(data_dir, 1000, '--config.eval.test_at_end=False')],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=here)
  _wait_for_records(gcs, proc, 3)
  proc.terminate()  # SIGTERM: save, stop
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0 and 'Preempted at step' in stderr, stderr[-3000:]
  stopped = max(r['step'] for r in _records(gcs.read('run/metrics.jsonl')))
  assert gcs.has(f'run/checkpoints/{stopped}/commit_success.txt') or any(
      n.startswith(f'run/checkpoints/{stopped}/') for n in gcs.names('run/checkpoints/'))
  steps = stopped + 2
  out = _launch('train.py', *_train_flags(data_dir, steps), env=env, cwd=here)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming from gs://bucket/run/checkpoints/{stopped}' in out.stderr
  out = _launch('eval.py', '--workdir=gs://bucket/run', '--progress=False', env=env, cwd=here)
  assert out.returncode == 0, out.stderr[-3000:]
  out = _launch('export_torch.py', '--workdir=gs://bucket/run', '--output=gs://bucket/export',
                env=env, cwd=here)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'Exported step {steps} to gs://bucket/export.' in out.stdout

  names = gcs.names('run/')
  logged = [r['step'] for r in _records(gcs.read('run/metrics.jsonl')) if 'train/loss' in r]
  assert logged == list(range(1, steps + 1))  # each step once, across the stop
  segments = json.loads(gcs.read('run/goodput.json'))['segments']
  assert [(s['start_step'], s['end_step']) for s in segments] == [(0, stopped),
                                                                   (stopped, steps)]
  assert json.loads(gcs.read('run/test_retrieval.json'))['step'] == steps
  assert 'run/tokenizer.json' in names
  assert any(n.startswith(f'run/checkpoints/{steps}/') for n in names)
  assert len([n for n in names if n.startswith('run/tensorboard/events.')]) == 2
  stem = f'run/eval/retrieval-test-full-{steps}'
  assert json.loads(gcs.read(f'{stem}.json'))['step'] == steps
  for picture in (f'{stem}-recall.png', f'{stem}-examples.png'):
    assert gcs.read(picture)[:8] == b'\x89PNG\r\n\x1a\n'
  exported = gcs.names('export/')
  for name in ('config.json', 'model.safetensors', 'cookie.safetensors', 'torch_model.py',
               'tokenizer.json', 'text_encoder/model.safetensors',
               'image_encoder/model.safetensors', 'image_encoder/preprocessor_config.json'):
    assert f'export/{name}' in exported, exported
  # Nothing on local disk: no `gs:` folder anywhere, and our temporary folders removed.
  assert not os.listdir(here)
  local = [os.path.join(r, n) for d in (here, home, tmp) for r, ds, fs in os.walk(d)
           for n in ds + fs]
  assert not [p for p in local if 'gs:' in p or 'cookie_jax-' in p], local
