"""Zero-shot classification (cookie_jax/eval/zeroshot.py, zeroshot_run.py): a hand-made case
with known answers, the shipped class names and templates, the synthetic zero-shot set,
the ImageFolder and tfds loaders, and a run's checkpoint against an independent
computation (its own decode, resize and model calls), number for number."""

import io
import json
import os
import pathlib
import subprocess
import sys

from flax import nnx
import numpy as np
from PIL import Image
import pytest

from cookie_jax import sharding
from cookie_jax.config import ConfigError
from cookie_jax.data import augment, classification, sources
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.builders import scenes, synthetic, zeroshot_shapes
from cookie_jax.data.tf_env import tf
from cookie_jax.eval import zeroshot, zeroshot_run
from cookie_jax.interop.image_processing_cookie import resize_bilinear, shorter_side_size

import eval_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _unit(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# A hand-made case: 3 classes x 2 templates in 3-d --------------------------------------
# Class c's two prompts are e_c and a vector tilted towards another axis; the ensemble is
# their normalised mean. Image 0 is nearest class 0's *first* prompt but class 2's
# ensemble (its true class), so a classifier without the ensemble would get it wrong.
PROMPTS = _unit([[1, 0, 0], [0.6, 0.8, 0],      # class 0
                 [0, 1, 0], [0, 0.8, 0.6],      # class 1
                 [0, 0, 1], [0.6, 0, 0.8]])     # class 2


def test_ensemble_is_the_normalised_mean_of_each_class_prompts():
  classes = zeroshot.ensemble(PROMPTS, 3)
  expected = _unit([[1.6, 0.8, 0], [0, 1.8, 0.6], [0.6, 0, 1.8]])
  np.testing.assert_allclose(classes, expected, atol=1e-6)
  assert zeroshot.prompts(['cat', 'red dog'], ['a {}.', '{}']) == [
      'a cat.', 'cat', 'a red dog.', 'red dog']
  with pytest.raises(ValueError, match='do not split into 4 classes'):
    zeroshot.ensemble(PROMPTS, 4)


def test_classify_top_k_and_metrics_on_known_answers():
  classes = zeroshot.ensemble(PROMPTS, 3)
  images = _unit([[1.0, 0.0, 0.9],    # class 2 by the ensemble (prompt 0 alone: class 0)
                  [1.0, 0.1, 0.0],    # class 0
                  [0.1, 0.2, 1.0],    # class 2
                  [0.0, 1.0, 0.1],    # class 1
                  [0.5, 0.0, 1.0]])   # class 2, but labelled 1
  labels = np.array([2, 0, 2, 1, 1])
  scores, top = zeroshot.classify(images, classes, k=5)
  expected = np.argsort(-(images @ classes.T), axis=1, kind='stable')
  np.testing.assert_array_equal(top, expected)  # k = min(5, C) = 3 columns, best first
  np.testing.assert_allclose(scores, np.take_along_axis(images @ classes.T, top, 1),
                             atol=1e-6)
  np.testing.assert_array_equal(top[:, 0], [2, 0, 2, 1, 2])
  assert np.argmax(images[0] @ PROMPTS[::2].T) == 0  # the single-template answer differs
  m = zeroshot.accuracy(top, labels, 3)
  assert m['top1'] == pytest.approx(80.0)  # all but image 4
  assert m['top5'] == 100.0
  # Per class: class 0 1/1, class 1 1/2, class 2 2/2 -> mean 83.3, not the top-1 of 80.
  np.testing.assert_allclose(m['class_recall'], [100.0, 50.0, 100.0])
  assert m['mean_per_class_recall'] == pytest.approx(250.0 / 3)
  np.testing.assert_array_equal(m['confusion'], [[1, 0, 0], [0, 1, 1], [0, 0, 2]])
  assert (m['chance_top1'], m['chance_top5']) == (pytest.approx(100 / 3), 100.0)
  confused = zeroshot.most_confused(m['confusion'], ['a', 'b', 'c'])
  assert [(c['true_name'], c['predicted_name'], c['count'], c['share'])
          for c in confused] == [('b', 'c', 1, 50.0)]
  # Top-k over more classes than k: top-5 of 7 counts a label at rank 5, not at rank 6.
  seven = _unit(np.eye(7) + 0.01)
  query = _unit([[7, 6, 5, 4, 3, 2, 1]])
  _, top7 = zeroshot.classify(query, seven)
  assert top7.tolist() == [[0, 1, 2, 3, 4]]
  assert zeroshot.accuracy(top7, [4], 7)['top5'] == 100.0
  assert zeroshot.accuracy(top7, [5], 7)['top5'] == 0.0


def test_top_k_over_many_classes_sharded_equals_numpy_and_ties_go_to_the_lower_class():
  rng = np.random.default_rng(0)
  classes = _unit(rng.normal(size=(37, 8)))
  images = _unit(rng.normal(size=(50, 8)))
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  scores, top = zeroshot.classify(images, classes, mesh=mesh)
  np.testing.assert_array_equal(top, np.argsort(-(images @ classes.T), axis=1)[:, :5])
  labels = rng.integers(0, 37, size=50)
  m = zeroshot.accuracy(top, labels, 37)
  assert m['top5'] == pytest.approx(100 * np.mean(np.any(top == labels[:, None], 1)))
  # Two identical class vectors: the lower class index wins top-1.
  tied = np.concatenate([classes[:1], classes[:1], classes[1:]])
  _, top = zeroshot.classify(classes[:1], tied, mesh=mesh)
  assert top[0, :2].tolist() == [0, 1]


def test_shipped_names_and_templates(tmp_path):
  names = zeroshot.load_class_names('imagenet')
  assert len(names) == 1000 and names[:3] == ['tench', 'goldfish', 'great white shark']
  assert names[-1] == 'toilet paper'
  clip = zeroshot.load_templates('clip')
  assert len(clip) == 80 and clip[0] == 'a bad photo of a {}.'
  assert clip[-1] == 'a tattoo of the {}.'
  assert zeroshot.load_templates('single') == ['{}']
  synthetic_templates = zeroshot.load_templates('synthetic')
  assert len(synthetic_templates) == 36 and 'one {} in the top left' in synthetic_templates
  (tmp_path / 't.txt').write_text('a {} here\n\nno slot\n')
  with pytest.raises(ValueError, match="exactly one {} .*'no slot'"):
    zeroshot.load_templates(str(tmp_path / 't.txt'))
  with pytest.raises(FileNotFoundError, match="--class_names='nope'.*shipped"):
    zeroshot.load_class_names('nope')
  wnids = [f'n{i:08d}' for i in range(1000)]
  assert classification.looks_like_imagenet(wnids)
  assert not classification.looks_like_imagenet(wnids[:999])
  assert classification.readable_name('golden_retriever') == 'golden retriever'


# The synthetic zero-shot set -------------------------------------------------------------


def test_synthetic_zeroshot_set_is_balanced_labelled_and_new(tmp_path):
  cfg = zeroshot_shapes.zeroshot_config(num_images=60, image_size=32, seed=0)
  builder = zeroshot_shapes.SyntheticZeroshot(data_dir=str(tmp_path), config=cfg)
  builder.download_and_prepare()
  rows = list(sources.read_examples(builder, 'test').as_numpy_iterator())
  names = builder.info.features['label'].names
  assert len(names) == 30 and names[0] == 'red circle' and names[-1] == 'orange cross'
  labels = np.array([r['label'] for r in rows])
  np.testing.assert_array_equal(np.sort(np.bincount(labels)), [2] * 30)
  for r in rows:  # the three labels agree with each other
    assert names[r['label']] == (f"{zeroshot_shapes.COLOURS[r['colour']]} "
                                 f"{zeroshot_shapes.SHAPES[r['shape']]}")
  # The same function of (seed, index) every time; no training image comes out.
  again = zeroshot_shapes.example(0, 7, 32)['image']
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(again))),
      [r['image'] for r in sources.read_examples(builder, 'test')
       .as_numpy_iterator()][7])
  train = {png for _, png, *_ in synthetic.generate(
      synthetic.synthetic_config(train_images=400, image_size=32), 'train', 400)}
  assert not train & {zeroshot_shapes.example(0, i, 32)['image'] for i in range(60)}


