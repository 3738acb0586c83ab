"""Hugging Face checkpoints in: a BERT, RoBERTa or XLM-R folder into the text tower
(hf_text.py), a ViT, CLIP, SigLIP or DINOv2 folder into the image tower (hf_vision.py).

Local folders are read (config.json + model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin loaded with `weights_only=True`), or a
Hub id through huggingface_hub's cache (hub.py; HF_HUB_OFFLINE=1 reads the cache only). The tower sizes come from the checkpoint's config.json, and what
our towers cannot reproduce exactly (another activation, LayerNorm epsilon or position
scheme) is refused rather than approximated: a silently different model is the failure
this module exists to prevent.

In the train loop: `configure_pretrained_towers(config)` before the model is built (sizes),
`apply_pretrained_towers(config, params)` after it is initialised (weights).
"""

import json
import os
import pathlib

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np

from cookie_jax import hub
from cookie_jax.config import ConfigError
from cookie_jax.data import defaults as data_defaults
from cookie_jax.interop import TORCH_CPU_INSTALL, hf_text, hf_vision, keys
from cookie_jax.models import bert, vit
from cookie_jax.models.bert import Bert
from cookie_jax.models.cookie import DTYPES
from cookie_jax.models.presets import model_config
from cookie_jax.models.vit import ViT

# tower -> (what it loads, config key); the classes and config fields are hf_text's (BERT,
# RoBERTa, XLM-R) and hf_vision's (ViT, CLIP, SigLIP, DINOv2).
TOWERS = {'text': ('text tower', 'text_init'), 'vision': ('image tower', 'image_init')}
# Our text key -> the HF config field it is read from (the vision tower's: hf_vision).
TEXT_FIELDS = dict(hf_text.SIZE_FIELDS, **hf_text.OPTION_FIELDS)
TEXT_CLASSES = tuple(hf_text.CLASSES.values())
VISION_CLASSES = ('ViTModel', 'CLIPVisionModel', 'CLIPModel', 'SiglipVisionModel',
                  'SiglipModel', 'Dinov2Model', 'Dinov2WithRegistersModel')
OPTIONAL_PREFIXES = ('pooler.',)  # unused by COOKIE; kept at init when a checkpoint lacks it


def _where(tower: str, path) -> str:
  return f'config.model.{TOWERS[tower][1]}={os.fspath(path)!r}'


def _local(path, where: str) -> pathlib.Path:
  """The local folder of `path`: itself, or a Hub id's snapshot in the cache (hub.py)."""
  return pathlib.Path(hub.resolve(path, where)).expanduser()


def read_hf_config(path, tower: str, where: str | None = None) -> dict:
  """config.json of a local folder, checked to be an architecture our tower loads (its
  settings are checked by hf_text / hf_vision)."""
  where = where or _where(tower, path)
  cls_name = ' / '.join(TEXT_CLASSES if tower == 'text' else VISION_CLASSES)
  folder = _local(path, where)
  if not folder.is_dir():
    raise FileNotFoundError(
        f'{where}: no such folder. Give a local Hugging Face {cls_name} folder (with '
        'config.json and model.safetensors), e.g. one written by `save_pretrained`, or a '
        'Hub id in the local cache.')
  cfg_file = folder / 'config.json'
  if not cfg_file.is_file():
    raise FileNotFoundError(
        f'{where}: the folder has no config.json (it has {sorted(os.listdir(folder))[:8]}). '
        f'Point it at the folder that `{cls_name}.save_pretrained` wrote.')
  hf = json.loads(cfg_file.read_text(encoding='utf-8'))
  found = hf.get('model_type')
  is_vision = hf_vision.family_of(hf, where) is not None
  if tower == 'vision':
    if not is_vision:
      raise ConfigError(
          f"{where}: config.json has model_type={found!r} (architectures "
          f"{hf.get('architectures')}), but the vision tower loads "
          f'{", ".join(VISION_CLASSES)} only. Point it at one of those'
          + (", or use it as text_init" if hf_text.family_of(hf) else '') + '.')
    return hf
  if hf_text.family_of(hf) is None:
    raise ConfigError(
        f"{where}: config.json has model_type={found!r} (architectures "
        f"{hf.get('architectures')}), but the text tower loads {', '.join(TEXT_CLASSES)} "
        "(model_type 'bert', 'roberta', 'xlm-roberta') only. Point it at one of those"
        + (", or use it as image_init" if is_vision else '') + '.')
  return hf


