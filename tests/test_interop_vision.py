"""The vision towers people start from: CLIP, SigLIP (SigLIP 2 at a fixed resolution is a
SiglipModel too), DINOv2 and DINOv2 with registers, in from a transformers folder and back
out to the same class, compared number for number with transformers' own forward."""

import json
import pathlib
import shutil

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
import torch
import transformers

from cookie_jax import sharding
from cookie_jax.config import ConfigError, default_config, validate_config
from cookie_jax.interop import hf_export, hf_import, hf_vision
from cookie_jax.models import positions

TOL = 1e-5  # max abs difference, fp32 (the bar)
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
MESH = dict(data=2, fsdp=2, tensor=2, dcn_data=1)


def _perturb(module: torch.nn.Module, seed: int) -> None:
  # No tensor at its init value (LayerNorms, LayerScale, tokens), so a swap shows.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _clip(full):
  vision = dict(SMALL, intermediate_size=64, image_size=32, patch_size=8)
  if not full:
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
  return transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=vision, text_config=dict(SMALL, intermediate_size=64, vocab_size=99)))


def _siglip(full, image_size=32):
  if not full:
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        **SMALL, intermediate_size=64, image_size=image_size, patch_size=8))
  # SigLIP 2 at a fixed resolution is published as a SiglipModel (model_type 'siglip'):
  # another grid and MLP width here, 16 x 16 images of 4 x 4 patches.
  return transformers.SiglipModel(transformers.SiglipConfig(
      vision_config=dict(SMALL, intermediate_size=48, image_size=16, patch_size=4),
      text_config=dict(SMALL, intermediate_size=48, vocab_size=99)))


def _dinov2(registers):
  if not registers:
    return transformers.Dinov2Model(transformers.Dinov2Config(
        **SMALL, mlp_ratio=2, image_size=32, patch_size=8))
  return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      **SMALL, mlp_ratio=2, image_size=32, patch_size=8, num_register_tokens=2))


# id -> (build, class that loads the export, our image size, family)
CASES = {
    'clip': (lambda: _clip(False), transformers.CLIPVisionModel, 32, 'clip'),
    'clip_full_model': (lambda: _clip(True), transformers.CLIPVisionModel, 32, 'clip'),
    'siglip': (lambda: _siglip(False), transformers.SiglipVisionModel, 32, 'siglip'),
    'siglip2_fixed_res': (lambda: _siglip(True), transformers.SiglipVisionModel, 16, 'siglip'),
    # 30-pixel images of 8-pixel patches: a 3 x 3 grid, the last 6 pixels of each side
    # dropped by the patch conv, as So400m/14 drops 6 of its 384 (27 x 27 patches).
    'siglip_floored_grid': (lambda: _siglip(False, image_size=30),
                            transformers.SiglipVisionModel, 30, 'siglip'),
    # Positions kept at the 4 x 4 pre-training grid and resized to 3 x 3 for 24-pixel
    # inputs (the folder's preprocessor crop size), as transformers does.
    'dinov2': (lambda: _dinov2(False), transformers.Dinov2Model, 24, 'dinov2'),
    'dinov2_registers': (lambda: _dinov2(True), transformers.Dinov2WithRegistersModel, 24,
                         'dinov2_with_registers'),
}


def _vision_half(model):
  return getattr(model, 'vision_model', model)


@pytest.fixture(scope='module', params=list(CASES))
def folder(request, tmp_path_factory):
  build, cls, size, fam = CASES[request.param]
  torch.manual_seed(0)
  model = build()
  _perturb(model, 0)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  if fam.startswith('dinov2'):
    (path / 'preprocessor_config.json').write_text(json.dumps(dict(
        crop_size=dict(height=size, width=size), do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])))
  return dict(path=path, model=_vision_half(model).eval(), cls=cls, size=size, family=fam)