# Loaders ---------------------------------------------------------------------------------


def _png(pixels) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format='PNG')
  return buf.getvalue()


def _eval_view(encoded, size, mean, std):
  return augment.normalize(augment.eval_view(tf.constant(encoded), size=size), mean,
                           std).numpy()


def test_image_folder_loader_lists_classes_decodes_and_skips_bad_files(tmp_path):
  rng = np.random.default_rng(0)
  pics = {}
  for cls, files in (('cat', ['a.png', 'deep/b.PNG', 'c.jpg']), ('dog', ['d.webp', 'e.png']),
                     ('empty', [])):
    (tmp_path / cls / 'deep').mkdir(parents=True)
    for name in files:
      pixels = rng.integers(0, 256, size=(20 + len(name), 24, 3), dtype=np.uint8)
      fmt = {'png': 'PNG', 'jpg': 'JPEG', 'webp': 'WEBP'}[name.rsplit('.', 1)[1].lower()]
      Image.fromarray(pixels).save(tmp_path / cls / name, format=fmt, lossless=True)
      pics[f'{cls}/{name}'] = pixels
  (tmp_path / 'dog' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  (tmp_path / 'dog' / '.hidden.png').write_bytes(_png(pics['cat/a.png']))
  (tmp_path / 'dog' / 'notes.txt').write_text('not an image')
  (tmp_path / 'loose.png').write_bytes(_png(pics['cat/a.png']))  # not in a class folder
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  data = classification.ImageFolder(tmp_path, image_size=16, mean=mean, std=std,
                                    batch_size=4)
  assert data.class_names == ['cat', 'dog', 'empty']
  assert data.keys == ['cat/a.png', 'cat/c.jpg', 'cat/deep/b.PNG', 'dog/broken.png',
                       'dog/d.webp', 'dog/e.png']
  np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1])
  batches = list(data.image_batches())
  assert [b['image'].shape for b in batches] == [(4, 16, 16, 3)] * 2
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 1, 0, 1, 1, 0, 0])  # broken, then padding
  assert [p for p, _ in data.skipped] == ['dog/broken.png']
  assert data.kept.tolist() == [1, 1, 1, 0, 1, 1]
  images = np.concatenate([b['image'] for b in batches])
  for row, key in enumerate(data.keys):
    if key in pics:  # the tfds path's decode + view of the same file (WebP: lossless)
      encoded = _png(pics[key]) if key.endswith('.webp') else (tmp_path / key).read_bytes()
      ref = _eval_view(encoded, 16, mean, std)
      levels = np.abs(images[row] - ref) * np.asarray(std) * 255.0  # in grey levels
      # PIL decodes JPEG with libjpeg's accurate integer DCT, TensorFlow with its fast
      # one: a few levels apart on this noise. PNG and WebP are exact.
      assert levels.max() <= (4.0 if key.endswith('.jpg') else 1e-3), (key, levels.max())
  assert set(data.images_at([0, 4])) == {0, 4}
  with pytest.raises(FileNotFoundError, match='no class folders with images'):
    classification.ImageFolder(tmp_path / 'empty', image_size=16, mean=mean, std=std,
                               batch_size=4)