def tower_settings(path, tower: str, where: str | None = None) -> tuple[str, dict]:
  """(family, {key of config.model.<tower>: value}) of a local HF folder: a text family of
  `hf_text` with the text sizes and options, or a vision family of `hf_vision` with the
  image tower's sizes and layout."""
  where = where or _where(tower, path)
  hf = read_hf_config(path, tower, where)
  if tower == 'text':
    return hf_text.settings(hf, where)
  return hf_vision.settings(hf, where, _local(path, where))


def _read_safetensors(file: pathlib.Path) -> dict:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  out = {}
  with safe_open(str(file), framework='np') as f:
    wide = [k for k in f.keys() if f.get_slice(k).get_dtype() in ('BF16', 'F8_E4M3',
                                                                   'F8_E5M2')]
    for k in f.keys():
      if k not in wide:
        out[k] = f.get_tensor(k)
  if wide:  # numpy has no bfloat16 / fp8; JAX reads them.
    with safe_open(str(file), framework='flax') as f:
      for k in wide:
        out[k] = np.asarray(jax.device_get(f.get_tensor(k)).astype(np.float32))
  return out


def _read_torch_bin(file: pathlib.Path, where: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ModuleNotFoundError(
        f'{where}: {file.name} is a PyTorch pickle, and reading it needs torch (its CPU '
        f'build: `{TORCH_CPU_INSTALL}`); or convert the folder to model.safetensors.')
  # weights_only: tensors and plain containers only, never arbitrary pickled code.
  state = torch.load(str(file), map_location='cpu', weights_only=True)
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def read_weights(path, where: str) -> dict:
  """All tensors of a local HF folder as numpy arrays (floating point as float32)."""
  folder = _local(path, where)
  for name in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
    index = folder / name
    if index.is_file():
      shards = sorted(set(json.loads(index.read_text(encoding='utf-8'))['weight_map'].values()))
      out = {}
      for shard in shards:
        if not (folder / shard).is_file():
          raise FileNotFoundError(f'{where}: {name} lists the shard {shard}, which is '
                                  'missing; copy the whole checkpoint folder.')
        out.update(_read_safetensors(folder / shard) if shard.endswith('.safetensors')
                   else _read_torch_bin(folder / shard, where))
      return out
  if (folder / 'model.safetensors').is_file():
    return _read_safetensors(folder / 'model.safetensors')
  if (folder / 'pytorch_model.bin').is_file():
    return _read_torch_bin(folder / 'pytorch_model.bin', where)
  raise FileNotFoundError(
      f'{where}: the folder has config.json but no weights (model.safetensors or '
      f'pytorch_model.bin; it has {sorted(os.listdir(folder))[:8]}). Save the model with '
      '`save_pretrained` into it, or point at the folder that holds the weights.')


def _tower(tower: str, settings: dict, *, dtype: str = 'float32', dropout: float = 0.0):
  """(build, cfg): a function that builds our tower of `settings`, and its config."""
  cfg = ml_collections.ConfigDict(dict(settings, dropout=dropout, attention_dropout=dropout))
  return (lambda: (Bert if tower == 'text' else ViT)(cfg, dtype=DTYPES[dtype],
                                                     rngs=nnx.Rngs(0))), cfg


def _check_shapes(flat: dict, rules, tower: str, settings: dict, where: str) -> None:
  """Each tensor has the shape the folder's config.json gives the tower."""
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(_tower(tower, settings)[0])))
  for key, path, layout in rules:
    if path not in flat:
      continue
    want = keys.get_path(shapes, path).shape
    if tuple(flat[path].shape) != tuple(want):
      have = keys.to_torch(flat[path], layout).shape
      want = keys.to_torch(np.zeros(want, np.float32), layout).shape
      raise ConfigError(
          f'{where}: the weights have {key} of shape {tuple(have)}, but the model of its '
          f'config.json has {tuple(want)}: the weights belong to another config. Re-save '
          'the folder with `save_pretrained`, or fix config.json.')