def _forward(module, images, mesh=None):
  """(last hidden state, pooled) of our tower; on `mesh` with its parameters and the
  batch sharded by the training rules."""
  run = nnx.jit(lambda m, x: (lambda h: (h, m.pooled(h)))(m(x)))
  if mesh is None:
    return tuple(map(np.asarray, run(module, images)))
  graphdef, state = nnx.split(module)
  nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state),
                                                 sharding.param_shardings(state, mesh)))
  images = jax.device_put(images, sharding.batch_sharding(mesh))
  with sharding.activation_sharding(mesh):
    return tuple(map(np.asarray, run(nnx.merge(graphdef, state), images)))


def _reference(model, images):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_imported_tower_equals_transformers_on_1_and_8_devices_and_exports_back(
    folder, tmp_path):
  module, cfg = hf_import.load_tower(folder['path'], 'vision')
  assert cfg.image_size == folder['size']
  # As a run's image_init the folder's sizes validate (a grid that is not a whole number
  # of patches included: transformers drops the trailing pixels, and so do we).
  config = default_config('tiny')
  config.model.image_init, config.model.image_pool = str(folder['path']), 'mean'
  validate_config(hf_import.configure_pretrained_towers(config))
  assert hf_vision.family(cfg) == folder['family']
  images = np.random.default_rng(0).normal(size=(4, cfg.image_size, cfg.image_size, 3)
                                           ).astype(np.float32)
  ref = _reference(folder['model'], images)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(MESH))
  assert mesh.devices.size == 8
  diffs = {}
  for where, m in (('1 device', None), ('8 devices', mesh)):
    hidden, pooled = _forward(module, images, m)
    assert hidden.shape == ref[0].shape and pooled.shape == ref[1].shape
    diffs[where] = (np.abs(hidden - ref[0]).max(), np.abs(pooled - ref[1]).max())
  print(f"{folder['family']} max abs diff (hidden, pooled): {diffs}")
  assert max(max(d) for d in diffs.values()) <= TOL

  # Out to the same class: no missing or unexpected keys, the very tensors, equal outputs.
  params = nnx.to_pure_dict(nnx.state(module))
  hf_export.write_tower(params, 'vision', cfg, tmp_path / 'image_encoder')
  model, info = folder['cls'].from_pretrained(tmp_path / 'image_encoder',
                                              output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
  again = _reference(model.eval(), images)
  np.testing.assert_array_equal(again[0], ref[0])
  np.testing.assert_array_equal(again[1], ref[1])
  settings, flat = hf_import.tower_weights(tmp_path / 'image_encoder', 'vision')
  # The same sizes and layout; DINOv2's config.json gives its position grid's image size.
  expected = {k: v for k, v in cfg.items() if 'dropout' not in k}
  if folder['family'].startswith('dinov2'):
    expected['image_size'] = 32
  assert settings == expected
  assert flat.keys() == {tuple(k.key for k in p)
                         for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  for path, value in flat.items():
    leaf = params
    for k in path:
      leaf = leaf[k]
    np.testing.assert_array_equal(value, np.asarray(leaf), str(path))


@pytest.mark.parametrize('old,new', [(4, 3), (37, 16), (4, 6)])
def test_position_resize_matrices_equal_torch_interpolate(old, new):
  table = np.random.default_rng(old).normal(size=(1, old * old, 5)).astype(np.float32)
  grid = torch.from_numpy(table.reshape(1, old, old, 5)).permute(0, 3, 1, 2)
  for method, antialias in (('bicubic', False), ('bicubic_antialias', True)):
    ref = torch.nn.functional.interpolate(grid, size=(new, new), mode='bicubic',
                                          align_corners=False, antialias=antialias)
    ref = ref.permute(0, 2, 3, 1).reshape(1, new * new, 5).numpy()
    got = np.asarray(positions.resize_grid(table, old, (new, new), method))
    assert np.abs(got - ref).max() <= 2e-6, method


def test_image_init_sets_layout_sizes_and_preprocessing(tmp_path):
  torch.manual_seed(0)
  model = _dinov2(registers=True)
  model.save_pretrained(tmp_path / 'dino')
  (tmp_path / 'dino' / 'preprocessor_config.json').write_text(json.dumps(dict(
      crop_size=dict(height=24, width=24), image_mean=[0.5, 0.5, 0.5],
      image_std=[0.25, 0.25, 0.25])))
  config = default_config('tiny')
  config.model.image_init = str(tmp_path / 'dino')
  hf_import.configure_pretrained_towers(config)
  v = config.model.vision
  assert (v.image_size, v.patch_size, v.width, v.depth, v.mlp_dim) == (24, 8, 32, 2, 64)
  assert (v.registers, v.position_grid, v.layer_scale, v.pooler) == (2, 4, 1.0, 'cls')
  assert (v.position_interpolation, v.layer_norm_eps) == ('bicubic_antialias', 1e-6)
  assert tuple(config.data.mean) == (0.5,) * 3 and tuple(config.data.std) == (0.25,) * 3
  validate_config(config)
  # DINOv2 resizes its positions to any input: an image size set by hand is kept.
  config = default_config('tiny')
  config.model.image_init, config.model.vision.image_size = str(tmp_path / 'dino'), 40
  assert hf_import.configure_pretrained_towers(config).model.vision.image_size == 40
  # A normalisation set by hand that is not the folder's is refused.
  config = default_config('tiny')
  config.model.image_init, config.data.mean = str(tmp_path / 'dino'), (0.1, 0.2, 0.3)
  with pytest.raises(ConfigError, match=r'config.data.mean=\(0.1, 0.2, 0.3\) clashes'):
    hf_import.configure_pretrained_towers(config)


def test_a_vit_model_folder_keeps_the_configs_normalisation(tmp_path):
  """ViTModel image_init runs predate preprocessor_config.json being read: a run started
  then resumes with the same data.mean / std (only the new families take the folder's)."""
  transformers.ViTModel(transformers.ViTConfig(
      **SMALL, intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(
          tmp_path / 'vit')
  (tmp_path / 'vit' / 'preprocessor_config.json').write_text(json.dumps(dict(
      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], size=dict(height=32,
                                                                       width=32))))
  for mean in (None, (0.1, 0.2, 0.3)):  # the default, and one set by hand
    config = default_config('tiny')
    config.model.image_init = str(tmp_path / 'vit')
    if mean:
      config.data.mean = mean
    before = (tuple(config.data.mean), tuple(config.data.std))
    hf_import.configure_pretrained_towers(config)
    assert (tuple(config.data.mean), tuple(config.data.std)) == before
    assert config.model.vision.width == 32


def test_bad_vision_folders_are_refused_in_one_line(tmp_path):
  def refused(hf_config, match, weights=None):
    path = tmp_path / f'f{len(list(tmp_path.iterdir()))}'
    hf_config.save_pretrained(path)
    if weights is not None:
      save_file(weights, str(path / 'model.safetensors'), metadata={'format': 'pt'})
    with pytest.raises(ConfigError, match=match) as e:
      hf_import.tower_weights(path, 'vision')
    assert '\n' not in str(e.value)
    return str(e.value)

  refused(transformers.BertConfig(), r"model_type='bert'.*vision tower loads ViTModel, "
          r'CLIPVisionModel, .*Dinov2WithRegistersModel only.*use it as text_init')
  refused(transformers.Siglip2VisionConfig(), r"model_type='siglip2_vision_model': "
          r"SigLIP 2's NaFlex .* not reproduced")
  refused(transformers.CLIPVisionConfig(hidden_act='relu'),
          r"hidden_act='relu'; the image tower computes the activations \['gelu', "
          r"'gelu_pytorch_tanh', 'quick_gelu'\] only")
  refused(transformers.Dinov2Config(use_swiglu_ffn=True), r'use_swiglu_ffn=True.*two-layer MLP')
  refused(transformers.SiglipVisionConfig(vision_use_head=False), r'vision_use_head=False')
  # Weights that do not match their config.json: 48 wide where the config says 32.
  torch.manual_seed(0)
  wide = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
      image_size=16, patch_size=8))
  tensors = {'vision_model.' + k: v.numpy() for k, v in wide.state_dict().items()
             if not k.endswith('position_ids')}
  refused(transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        image_size=16, patch_size=8),
          r'vision_model.embeddings.class_embedding of shape \(48,\), but the model of its '
          r'config.json has \(32,\)', tensors)
  # A layout no transformers class computes cannot be exported.
  config = default_config('tiny')
  config.model.vision.pre_norm = True
  with pytest.raises(ConfigError, match='none of the transformers vision towers'):
    hf_vision.family(config.model.vision)


