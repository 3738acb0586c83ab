"""Evaluating a run's checkpoint: `eval_run.evaluate_checkpoint` and launch/eval.py.

One tiny run is trained once for the module; its metrics are checked against
`protocol.evaluate_retrieval` on independently restored parameters, number for number.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import sharding, step as step_lib, train
from cookie_jax.eval import protocol, run as eval_run
from cookie_jax.config import ConfigError, default_config
from cookie_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(data_dir):
  config = default_config('tiny')
  config.model.vision.image_size = 16
  # One layer per tower: compiling the train step is most of this file's time.
  config.model.vision.depth = config.model.text.depth = 1
  config.data.data_dir = data_dir
  config.data.max_len = 12
  config.data.synthetic.train_images = 64
  config.data.synthetic.eval_images = 20
  config.data.synthetic.image_size = 16
  config.train.batch_size = 16
  config.train.steps = 2
  config.train.progress_bar = False
  config.eval.batch_size = 16
  config.eval.test_at_end = False
  # Both steps are kept, so that --step has a choice.
  config.checkpoint.every = 1
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  base = tmp_path_factory.mktemp('eval_cli')
  config = _config(str(base / 'tfds'))
  workdir = str(base / 'run')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _reference_metrics(config, workdir, step):
  """evaluate_retrieval on the full train state, restored the way training resumes."""
  mesh = sharding.make_mesh(config.mesh)
  # Only shapes and shardings are needed to restore; eval_shape skips compiling the init.
  state, setup = jax.eval_shape(lambda: step_lib.create_train_state(config, mesh))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint)
  try:
    state, _, _ = ckpt.restore(step, ckpt_lib.abstract_with_shardings(
        state, setup.state_shardings))
  finally:
    ckpt.close()
  data = pipeline.eval_data(config.data, 'test', image_size=config.model.vision.image_size,
                            batch_size=config.eval.batch_size, mesh=mesh)
  return protocol.evaluate_retrieval(setup.graphdef, state.params, data, mesh=mesh)


def _check_png(path, min_size):
  with Image.open(path) as img:
    assert img.format == 'PNG'
    assert img.width >= min_size[0] and img.height >= min_size[1], img.size
    pixels = np.asarray(img.convert('RGB'))
  assert pixels.std() > 10, f'{path} looks blank'
  return pixels


def test_metrics_equal_evaluate_retrieval_and_pictures_are_written(run):
  config, workdir = run
  result = eval_run.evaluate_checkpoint(None, workdir, progress=False)
  paths = eval_run.output_paths(workdir, 'test', 2)
  assert result['step'] == 2 and result['files'] == paths
  assert paths['json'].endswith(os.path.join('eval', 'retrieval-test-full-2.json'))
  with open(paths['json'], encoding='utf-8') as f:
    saved = json.load(f)
  reference = _reference_metrics(config, workdir, 2)
  assert set(reference) <= set(saved) and 't2t_r1' in reference
  for key, value in reference.items():
    assert saved[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert result[key] == saved[key], key
  assert (saved['num_images'], saved['num_captions'], saved['layout']) == (20, 100, 'full')

  # The curve is R@K of the same ranks: it agrees with R@1/5/10 and never falls.
  curve = saved['recall_curve']
  assert curve['k'] == list(range(1, 51))
  for direction in ('i2t', 't2i'):
    values = np.asarray(curve[direction])
    assert np.all(np.diff(values) >= 0) and values[-1] <= 100.0
    for k in protocol.RECALL_KS:
      assert values[k - 1] == pytest.approx(saved[f'{direction}_r{k}']), (direction, k)
  assert curve['t2i'][19] == 100.0  # every caption's image is among the 20

  examples = _check_png(paths['examples'], (1200, 1000))
  _check_png(paths['recall'], (700, 450))
  # Ground truth is framed in green and wrong results in red (a 2-step model errs).
  green = np.all(np.abs(examples.astype(int) - (0x1a, 0x7f, 0x37)) < 8, axis=-1)
  red = np.all(np.abs(examples.astype(int) - (0xc6, 0x28, 0x28)) < 8, axis=-1)
  assert green.sum() > 500 and red.sum() > 500, (green.sum(), red.sum())


def test_step_selection_and_clear_errors(run):
  config, workdir = run
  result = eval_run.evaluate_checkpoint(None, workdir, step=1, progress=False,
                                            pictures=False)
  assert result['step'] == 1 and set(result['files']) == {'json'}
  with open(eval_run.output_paths(workdir, 'test', 1)['json'], encoding='utf-8') as f:
    assert json.load(f)['step'] == 1

  # Another layout of the same checkpoint and split is another file: nothing is overwritten.
  coco = eval_run.evaluate_checkpoint(None, workdir, step=1, layout='coco1k',
                                          progress=False, pictures=False)
  assert coco['files']['json'].endswith(os.path.join('eval', 'retrieval-test-coco1k-1.json'))
  with open(eval_run.output_paths(workdir, 'test', 1)['json'], encoding='utf-8') as f:
    full = json.load(f)
  assert full['layout'] == 'full' and full['rsum'] == result['rsum'] != coco['rsum']

  with pytest.raises(FileNotFoundError, match=r'--step=7: .* steps \[1, 2\] only'):
    eval_run.evaluate_checkpoint(None, workdir, step=7)
  with pytest.raises(ConfigError, match=r"--split='tset' .*one of \['train', 'val', 'test'\]"):
    eval_run.evaluate_checkpoint(None, workdir, split='tset')
  with pytest.raises(ConfigError, match=r"coco1k .* 'test\[:18\]' has 18 images"):
    eval_run.evaluate_checkpoint(None, workdir, layout='coco1k', split='test[:18]')
  # A --config overrides the saved one; a different model is named, not mis-restored.
  other = _config(config.data.data_dir)
  other.model.text.mlp_dim = 48
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"'text/.*intermediate.* in the checkpoint but \((\d+, )?48,?\)"):
    eval_run.evaluate_checkpoint(other, workdir, progress=False)


def _launch(*args, timeout=300):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # one CPU device: the run's mesh (data=-1) still fits
  return subprocess.run([sys.executable, str(ROOT / 'launch' / 'eval.py'), *args],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_launcher_end_to_end(run):
  _, workdir = run
  out = _launch(f'--workdir={workdir}', '--split=val', '--step=1')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'RSUM' in out.stdout and 'image->text' in out.stdout, out.stdout
  paths = eval_run.output_paths(workdir, 'val', 1)
  for path in paths.values():
    assert os.path.getsize(path) > 1000, path
  with open(paths['json'], encoding='utf-8') as f:
    assert json.load(f)['split'] == 'val'


def test_launcher_without_checkpoints_is_one_line(tmp_path):
  out = _launch(f'--workdir={tmp_path}')
  assert out.returncode == 1
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert lines[0].startswith('error: ') and 'no checkpoints' in lines[0], lines
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_examples_list_ties_in_the_order_the_rank_counts_them():
  """Identical captions score alike; the pictures' lists and ranks must agree on them."""
  mesh = sharding.make_mesh(default_config('tiny').mesh)
  e = np.eye(3, dtype=np.float32)
  images = e  # image i = e_i
  # Caption 0 (image 0's only one) equals the six captions of image 1; caption 7 is image 2's.
  texts = np.stack([e[0]] * 7 + [e[2]])
  index = np.asarray([0, 1, 1, 1, 1, 1, 1, 2], np.int32)
  ex = eval_run.example_results(images, texts, index, mesh=mesh, top_k=5,
                                    num_image_queries=3, num_text_queries=8)
  i2t = ex['i2t']
  assert i2t['queries'].tolist() == [0, 1, 2]
  # Image 0: its caption ties with six negatives, so it is counted 7th and not listed.
  assert i2t['ranks'].tolist() == [7, 3, 1]
  assert i2t['indices'][0].tolist() == [1, 2, 3, 4, 5]
  # Image 1 scores 0 with every caption: the two negatives first, then its own.
  assert i2t['indices'][1].tolist() == [0, 7, 1, 2, 3]
  assert i2t['indices'][2][0] == 7 and np.all(i2t['scores'][:, :-1] >= i2t['scores'][:, 1:])
  for direction, labels_of_gallery, query_labels in (
      ('i2t', index, np.arange(3)), ('t2i', np.arange(3), index)):
    d = ex[direction]
    for q, top, rank in zip(d['queries'], d['indices'], d['ranks']):
      truth = np.flatnonzero(labels_of_gallery[top] == query_labels[q])
      listed = int(truth[0]) + 1 if truth.size else None
      assert listed == (rank if rank <= top.size else None), (direction, q, top, rank)


