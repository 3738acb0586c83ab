"""An export checked by the real tools that users run on it, against our JAX figures:
transformers' zero-shot image classification pipeline and `AutoProcessor`, and the
model card. One run (eval_run's: random weights, no
training) is exported once for all of them."""

import json
import sys
import types

from flax import nnx
import numpy as np
from PIL import Image
import pytest
import torch
import transformers

from cookie_jax.data.builders import zeroshot_shapes
from cookie_jax.eval import encoder as encoder_lib
from cookie_jax.eval import zeroshot_run
from cookie_jax.interop import hf_export, model_card

import eval_run

TOL = 1e-4
TEMPLATE = 'a small {} in the middle'
CLASSES = ['red circle', 'green square', 'blue triangle', 'yellow diamond', 'purple cross']
# The figures training writes for the test split (WORKDIR/test_retrieval.json).
TEST_FIGURES = {'i2t_r1': 8.4, 'i2t_r5': 24.5, 'i2t_r10': 38.8, 't2i_r1': 6.8, 't2i_r5': 28.0,
                't2i_r10': 50.2, 'rsum': 156.7, 'i2t_medr': 16.0, 't2i_medr': 10.0,
                'step': eval_run.STEP}


@pytest.fixture(scope='module', autouse=True)
def _torch_threads():
  torch.set_num_threads(2)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  # A sharp temperature (training allows up to 100), so that class probabilities differ.
  run = eval_run.make_run(tmp_path_factory.mktemp('tools'), logit_scale=50.0)
  (run.workdir / 'test_retrieval.json').write_text(json.dumps(TEST_FIGURES))
  out = run.root / 'export'
  hf_export.export_run(str(run.workdir), str(out))
  return types.SimpleNamespace(run=run, out=out)


def _block_jax(monkeypatch):
  """Any import of JAX, Flax or cookie_jax fails from here on (in this test)."""
  for name in [n for n in sys.modules if n.split('.')[0] in ('jax', 'jaxlib', 'flax',
                                                             'cookie_jax')]:
    monkeypatch.delitem(sys.modules, name)
  for name in ('jax', 'jaxlib', 'flax', 'cookie_jax'):
    monkeypatch.setitem(sys.modules, name, None)


def _image_folder(root):
  """Two images of each of CLASSES from the synthetic zero-shot set (not a training
  image), as an ImageFolder: root/<class>/<i>.png."""
  for i in range(60):
    ex = zeroshot_shapes.example(1, i, 32)
    if ex['label'] in CLASSES:
      folder = root / ex['label'].replace(' ', '_')
      folder.mkdir(parents=True, exist_ok=True)
      (folder / f'{i}.png').write_bytes(ex['image'])


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def test_zero_shot_pipeline_and_processor_give_the_jax_classifiers_ranking_and_probabilities(
    exported, tmp_path, monkeypatch):
  _image_folder(tmp_path)
  # Ours: the JAX zero-shot classifier (`launch/eval.py --task=zeroshot`) on these files.
  encoder = encoder_lib.from_run(str(exported.run.workdir))
  data = zeroshot_run.image_set(encoder.config, image_folder=str(tmp_path),
                                batch_size=encoder.batch_size)[0]
  names, _ = zeroshot_run.class_names_of(data)
  assert sorted(names) == sorted(CLASSES) and len(data.keys) == 10
  ours = zeroshot_run.evaluate_classifier(encoder, data, names, [TEMPLATE], progress=False)
  scale = float(nnx.jit(lambda m: m.logit_scale())(eval_run.model_of(exported.run)))
  # All 5 classes are in the top 5: probabilities over every class, best first.
  probs = _softmax(scale * ours['scores'].astype(np.float64))
  paths = [tmp_path / key for key in data.keys]

  _block_jax(monkeypatch)  # the folder's own code, with no JAX and no cookie_jax
  classifier = transformers.pipeline('zero-shot-image-classification', model=exported.out,
                                     trust_remote_code=True)
  assert type(classifier.model).__name__ == 'CookieModel'
  diffs = []
  for row, path in enumerate(paths):
    got = classifier(Image.open(path), candidate_labels=names, hypothesis_template=TEMPLATE)
    assert [g['label'] for g in got] == [names[c] for c in ours['top'][row]], path
    diffs.append(np.abs(np.array([g['score'] for g in got]) - probs[row]).max())
  print(f'zero-shot pipeline vs JAX, max abs diff of probabilities: {max(diffs):.2e} '
        f'(top-1 margins {np.min(probs[:, 0] - probs[:, 1]):.2e} or more)')
  assert max(diffs) <= TOL

  # AutoProcessor: text= and images= in one call, as CLIPProcessor.
  processor = transformers.AutoProcessor.from_pretrained(exported.out, trust_remote_code=True)
  assert type(processor).__name__ == 'CookieProcessor'
  inputs = processor(text=[TEMPLATE.format(n) for n in names],
                     images=[Image.open(p) for p in paths], return_tensors='pt', padding=True)
  assert {'input_ids', 'attention_mask', 'pixel_values'} <= set(inputs)
  with torch.no_grad():
    logits = classifier.model(**inputs).logits_per_image.numpy()
  ranked = np.take_along_axis(_softmax(logits), ours['top'], axis=1)
  assert np.abs(ranked - probs).max() <= TOL


def test_model_card_describes_the_model_its_recipe_data_and_the_runs_figures(exported):
  text = (exported.out / 'README.md').read_text(encoding='utf-8')
  head = text.split('---\n')[1]
  assert 'license: unknown' in head and 'Yours to set' in head
  assert 'pipeline_tag: zero-shot-image-classification' in head
  assert 'library_name: transformers' in head
  cfg = exported.run.config
  assert f'# COOKIE tiny (cookie_jax), step {eval_run.STEP}' in text
  assert f'{cfg.model.vision.image_size} px images in {cfg.model.vision.patch_size} px' in text
  assert f'{cfg.train.steps} steps of global batch {cfg.train.batch_size}' in text
  assert 'the synthetic shapes dataset' in text
  assert ('image→text R@1/5/10 8.4 / 24.5 / 38.8; text→image 6.8 / 28.0 / 50.2; '
          'RSUM 156.7 | `test_retrieval.json`') in text
  # Without figures of the exported step, the card says how to get them.
  other = model_card.card(cfg.model, step=7, config=cfg,
                          figures=model_card.run_figures(str(exported.run.workdir), 7))
  assert 'No evaluation figures of this step' in other and 'RSUM' not in other