def _recipe(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'base_recipes', os.path.join(os.path.dirname(__file__), '..', 'configs', 'base.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(name)


def _names(params):
  return {'/'.join(str(k.key) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.slow  # 37 s on the 2-core CPU (a train step's compile on 8 devices)
def test_lit_clip_recipe_locks_a_clip_tower_trains_text_and_exports(tmp_path):
  """configs/base.py:lit_clip from a small random CLIPModel folder: sizes, layout and
  normalisation from the folder, 2 train steps on 8 devices with the image tower
  bit-identical, then the export: image_encoder/ is a CLIPVisionModel, and the PyTorch
  and AutoModel exports give the JAX model's image embeddings (the tower's pooled output
  through the trained head)."""
  from cookie_jax import step  # pylint: disable=g-import-not-at-top
  from cookie_jax.interop.torch_model import CookieTorchModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  clip = _clip(full=True)
  _perturb(clip, 3)
  clip.save_pretrained(tmp_path / 'clip')
  (tmp_path / 'clip' / 'preprocessor_config.json').write_text(json.dumps(dict(
      crop_size=dict(height=32, width=32), image_mean=[0.48145466, 0.4578275, 0.40821073],
      image_std=[0.26862954, 0.26130258, 0.27577711])))
  config = _recipe('lit_clip')
  assert (config.train.freeze, config.model.image_pool) == (('vision',), 'tower')
  assert config.model.vision.width == 768  # B/16 until the checkpoint says otherwise
  config.model.image_init = str(tmp_path / 'clip')
  hf_import.configure_pretrained_towers(config)
  v = config.model.vision
  assert (v.width, v.depth, v.image_size, v.patch_size, v.activation) == (32, 2, 32, 8,
                                                                         'quick_gelu')
  assert tuple(config.data.mean) == (0.48145466, 0.4578275, 0.40821073)
  config.train.batch_size = 8
  validate_config(config, num_devices=8)
  mesh = sharding.make_mesh(config.mesh)
  state, setup = step.create_train_state(config, mesh)
  state = step.with_params(state, hf_import.apply_pretrained_towers(config, state.params))
  before = _names(jax.device_get(state.params))
  rng = np.random.default_rng(0)
  length, train_step = config.data.max_len, step.make_train_step(config, setup)
  for _ in range(2):
    mask = (np.arange(length)[None] < rng.integers(3, length, size=(8, 1))).astype(np.int32)
    batch = dict(image=rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                 image_view2=rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                 input_ids=(rng.integers(5, 1000, size=(8, length)) * mask).astype(np.int32),
                 attention_mask=mask)
    state, metrics = train_step(state, sharding.to_global(mesh, batch))
    assert np.isfinite(float(metrics['loss']))
  params = jax.device_get(state.params)
  after = _names(params)
  vision = [n for n in before if n.startswith('vision/')]
  assert len(vision) == 39  # every CLIPVisionModel tensor, each still the checkpoint's
  for name in vision:
    assert np.array_equal(after[name], before[name]), name
  for name in ('image_head/kernel', 'text_head/kernel', 'text/layer/0/output/kernel'):
    assert np.abs(after[name] - before[name]).max() > 0, name

  out = tmp_path / 'export'
  hf_export.export_params(params, config.model, out)
  _, info = transformers.CLIPVisionModel.from_pretrained(out / 'image_encoder',
                                                         output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: __import__(
      'cookie_jax.models', fromlist=['init_model']).init_model(config.model, 0)))
  nnx.replace_by_pure_dict(abstract, params)
  model = nnx.merge(graphdef, abstract)
  ours = np.asarray(nnx.jit(lambda m, x: m.encode_image(x))(model, images))
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
  with torch.no_grad():
    exported = CookieTorchModel.from_pretrained(out).encode_image(pixels).numpy()
    auto = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    auto_image = auto.get_image_features(pixel_values=pixels).numpy()
  diffs = np.abs(exported - ours).max(), np.abs(auto_image - ours).max()
  print(f'lit_clip export max abs diff: torch_model {diffs[0]:.2e}, AutoModel {diffs[1]:.2e}')
  assert max(diffs) <= TOL


def test_hub_ids_resolve_from_the_cache_offline(tmp_path, monkeypatch):
  """image_init and data.tokenizer as Hub ids, read from a huggingface_hub cache the test
  lays out itself (models--owner--name/{refs/main, snapshots/<commit>/}), offline."""
  from cookie_jax import hub  # pylint: disable=g-import-not-at-top
  from cookie_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  commit = '0123456789abcdef0123456789abcdef01234567'
  repo = tmp_path / 'cache' / 'models--someone--tiny-clip'
  snapshot = repo / 'snapshots' / commit
  torch.manual_seed(0)
  _clip(full=False).save_pretrained(snapshot)
  (snapshot / 'vocab.txt').write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'a']))
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(commit)
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  assert hub.resolve('someone/tiny-clip', 'here') == str(snapshot)
  assert hub.resolve(str(tmp_path), 'here') == str(tmp_path)  # a path stays a path
  config = default_config('tiny')
  config.model.image_init = 'someone/tiny-clip'
  hf_import.configure_pretrained_towers(config)
  assert (config.model.vision.width, config.model.vision.pre_norm) == (32, True)
  _, flat = hf_import.tower_weights('someone/tiny-clip', 'vision')
  assert flat[('cls_token',)].shape == (1, 1, 32)
  assert tok_lib.tokenizer_from_path('someone/tiny-clip').get_vocab()['a'] == 4
  with pytest.raises(ConfigError, match=r"'someone/absent' is neither a local folder nor a "
                     r'Hub id that could be fetched \(HF_HUB_OFFLINE=1, and the cache lacks'):
    hf_import.tower_weights('someone/absent', 'vision')