def tower_weights(path, tower: str, where: str | None = None, found=None
                  ) -> tuple[dict, dict]:
  """(settings, {path in the tower's parameter dict: array}) of a local HF folder;
  settings as `tower_settings`, whose (family, settings) `found` may already hold."""
  where = where or _where(tower, path)
  family, settings = found or tower_settings(path, tower, where)
  tensors = keys.normalize_keys(read_weights(path, where), family)
  rules = (keys.bert_rules(settings['depth']) if tower == 'text' else
           hf_vision.rules(family, ml_collections.ConfigDict(settings)))
  flat, missing = {}, []
  for key, ours, layout in rules:
    if key in tensors:
      flat[ours] = keys.from_torch(tensors[key], layout)
    elif not key.startswith(OPTIONAL_PREFIXES):
      missing.append(key)
  if missing:
    raise ConfigError(
        f'{where}: the weights lack {len(missing)} tensor(s) a '
        f'{dict(hf_text.CLASSES, **hf_vision.CLASSES)[family]} of this config.json has, e.g. '
        f'{missing[:3]}. The folder holds another model or a partial save; re-save it with '
        '`save_pretrained`.')
  _check_shapes(flat, rules, tower, settings, where)
  if len(flat) < len(rules):
    logging.warning('%s has no pooler; the tower keeps a freshly initialised one (COOKIE '
                    'does not use it).', where)
  used = {key for key, _, _ in rules}
  ignored = sorted(k for k in tensors if k not in used and not k.endswith('position_ids'))
  if ignored:
    logging.info('%s: ignoring %d tensors outside the base model (e.g. %s).', where,
                 len(ignored), ignored[:3])
  return settings, flat


def replace_leaves(params, flat: dict, where: str):
  """A copy of the pure dict `params` with the leaves at the paths of `flat` replaced.

  Each new leaf takes the old one's dtype and, for a `jax.Array`, its sharding.
  """
  out = jax.tree.map(lambda x: x, params)  # new containers, same leaves
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node[k]
    old = node[path[-1]]
    if tuple(old.shape) != tuple(value.shape):
      name = '/'.join(map(str, path))
      raise ConfigError(
          f'{where}: {name} has shape {tuple(value.shape)} in the checkpoint but '
          f'{tuple(old.shape)} in the model. Call interop.configure_pretrained_towers(config) '
          'before building the model, so that the tower sizes come from the checkpoint.')
    value = np.asarray(value, dtype=old.dtype)
    if isinstance(old, jax.Array):
      # Works for every process of a multi-host run: each fills its own shards.
      value = jax.make_array_from_callback(value.shape, old.sharding,
                                           lambda idx, v=value: v[idx])
    node[path[-1]] = value
  return out


def _defaults(config, tower: str) -> dict:
  """The values of `config.model.<tower>` that no one set: its preset's (or its named
  vision preset's), the layout options' defaults for options the preset lacks."""
  try:
    model = model_config(config.model.preset, config.model.get('vision_preset', ''))
    return dict(vit.OPTIONS if tower == 'vision' else bert.OPTIONS, **model[tower])
  except (ValueError, KeyError, AttributeError):
    return {}  # an unknown preset: every value counts as set by hand


def pretrained_sizes(config: ml_collections.ConfigDict, tower: str, path=None) -> dict:
  """Sizes (and for images the layout) of `config.model.<tower>` read from the HF folder
  (default: the configured one).

  A value the config sets away from its preset's is the user's choice; if it differs
  from the checkpoint's, that is an error (which one to trust is not ours to guess). The
  keys a family leaves free (DINOv2's image size) keep such a choice.
  """
  path = path or config.model[TOWERS[tower][1]]
  where = _where(tower, path)
  family, sizes = tower_settings(path, tower, where)
  preset, current = _defaults(config, tower), config.model[tower]
  for key, value in list(sizes.items()):
    have = current.get(key, preset.get(key))
    if have == value or have == preset.get(key, object()):
      continue
    if key in hf_vision.FREE_KEYS.get(family, ()):
      sizes[key] = have
      continue
    field = TEXT_FIELDS[key] if tower == 'text' else key
    raise ConfigError(
        f'config.model.{tower}.{key}={have!r} clashes with the pretrained checkpoint of '
        f'{where} ({field}={value!r}). Remove that override (the checkpoint sets it) or set '
        f'it to {value!r}.')
  return sizes


def _preprocessing(config, path) -> None:
  """config.data.mean / std from the image folder's preprocessor_config.json, unless the
  config sets other values by hand. Not for ViTModel folders (configure_pretrained_towers)."""
  wanted = hf_vision.preprocessor(_local(path, _where('vision', path)))
  defaults = data_defaults.data_config()
  for key in ('mean', 'std'):
    if key not in wanted:
      continue
    have = tuple(config.data[key])
    if have not in (tuple(defaults[key]), wanted[key]):
      raise ConfigError(
          f'config.data.{key}={have} clashes with {_where("vision", path)} '
          f'(preprocessor_config.json: {wanted[key]}), the normalisation the tower was '
          f'trained with. Remove that override or set it to {wanted[key]}.')
    config.data[key] = wanted[key]


