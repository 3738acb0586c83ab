"""Global batches as a function of the step, across process layouts (gloo, 2 processes x 4
CPU devices against 1 x 8): the same batches, and a 2-process checkpoint resumed on 1
process trains exactly like an uninterrupted run."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cookie_jax import sharding, train
from cookie_jax.data import defaults, pipeline
from test_distributed import _config, _config_file, _free_port, _run_two_processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 5

_CHILD = textwrap.dedent('''
    import json, sys
    import numpy as np
    from cookie_jax import distributed
    distributed.initialize()
    import jax
    from jax.experimental import multihost_utils
    from cookie_jax import sharding
    from cookie_jax.data import defaults, pipeline
    cfg = defaults.data_config()
    cfg.update(json.loads(sys.argv[1]))
    mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
    it = pipeline.TrainIterator(cfg, image_size=16, global_batch_size=16, seed=3, mesh=mesh,
                                second_view=True, start_step=int(sys.argv[3]))
    out = {}
    for k in range(int(sys.argv[4])):
      for key, value in next(it).items():
        out[f'{k}/{key}'] = multihost_utils.process_allgather(value, tiled=True)
    if jax.process_index() == 0:
      np.savez(sys.argv[2], **out)
''')


def _data_cfg(tmp_path, cache_mb):
  cfg = defaults.data_config()
  cfg.update(dict(data_dir=str(tmp_path / 'tfds'), cache_mb=cache_mb, num_parallel_calls=2))
  cfg.synthetic.update(dict(train_images=40, eval_images=8, image_size=16))
  return cfg


def _two_process_batches(tmp_path, cfg, start, steps):
  script = tmp_path / 'child.py'
  script.write_text(_CHILD)
  out = tmp_path / f'batches_{start}.npz'
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  procs = [subprocess.Popen(
      [sys.executable, str(script), json.dumps(cfg.to_dict()), str(out), str(start),
       str(steps)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu', COOKIE_COORDINATOR=f'127.0.0.1:{port}',
               COOKIE_NUM_PROCESSES='2', COOKIE_PROCESS_ID=str(i),
               COOKIE_CPU_COLLECTIVES='gloo', PYTHONPATH=str(ROOT))) for i in range(2)]
  logs = [p.communicate(timeout=600)[0].decode()[-3000:] for p in procs]
  assert all(p.returncode == 0 for p in procs), '\n'.join(logs)
  with np.load(out) as f:
    return [{k.split('/')[1]: f[k] for k in f.files if k.startswith(f'{i}/')}
            for i in range(steps)]


@pytest.mark.slow
@pytest.mark.parametrize('cache_mb', [1024, 0])
def test_one_and_two_processes_give_bit_identical_global_batches(tmp_path, cache_mb):
  cfg = _data_cfg(tmp_path, cache_mb)
  mesh = sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})  # 1 process x 8 devices
  it = pipeline.TrainIterator(cfg, image_size=16, global_batch_size=16, seed=3, mesh=mesh,
                              second_view=True)
  one = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(STEPS)]
  assert one[0].keys() == {'image', 'image_view2', 'input_ids', 'attention_mask',
                           'bad_records'}
  two = _two_process_batches(tmp_path, cfg, 0, STEPS)
  resumed = _two_process_batches(tmp_path, cfg, 3, STEPS - 3)  # restarted at step 3
  for k in range(STEPS):
    for key, value in one[k].items():
      np.testing.assert_array_equal(two[k][key], value, err_msg=f'step {k} {key}')
      if k >= 3:
        np.testing.assert_array_equal(resumed[k - 3][key], value, err_msg=f'{k} {key}')


def _rows(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r for r in rows if 'train/loss' in r}


@pytest.mark.slow
def test_two_processes_checkpointed_at_step_3_resume_on_one_like_an_uninterrupted_run(
    tmp_path):
  data_dir = str(tmp_path / 'tfds')
  uninterrupted = str(tmp_path / 'uninterrupted')
  config = _config(data_dir, steps=6)
  config.checkpoint.every = 3
  train.train_and_evaluate(config, uninterrupted)  # also builds the data for the children

  # 2 processes x 4 devices train steps 1-3 and checkpoint; 1 process x 8 resumes to 6.
  run = str(tmp_path / 'run')
  config_file = _config_file(tmp_path, data_dir, 3)
  text = pathlib.Path(config_file).read_text().replace(
      "'checkpoint.every': 2", "'checkpoint.every': 3")
  pathlib.Path(config_file).write_text(text)
  _run_two_processes(config_file, run, tmp_path)
  _, saved = train.restored_state(_config(data_dir, steps=3), run)
  assert saved['step'] == 3 and saved['process_count'] == 2
  train.train_and_evaluate(config, run)

  ref, got = _rows(uninterrupted), _rows(run)
  assert sorted(got) == list(range(1, 7)) == sorted(ref)
  for step in range(1, 7):
    for key in ('train/loss', 'train/loss/cross_modal', 'train/loss/textual',
                'train/grad_norm'):
      np.testing.assert_allclose(got[step][key], ref[step][key], rtol=1e-6, atol=1e-6,
                                 err_msg=f'{key} at step {step}')
  ref_state, _ = train.restored_state(config, uninterrupted)
  got_state, data_state = train.restored_state(config, run)
  assert int(got_state.step) == 6 and data_state['step'] == 6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               got_state.params, ref_state.params)
  # The batches of the resumed steps are the uninterrupted run's: the same iterator
  # positions on 1 process as on 2 (see the test above), here step 3 on.
  mesh = sharding.make_mesh(config.mesh)
  kw = dict(image_size=16, global_batch_size=16, seed=config.seed, mesh=mesh)
  whole = pipeline.TrainIterator(config.data, **kw)
  for _ in range(3):
    next(whole)
  resumed = pipeline.TrainIterator(config.data, start_step=saved['step'], **kw)
  for _ in range(3):
    a, b = next(whole), next(resumed)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


# -- a process's rows need not be one block: the device order of a TPU slice -----------

_INTERLEAVED_CHILD = textwrap.dedent('''
    import importlib.util, sys
    import numpy as np
    from cookie_jax import distributed
    distributed.initialize()
    import jax
    from jax.experimental import multihost_utils
    from cookie_jax import sharding, train
    from cookie_jax.data import pipeline
    spec = importlib.util.spec_from_file_location('config', sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()

    # The devices ordered p0d0, p1d0, p0d1, p1d1, ...: each process's rows of a batch
    # interleave with the other's, as the hosts' do on a TPU slice's torus.
    build = sharding.make_mesh

    def interleaved(mesh_config, devices=None):
      if devices is None:
        mine = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
        devices = [d for pair in zip(*mine) for d in pair]
      return build(mesh_config, devices)
    sharding.make_mesh = interleaved

    mesh = sharding.make_mesh(config.mesh)
    it = pipeline.TrainIterator(config.data, image_size=config.model.vision.image_size,
                                global_batch_size=config.train.batch_size, seed=config.seed,
                                mesh=mesh)
    batch = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in next(it).items()}
    rows = sharding.process_rows(mesh, config.train.batch_size)
    # The first validation batch of each side, as validation places it.
    val = pipeline.eval_data(train.eval_data_config(config.data, config.eval.data), 'val',
                             image_size=config.model.vision.image_size,
                             batch_size=config.eval.batch_size, mesh=mesh)
    for side, batches in (('image', val.image_batches()), ('text', val.text_batches())):
      for k, v in next(iter(batches)).items():  # global arrays, placed as the run does
        batch[f'val_{side}/{k}'] = multihost_utils.process_allgather(v, tiled=True)
    np.savez(f'{sys.argv[3]}_{jax.process_index()}.npz', rows=rows, **batch)
    if sys.argv[4] == 'train':
      train.train_and_evaluate(config, sys.argv[2])
''')


def _interleaved_batches(tmp_path, data_dir, config, then):
  """Runs _INTERLEAVED_CHILD on 2 processes (`then`: 'train' or 'batch' only); checks
  that each process held every other pair of rows (2 rows per device) and that the
  global train batch and first validation batches they assembled are 1 process's.
  Returns the children's workdir."""
  config_file = pathlib.Path(_config_file(tmp_path, data_dir, 2))
  config_file.write_text(config_file.read_text().replace(
      '  return config\n', f'  for k, v in {_INTERLEAVED!r}.items():\n'
      "    config[k.split('.')[0]][k.split('.')[1]] = v\n  return config\n"))
  script = tmp_path / 'interleaved.py'
  script.write_text(_INTERLEAVED_CHILD)
  run, dump = str(tmp_path / 'run'), str(tmp_path / 'batch')
  _run_script_in_two_processes(script, [str(config_file), run, dump, then], tmp_path)
  two = [np.load(f'{dump}_{p}.npz') for p in range(2)]
  np.testing.assert_array_equal(two[0]['rows'], [0, 1, 4, 5, 8, 9, 12, 13])
  np.testing.assert_array_equal(two[1]['rows'], [2, 3, 6, 7, 10, 11, 14, 15])
  one = next(pipeline.TrainIterator(config.data, image_size=16, global_batch_size=16,
                                    seed=config.seed, mesh=sharding.make_mesh(config.mesh)))
  val = pipeline.eval_data(train.eval_data_config(config.data, config.eval.data), 'val',
                           image_size=16, batch_size=config.eval.batch_size,
                           mesh=sharding.make_mesh(config.mesh))
  for side, batches in (('image', val.image_batches()), ('text', val.text_batches())):
    one.update({f'val_{side}/{k}': v for k, v in next(iter(batches)).items()})
  assert len(two[0].files) == len(one) + 1, (sorted(two[0].files), sorted(one))
  for key, value in one.items():
    np.testing.assert_array_equal(two[0][key], np.asarray(value), err_msg=key)
  return run