def test_hub_fetches_safetensors_where_present_else_the_torch_shards(tmp_path, monkeypatch):
  """Online: one kind of weights per repository, sharded pickles included; offline: the
  cache's snapshot (the layout of the test above) whatever weights it holds."""
  import fnmatch  # pylint: disable=g-import-not-at-top
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from cookie_jax import hub  # pylint: disable=g-import-not-at-top
  shards = ['pytorch_model-00001-of-00002.bin', 'pytorch_model-00002-of-00002.bin']
  remote = {'someone/both': ['config.json', 'model.safetensors', 'pytorch_model.bin',
                             'flax_model.msgpack'],
            'someone/pickles': ['config.json', 'pytorch_model.bin.index.json', *shards]}
  real = huggingface_hub.snapshot_download

  def fake(repo_id, *, cache_dir, local_files_only, allow_patterns):
    folder = tmp_path / 'online' / repo_id
    folder.mkdir(parents=True, exist_ok=True)
    for name in remote[repo_id]:
      if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
        (folder / name).write_text('x')
    return str(folder)
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake)
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
  got = lambda repo: sorted(p.name for p in pathlib.Path(hub.resolve(repo, 'here')).iterdir())
  assert got('someone/both') == ['config.json', 'model.safetensors']
  assert got('someone/pickles') == sorted(['config.json', 'pytorch_model.bin.index.json',
                                           *shards])
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', real)
  commit = '0123456789abcdef0123456789abcdef01234567'
  repo = tmp_path / 'cache' / 'models--someone--pickles'
  snapshot = repo / 'snapshots' / commit
  snapshot.mkdir(parents=True)
  for name in remote['someone/pickles']:
    (snapshot / name).write_text('x')
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(commit)
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  assert hub.resolve('someone/pickles', 'here') == str(snapshot)