def configure_pretrained_towers(config: ml_collections.ConfigDict
                                ) -> ml_collections.ConfigDict:
  """Sets the tower sizes (and the image tower's layout and normalisation) of `config`
  from `text_init` / `image_init`, in place."""
  m = config.model
  for tower in TOWERS:
    if m.get(TOWERS[tower][1], ''):
      m[tower].update(pretrained_sizes(config, tower))
  # ViTModel folders keep the normalisation they had before the other families came
  # (config.data's), so that a run started then resumes unchanged.
  if m.get('image_init', '') and vit.transformers_family(m.vision) != 'vit':
    _preprocessing(config, m.image_init)
  if m.get('text_init', ''):
    where = _where('text', m.text_init)
    if not config.data.tokenizer:
      raise ConfigError(
          f"config.data.tokenizer='': {where} expects its own vocabulary, and the synthetic "
          "dataset's token ids mean other words. Set config.data.tokenizer to the same "
          'folder (its tokenizer.json / vocab.txt).')
    _check_text_data(config, where)
  return config


def _check_text_data(config, where: str) -> None:
  """max_len within the tower's positions; for RoBERTa / XLM-R, a tokenizer that pads
  with the id their positions count past (else every position is off)."""
  o, t = bert.options(config.model.text), config.model.text
  after_padding = o['positions'] == 'after_padding'
  # RoBERTa / XLM-R positions start past the padding index.
  usable = t.max_positions - (o['pad_token_id'] + 1 if after_padding else 0)
  if config.data.max_len > usable:
    raise ConfigError(
        f'config.data.max_len={config.data.max_len} exceeds the {usable} '
        f'positions of {where}; use max_len <= {usable}.')
  if after_padding and config.data.tokenizer != 'synthetic':
    from cookie_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    tok = tok_lib.finalize(tok_lib.tokenizer_from_path(
        config.data.tokenizer, lowercase=config.data.lowercase), config.data.max_len)
    if tok.padding['pad_id'] != o['pad_token_id']:
      raise ConfigError(
          f'config.data.tokenizer={config.data.tokenizer!r} pads with id '
          f"{tok.padding['pad_id']}, but {where} counts its positions past pad_token_id="
          f"{o['pad_token_id']}. Use the folder's own tokenizer (its <pad>).")


def apply_pretrained_towers(config: ml_collections.ConfigDict, params):
  """`params` (the model's pure dict) with the towers of `text_init` / `image_init` loaded.

  The structure, dtypes and shardings are those of `params`; leaves of the other modules
  are the same objects.
  """
  for tower, root in (('text', ('text',)), ('vision', ('vision',))):
    path = config.model.get(TOWERS[tower][1], '')
    if not path:
      continue
    where = _where(tower, path)
    found = tower_settings(path, tower, where)  # config.json, read once
    family = found[0]
    sizes, flat = tower_weights(path, tower, where, found)
    for key, value in sizes.items():
      if config.model[tower][key] != value and key not in hf_vision.FREE_KEYS.get(family, ()):
        raise ConfigError(
            f'config.model.{tower}.{key}={config.model[tower][key]!r} but {where} has '
            f'{value!r}. Call interop.configure_pretrained_towers(config) before building '
            'the model, so that the tower sizes come from the checkpoint.')
    params = replace_leaves(params, {root + p: v for p, v in flat.items()}, where)
    logging.info('Initialised the %s tower from %s.', tower, path)
  return params


def load_tower(path, tower: str, *, dtype: str = 'float32', dropout: float = 0.0):
  """(module, settings): our `Bert` or `ViT` with the weights of a local HF folder."""
  where = f'{TOWERS[tower][0]} folder {os.fspath(path)!r}'
  sizes, flat = tower_weights(path, tower, where)
  build, cfg = _tower(tower, sizes, dtype=dtype, dropout=dropout)
  # Shapes only: a random init of every weight would be thrown away.
  graphdef, state = nnx.split(nnx.eval_shape(build))
  pure = replace_leaves(nnx.to_pure_dict(state), flat, where)
  if len(flat) < len(jax.tree.leaves(pure)):  # no pooler in the checkpoint: initialise one
    init = nnx.to_pure_dict(nnx.state(build()))
    pure = jax.tree.map(lambda x, y: y if isinstance(x, jax.ShapeDtypeStruct) else x,
                        pure, init)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state), cfg