def test_dataset_with_another_vocabulary_is_refused(run, tmp_path, caplog):
  """A run evaluated on a dataset whose tokenizer is not the run's: one clear error."""
  import shutil  # pylint: disable=g-import-not-at-top
  from cookie_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  _, workdir = run
  saved = json.loads((pathlib.Path(workdir) / 'tokenizer.json').read_text())
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  vocab = saved['model']['vocab']
  first, second = sorted(vocab, key=vocab.get)[20:22]
  vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids trade places
  (copy / 'tokenizer.json').write_text(json.dumps(saved))
  with pytest.raises(tok_lib.TokenizerMismatchError,
                     match=rf"first difference at id 20: '{second}' in the run, '{first}'"):
    eval_run.evaluate_checkpoint(None, str(copy), progress=False, pictures=False)
  out = _launch(f'--workdir={copy}', '--nopictures', '--noprogress')
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith(
      'error: The tokenizer for evaluation is not the one'), out.stderr[-2000:]
  # A run from before tokenizer.json is evaluated as before, with a note.
  (copy / 'tokenizer.json').unlink()
  with caplog.at_level('WARNING'):
    result = eval_run.evaluate_checkpoint(None, str(copy), progress=False,
                                              pictures=False)
  assert result['step'] == 2 and any('predates' in r.getMessage() for r in caplog.records)
