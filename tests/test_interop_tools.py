"""An export checked by the real tools that users run on it, against our JAX figures:
transformers' zero-shot image classification pipeline and `AutoProcessor`, the loader
for LAION's CLIP_benchmark (its own metrics: slow, needs `pip install --no-deps
clip-benchmark==1.6.2`), and the model card. One run (eval_run's: random weights, no
training) is exported once for all of them."""

import importlib.util
import io
import json
import sys
import types

from flax import nnx
import numpy as np
from PIL import Image
import pytest
import torch
import transformers

from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.builders import zeroshot_shapes
from cookie_jax.eval import encoder as encoder_lib
from cookie_jax.eval import zeroshot, zeroshot_run
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
  # Ours: the run's weights in JAX, with the run's tokenizer and eval view, as
  # `launch/eval.py --task=zeroshot` encodes (one compile per shape for all the tests).
  encoder = encoder_lib.from_run(str(run.workdir))
  return types.SimpleNamespace(run=run, out=out, encoder=encoder)


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
  encoder = exported.encoder
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


def _load_clip_benchmark_module(out):
  """OUT/clip_benchmark_cookie.py as a user runs it (OUT on sys.path), its imports of the
  folder's torch_model.py and image_processing_cookie.py not left in sys.modules."""
  siblings = [n for n in ('torch_model', 'image_processing_cookie') if n not in sys.modules]
  sys.path.insert(0, str(out))
  try:
    spec = importlib.util.spec_from_file_location('clip_benchmark_cookie',
                                                  out / 'clip_benchmark_cookie.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(out))
    for name in siblings:
      sys.modules.pop(name, None)
  assert module.torch_model.__file__ == str(out / 'torch_model.py')  # the folder's copy
  return module


def test_open_clip_interface_of_the_export_needs_no_jax_and_equals_jax(exported, monkeypatch):
  run, encoder = exported.run, exported.encoder
  texts = [TEMPLATE.format(n) for n in CLASSES] + ['a red circle above a small blue square '
                                                   'in the top left of the picture and more']
  enc = tok_lib.encode(encoder.tokenizer, texts)
  assert enc['attention_mask'][-1].all()  # the last text is cut at max_len
  pngs = [zeroshot_shapes.example(1, i, 32)['image'] for i in range(4)]
  batch = np.zeros((encoder.batch_size, 16, 16, 3), np.float32)
  batch[:4] = [_eval_view(png, run) for png in pngs]
  jax_text = encoder.encode_texts(texts)
  jax_image = encoder.encode_images([{'image': batch, 'mask': np.arange(len(batch)) < 4}])

  _block_jax(monkeypatch)
  module = _load_clip_benchmark_module(exported.out)
  cb_model, transform, tokenizer = module.load(exported.out)
  tokens = tokenizer(texts)
  assert tokens.dtype == torch.long and tokens.shape == (6, run.config.data.max_len)
  np.testing.assert_array_equal(tokens.numpy(), enc['input_ids'])
  pixels = torch.stack([transform(Image.open(io.BytesIO(png))) for png in pngs])
  assert pixels.shape == (4, 3, 16, 16) and pixels.dtype == torch.float32
  with torch.no_grad():
    text, image = cb_model.encode_text(tokens).numpy(), cb_model.encode_image(pixels).numpy()
  diffs = np.abs(text - jax_text).max(), np.abs(image - jax_image).max()
  print(f'open_clip interface vs JAX, max abs diff: text {diffs[0]:.2e}, image {diffs[1]:.2e}')
  assert max(diffs) <= TOL


def _eval_view(png, run):
  from cookie_jax.data import augment  # pylint: disable=g-import-not-at-top
  from cookie_jax.data.tf_env import tf  # pylint: disable=g-import-not-at-top
  size = run.config.model.vision.image_size
  return augment.normalize(augment.eval_view(tf.constant(png), size=size),
                           run.config.data.mean, run.config.data.std).numpy()


class _Images(torch.utils.data.Dataset):
  """(transform(image), target) rows, as CLIP_benchmark's dataloaders give them."""

  def __init__(self, images, targets, transform, classes=None):
    self.images, self.targets, self.transform, self.classes = images, targets, transform, classes

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return self.transform(Image.fromarray(self.images[i])), self.targets[i]


def _captions_collate(batch):  # clip_benchmark.datasets.builder.image_captions_collate_fn
  images, texts = zip(*batch)
  return torch.stack(images), list(texts)


def _rows(config, builder_name, split):
  from cookie_jax.data import defaults, sources  # pylint: disable=g-import-not-at-top
  data_cfg = defaults.eval_data_config(config.data, config.eval.data)
  data_cfg.builder = builder_name
  builder = sources.get_builder(data_cfg)
  return builder, list(sources.read_examples(
      builder, sources.resolve_split(data_cfg, split)).as_numpy_iterator())


@pytest.mark.slow
def test_clip_benchmark_evaluates_the_export_as_our_jax_evaluation_does(exported, monkeypatch):
  """Needs CLIP_benchmark's metrics: `pip install --no-deps clip-benchmark==1.6.2` (its
  own dependencies would replace torch with a CUDA build; the metrics need only torch,
  tqdm and scikit-learn)."""
  classification = pytest.importorskip('clip_benchmark.metrics.zeroshot_classification')
  from clip_benchmark.metrics import zeroshot_retrieval  # pylint: disable=g-import-not-at-top
  from cookie_jax.eval import run as eval_lib  # pylint: disable=g-import-not-at-top
  run = exported.run
  # Ours, in JAX: what `launch/eval.py --task=zeroshot` computes (on the synthetic
  # zero-shot set, 'synthetic' templates), and `launch/eval.py` (test retrieval).
  encoder = exported.encoder
  data, default_templates = zeroshot_run.image_set(encoder.config,
                                                   batch_size=encoder.batch_size)
  names, _ = zeroshot_run.class_names_of(data)
  templates = zeroshot.load_templates(default_templates)
  ours = zeroshot_run.evaluate_classifier(encoder, data, names, templates, progress=False)
  jax_zs = ours['metrics']
  jax_ret = eval_lib.evaluate_checkpoint(None, str(run.workdir), split='test',
                                         progress=False, pictures=False)
  module = _load_clip_benchmark_module(exported.out)
  # CLIP_benchmark's own loader call, model type 'cookie' (its open_clip loader, which
  # needs open_clip and is not used here, is imported beside it: a stand-in module).
  monkeypatch.setitem(sys.modules, 'open_clip', types.ModuleType('open_clip'))
  module.register()
  from clip_benchmark import models  # pylint: disable=g-import-not-at-top
  model, transform, tokenizer = models.load_clip('cookie', 'cookie', str(exported.out), None,
                                                 'cpu')
  assert isinstance(model, module.CookieOpenCLIP)
  # With NumPy >= 2.4 CLIP_benchmark 1.6.2's accuracy() fails on any model (its issue
  # #147); the command line of the export's module replaces it by the same arithmetic.
  broken = classification.accuracy
  with pytest.raises(TypeError, match='0-dimensional'):
    broken(torch.tensor([[0.1, 0.9]]), torch.tensor([1]))
  monkeypatch.setattr(classification, 'accuracy', broken)  # restored after the test
  module.fix_clip_benchmark_accuracy()
  logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
  target = torch.arange(50) % 7
  top = np.argsort(-logits.numpy(), axis=1)
  assert classification.accuracy(logits, target, (1, 5)) == pytest.approx(
      [np.mean(np.any(top[:, :k] == target.numpy()[:, None], axis=1)) for k in (1, 5)])

  builder, rows = _rows(run.config, 'synthetic_zeroshot', 'test')
  assert builder.info.features['label'].names == names
  loader = torch.utils.data.DataLoader(
      _Images([r['image'] for r in rows], [int(r['label']) for r in rows], transform, names),
      batch_size=64)
  templates = [t.replace('{}', '{c}') for t in templates]  # CLIP_benchmark's {c}
  # Every logit first (random weights put most images in a few classes, so the metrics
  # alone would say little): its class vectors and logits are 100 x our cosines.
  classifier = classification.zero_shot_classifier(model, tokenizer, names, templates, 'cpu',
                                                   amp=False)
  logits, target = classification.run_classification(model, classifier, loader, 'cpu',
                                                      amp=False)
  np.testing.assert_array_equal(target.numpy(), ours['labels'])
  diff = np.abs(np.take_along_axis(logits.numpy(), ours['top'], 1) - 100 * ours['scores'])
  print(f'CLIP_benchmark logits vs 100 x JAX scores (top 5 of each image), max abs diff: '
        f'{diff.max():.2e}')
  assert diff.max() <= 100 * TOL
  got = classification.evaluate(model, loader, tokenizer, names, templates, 'cpu', amp=False)
  print(f"CLIP_benchmark zero-shot on synthetic_zeroshot ({len(rows)} images): top-1 "
        f"{100 * got['acc1']:.2f} (JAX {jax_zs['top1']:.2f}), top-5 {100 * got['acc5']:.2f} "
        f"(JAX {jax_zs['top5']:.2f}), mean per-class recall "
        f"{100 * got['mean_per_class_recall']:.2f} (JAX {jax_zs['mean_per_class_recall']:.2f})")
  assert abs(100 * got['acc1'] - jax_zs['top1']) <= 0.1
  assert abs(100 * got['acc5'] - jax_zs['top5']) <= 0.1
  assert abs(100 * got['mean_per_class_recall'] - jax_zs['mean_per_class_recall']) <= 0.1

  _, rows = _rows(run.config, run.config.data.builder, 'test')
  captions = [[c.decode() for c in r['captions']] for r in rows]
  loader = torch.utils.data.DataLoader(
      _Images([r['image'] for r in rows], captions, transform), batch_size=8,
      collate_fn=_captions_collate)
  got = zeroshot_retrieval.evaluate(model, loader, tokenizer, 'cpu', amp=False,
                                    recall_k_list=[1, 5, 10])
  # Where a caption's text is also another image's, its equal scores rank in an order of
  # the tools' choosing (ours counts them against the query); those queries are the only
  # ones allowed to differ.
  owners = {}
  for i, caps in enumerate(captions):
    for c in caps:
      owners.setdefault(c, set()).add(i)
  tied_images = sum(any(len(owners[c]) > 1 for c in caps) for caps in captions)
  tied_captions = sum(len(owners[c]) > 1 for caps in captions for c in caps)
  num_captions = sum(map(len, captions))
  for k in (1, 5, 10):
    i2t, t2i = 100 * got[f'text_retrieval_recall@{k}'], 100 * got[f'image_retrieval_recall@{k}']
    print(f'R@{k}: image->text {i2t:.2f} (JAX {jax_ret[f"i2t_r{k}"]:.2f}), text->image '
          f'{t2i:.2f} (JAX {jax_ret[f"t2i_r{k}"]:.2f})')
    eps = 1e-4  # CLIP_benchmark averages in float32
    assert jax_ret[f'i2t_r{k}'] - eps <= i2t <= (jax_ret[f'i2t_r{k}'] + eps
                                                 + 100 * tied_images / len(rows))
    assert jax_ret[f't2i_r{k}'] == pytest.approx(t2i, abs=100 * tied_captions / num_captions
                                                 + eps)
  print(f'{tied_images} of {len(rows)} images have a caption another image has too; '
        f'{tied_captions} of {num_captions} captions')