def test_eval_resize_crop_matches_an_independent_numpy_view():
  rng = np.random.default_rng(1)
  for shape in [(32, 32), (20, 37), (51, 16), (9, 12)]:
    pixels = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
    ours = augment.eval_resize_crop(tf.constant(pixels), size=16).numpy()
    h, w = shorter_side_size(*shape, 16)
    ref = resize_bilinear(pixels.transpose(2, 0, 1), h, w).transpose(1, 2, 0)
    top, left = (h - 16) // 2, (w - 16) // 2
    np.testing.assert_allclose(ours, ref[top:top + 16, left:left + 16], atol=1e-4)


# A run's checkpoint ----------------------------------------------------------------------


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  return eval_run.make_run(tmp_path_factory.mktemp('zeroshot'))


def _independent(run, prompts_per_class, images, num_classes):
  """Class vectors and predictions by direct model calls on our own preprocessing."""
  model = eval_run.model_of(run)
  tok = tok_lib.finalize(tok_lib.tokenizer_from_path(run.config.data.tokenizer),
                         run.config.data.max_len)
  enc = tok_lib.encode(tok, prompts_per_class)
  text = np.asarray(nnx.jit(lambda m, i, k: m.encode_text(i, k))(
      model, enc['input_ids'], enc['attention_mask']), np.float64)
  classes = text.reshape(num_classes, -1, text.shape[1]).mean(1)
  classes /= np.linalg.norm(classes, axis=1, keepdims=True)
  image = np.asarray(nnx.jit(lambda m, x: m.encode_image(x))(model, images), np.float64)
  return np.argsort(-(image @ classes.T), axis=1, kind='stable')


def _numpy_view(png, size, mean, std):
  pixels = np.asarray(Image.open(io.BytesIO(png)).convert('RGB'))
  h, w = shorter_side_size(*pixels.shape[:2], size)
  x = resize_bilinear(pixels.transpose(2, 0, 1), h, w).transpose(1, 2, 0)
  top, left = (h - size) // 2, (w - size) // 2
  x = x[top:top + size, left:left + size] / 255.0
  return ((x - np.asarray(mean)) / np.asarray(std)).astype(np.float32)