_INTERLEAVED = {'train.steps': 2, 'eval.every': 2, 'mesh.data': 4, 'mesh.fsdp': 2,
                'checkpoint.every': 2}


def _interleaved_config(data_dir):
  config = _config(data_dir, steps=2)
  for key, value in _INTERLEAVED.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def test_two_processes_whose_rows_interleave_assemble_the_one_process_batch(tmp_path):
  """2 processes x 4 CPU devices in an order that interleaves their batch rows (as on
  v5p-32): each holds every other pair of rows, and the global train batch and first
  validation batches are 1 process's.
  (Training and validating on that layout: the slow test below.)"""
  data_dir = str(tmp_path / 'tfds')
  config = _interleaved_config(data_dir)
  from cookie_jax.data import sources  # pylint: disable=g-import-not-at-top
  sources.build(config.data)  # before the children read it
  _interleaved_batches(tmp_path, data_dir, config, 'batch')


@pytest.mark.slow  # CI time: a run in-process and one on 2 processes, 5 min on 2 busy
# cores; the batch test above stays
def test_two_processes_whose_rows_interleave_train_and_validate_like_one(tmp_path):
  """2 processes x 4 CPU devices in an order that interleaves their batch rows (as on
  v5p-32): the global batches, losses, parameters and validation RSUM are those of 1
  process x 8 devices."""
  data_dir = str(tmp_path / 'tfds')
  config = _interleaved_config(data_dir)
  reference = str(tmp_path / 'reference')
  train.train_and_evaluate(config, reference)  # also builds the data for the children
  run = _interleaved_batches(tmp_path, data_dir, config, 'train')

  ref, got = _rows(reference), _rows(run)
  assert sorted(got) == [1, 2] == sorted(ref)
  for step in (1, 2):
    for key in ('train/loss', 'train/loss/cross_modal', 'train/loss/textual',
                'train/grad_norm'):
      np.testing.assert_allclose(got[step][key], ref[step][key], rtol=1e-6, atol=1e-6,
                                 err_msg=f'{key} at step {step}')
  val = lambda w: [json.loads(l) for l in open(os.path.join(w, 'metrics.jsonl'))
                   if '"val/rsum"' in l][-1]['val/rsum']
  assert val(run) == val(reference)
  ref_state, _ = train.restored_state(config, reference)
  got_state, _ = train.restored_state(config, run)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               got_state.params, ref_state.params)


def _run_script_in_two_processes(script, args, log_dir, expect_ok=True):
  """Each process's (exit code, last 3000 characters of output)."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  procs = [subprocess.Popen(
      [sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu', JAX_ENABLE_COMPILATION_CACHE='false',
               JAX_DEFAULT_MATMUL_PRECISION='highest',
               COOKIE_COORDINATOR=f'127.0.0.1:{port}', COOKIE_NUM_PROCESSES='2',
               COOKIE_PROCESS_ID=str(i), COOKIE_CPU_COLLECTIVES='gloo',
               PYTHONPATH=str(ROOT))) for i in range(2)]
  try:
    logs = [p.communicate(timeout=600)[0].decode()[-3000:] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  if expect_ok:
    assert all(p.returncode == 0 for p in procs), '\n'.join(logs)
  return [(p.returncode, log) for p, log in zip(procs, logs)]


# -- a dataset not yet built: one process builds it, the others wait, then read it -------

_BUILD_ONCE_CHILD = textwrap.dedent('''
    import importlib.util, sys
    from cookie_jax import distributed
    distributed.initialize()
    import jax
    from cookie_jax import train
    from cookie_jax.data.builders import synthetic

    build = synthetic.SyntheticShapes.download_and_prepare

    def counted(self, *args, **kwargs):  # each build leaves a line in this process's file
      with open(f'{sys.argv[3]}_{jax.process_index()}', 'a', encoding='utf-8') as f:
        f.write(f'{self.data_path}\\n')
      return build(self, *args, **kwargs)
    synthetic.SyntheticShapes.download_and_prepare = counted

    spec = importlib.util.spec_from_file_location('config', sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train.train_and_evaluate(module.get_config(), sys.argv[2])
''')


_BUILD_ONCE_READ_CHILD = textwrap.dedent('''
    import json, sys
    from cookie_jax import cli, distributed
    distributed.initialize()
    import jax
    from cookie_jax.data import defaults, sources
    from cookie_jax.data.builders import synthetic

    build = synthetic.SyntheticShapes.download_and_prepare

    def counted(self, *args, **kwargs):  # each build leaves a line in this process's file
      with open(f'{sys.argv[2]}_{jax.process_index()}', 'a', encoding='utf-8') as f:
        f.write(f'{self.data_path}\\n')
      return build(self, *args, **kwargs)
    synthetic.SyntheticShapes.download_and_prepare = counted

    cfg = defaults.data_config()
    cfg.update(json.loads(sys.argv[1]))
    builder = cli.run_or_exit(lambda: sources.get_builder(cfg))
    print('train examples:', builder.info.splits['train'].num_examples, flush=True)
    cfg.update(dict(builder='karpathy', manual_dir=''))  # unbuilt, nothing to build from
    cli.run_or_exit(lambda: sources.get_builder(cfg))
''')


def test_two_processes_build_an_unbuilt_dataset_once_and_share_a_failure(tmp_path):
  """The mechanism alone, without training: process 0 builds, process 1 waits and reads
  the same copy; where process 0 cannot build, both end with the same one line."""
  script = tmp_path / 'read.py'
  script.write_text(_BUILD_ONCE_READ_CHILD)
  cfg = _data_cfg(tmp_path, cache_mb=0)  # an empty data_dir: nothing is built yet
  out = _run_script_in_two_processes(
      script, [json.dumps(cfg.to_dict()), str(tmp_path / 'builds')], tmp_path,
      expect_ok=False)
  # The synthetic set: built once, by process 0, and read by both.
  assert len((tmp_path / 'builds_0').read_text().splitlines()) == 1
  assert not (tmp_path / 'builds_1').exists()
  counts = {l for _, log in out for l in log.splitlines() if l.startswith('train examples')}
  assert len(counts) == 1, out
  # Then a Karpathy set that is not built and has no manual_dir: one line on each.
  for process, (code, log) in enumerate(out):
    assert code == 1 and 'Traceback' not in log, log
    last = log.strip().splitlines()[-1]
    assert last.startswith('error: ' + ('' if process == 0 else
                                        'process 0 could not build karpathy_captions/coco/'
                                        f'1.1.0 in {cfg.data_dir}: ') +
                           "config.data.manual_dir='': karpathy_captions/coco/1.1.0 is not "
                           'built'), log


@pytest.mark.slow
def test_two_processes_build_an_unbuilt_dataset_once_and_both_train(tmp_path):
  data_dir = tmp_path / 'tfds'  # empty: nothing is built yet
  script = tmp_path / 'build_once.py'
  script.write_text(_BUILD_ONCE_CHILD)
  run, builds = tmp_path / 'run', tmp_path / 'builds'
  _run_script_in_two_processes(
      script, [_config_file(tmp_path, str(data_dir), 2), str(run), str(builds)], tmp_path)
  # Process 0 built it, once; process 1 never did, and both trained on it.
  assert len((tmp_path / 'builds_0').read_text().splitlines()) == 1
  assert not (tmp_path / 'builds_1').exists()
  assert sorted(_rows(str(run))) == [1, 2]