def test_checkpoint_on_the_synthetic_set_equals_an_independent_computation(run):
  result = zeroshot_run.zeroshot_checkpoint(None, str(run.workdir), progress=False)
  paths = zeroshot_run.output_paths(run.workdir, 'synthetic_zeroshot', 'test', eval_run.STEP)
  assert result['files'] == paths and os.path.getsize(paths['confusions']) > 10_000
  with open(paths['json'], encoding='utf-8') as f:
    saved = json.load(f)
  assert (saved['num_images'], saved['num_classes'], saved['num_templates']) == (600, 30, 36)
  assert saved['templates'] == 'synthetic' and saved['chance_top1'] == pytest.approx(100 / 30)

  cfg = run.config
  data_cfg = cfg.data.copy_and_resolve_references()
  data_cfg.builder = 'synthetic_zeroshot'
  builder = sources.get_builder(data_cfg)
  rows = list(sources.read_examples(builder, 'test').as_numpy_iterator())
  names = builder.info.features['label'].names
  pngs = [zeroshot_shapes.example(cfg.data.synthetic.seed, i, 32)['image']
          for i in range(600)]
  images = np.stack([_numpy_view(p, 16, cfg.data.mean, cfg.data.std) for p in pngs])
  labels = np.array([r['label'] for r in rows])
  prompts = zeroshot.prompts(names, zeroshot.load_templates('synthetic'))
  top = _independent(run, prompts, images, 30)
  assert saved['top1'] == pytest.approx(100 * np.mean(top[:, 0] == labels), abs=1e-9)
  assert saved['top5'] == pytest.approx(
      100 * np.mean(np.any(top[:, :5] == labels[:, None], 1)), abs=1e-9)
  recall = [np.mean(top[labels == c, 0] == c) * 100 for c in range(30)]
  assert saved['mean_per_class_recall'] == pytest.approx(np.mean(recall), abs=1e-9)
  assert [p['recall'] for p in saved['per_class']] == pytest.approx(recall)
  assert saved['most_confused'][0]['count'] == max(
      np.sum((labels == t) & (top[:, 0] == p)) for t in range(30) for p in range(30) if t != p)

  # The same set named as any tfds dataset is (`--dataset`; 'clip' templates by default).
  named = zeroshot_run.zeroshot_checkpoint(
      None, str(run.workdir), dataset=f'synthetic_zeroshot/{builder.builder_config.name}',
      templates='synthetic', progress=False, pictures=False)
  assert (named['top1'], named['top5'], named['class_names_from']) == (
      saved['top1'], saved['top5'], 'dataset')

  # Another label feature, and single-template prompts.
  shape = zeroshot_run.zeroshot_checkpoint(None, str(run.workdir), label_key='shape',
                                           templates='single', progress=False,
                                           pictures=False)
  assert shape['num_classes'] == 5 and shape['files']['json'].endswith(
      f'zeroshot-synthetic_zeroshot.shape-test-{eval_run.STEP}.json')
  top = _independent(run, list(scenes.SHAPES), images, 5)
  shapes = np.array([r['shape'] for r in rows])
  assert shape['top1'] == pytest.approx(100 * np.mean(top[:, 0] == shapes), abs=1e-9)
  with pytest.raises(ConfigError, match="--label_key='size'.*\\['label', 'shape', 'colour'\\]"):
    zeroshot_run.zeroshot_checkpoint(None, str(run.workdir), label_key='size')


def test_checkpoint_on_an_image_folder_with_a_bad_file(run, tmp_path):
  for i in range(12):
    ex = zeroshot_shapes.example(1, i, 32)
    folder = tmp_path / ex['label'].replace(' ', '_')
    folder.mkdir(exist_ok=True)
    (folder / f'{i}.png').write_bytes(ex['image'])
  (tmp_path / 'red_circle' / 'bad.png').write_bytes(b'garbage')
  result = zeroshot_run.zeroshot_checkpoint(None, str(run.workdir), image_folder=str(tmp_path),
                                            templates='single', progress=False)
  assert (result['num_images'], result['num_classes'], result['num_skipped']) == (12, 12, 1)
  assert result['skipped'][0]['path'] == 'red_circle/bad.png'
  assert result['dataset'] == tmp_path.name and os.path.isfile(result['files']['json'])
  names = sorted(zeroshot_shapes.example(1, i, 32)['label'] for i in range(12))
  top = _independent(run, names, np.stack([_numpy_view(
      zeroshot_shapes.example(1, i, 32)['image'], 16, run.config.data.mean,
      run.config.data.std) for i in sorted(range(12), key=lambda i: zeroshot_shapes.example(
          1, i, 32)['label'])]), 12)
  assert result['top1'] == pytest.approx(100 * np.mean(top[:, 0] == np.arange(12)), abs=1e-9)


def test_launcher_needs_no_flag_for_a_synthetic_run(run):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, str(ROOT / 'launch' / 'eval.py'),
                        f'--workdir={run.workdir}', '--task=zeroshot', '--noprogress'],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'zero-shot synthetic_zeroshot test' in out.stdout and 'chance 3.33%' in out.stdout
  with pytest.raises(ConfigError, match="--dataset='nope_set': tfds knows no such dataset"):
    zeroshot_run.zeroshot_checkpoint(None, str(run.workdir), dataset='nope_set')
