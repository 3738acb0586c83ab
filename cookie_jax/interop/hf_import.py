"""Hugging Face checkpoints in: a BERT folder into the text tower, a ViT folder into the
image tower.

Only local folders are read (config.json + model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin loaded with `weights_only=True`);
nothing is downloaded. The tower sizes come from the checkpoint's config.json, and what
our towers cannot reproduce exactly (another activation, LayerNorm epsilon or position
scheme) is refused rather than approximated: a silently different model is the failure
this module exists to prevent.

In the train loop: `configure_pretrained_towers(config)` before the model is built (sizes),
`apply_pretrained_towers(config, params)` after it is initialised (weights).
"""

import json
import math
import os
import pathlib

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np

from cookie_jax.config import ConfigError
from cookie_jax.interop import TORCH_CPU_INSTALL, keys
from cookie_jax.models.bert import Bert
from cookie_jax.models.cookie import DTYPES
from cookie_jax.models.presets import model_config
from cookie_jax.models.vit import ViT

# tower -> (model_type in config.json, transformers class, config key, HF config defaults)
TOWERS = {
    'text': ('bert', 'BertModel', 'text_init', dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)),
    'vision': ('vit', 'ViTModel', 'image_init', dict(
        image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072)),
}
# Our size name -> the HF config field it is read from.
SIZE_FIELDS = {
    'text': dict(vocab_size='vocab_size', width='hidden_size', depth='num_hidden_layers',
                 heads='num_attention_heads', mlp_dim='intermediate_size',
                 max_positions='max_position_embeddings', type_vocab_size='type_vocab_size'),
    'vision': dict(image_size='image_size', patch_size='patch_size', width='hidden_size',
                   depth='num_hidden_layers', heads='num_attention_heads',
                   mlp_dim='intermediate_size'),
}
OPTIONAL_PREFIXES = ('pooler.',)  # unused by COOKIE; kept at init when a checkpoint lacks it


def _where(tower: str, path) -> str:
  return f'config.model.{TOWERS[tower][2]}={os.fspath(path)!r}'


def read_hf_config(path, tower: str, where: str | None = None) -> dict:
  """config.json of a local folder, checked to be an architecture our tower reproduces."""
  where = where or _where(tower, path)
  model_type, cls_name, _, _ = TOWERS[tower]
  folder = pathlib.Path(path).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(
        f'{where}: no such folder. Give a local Hugging Face {cls_name} folder (with '
        'config.json and model.safetensors), e.g. one written by `save_pretrained`; nothing '
        'is downloaded.')
  cfg_file = folder / 'config.json'
  if not cfg_file.is_file():
    raise FileNotFoundError(
        f'{where}: the folder has no config.json (it has {sorted(os.listdir(folder))[:8]}). '
        f'Point it at the folder that `{cls_name}.save_pretrained` wrote.')
  hf = json.loads(cfg_file.read_text(encoding='utf-8'))
  found = hf.get('model_type')
  if found != model_type:
    raise ConfigError(
        f"{where}: config.json has model_type={found!r} (architectures "
        f"{hf.get('architectures')}), but the {tower} tower is a {cls_name} "
        f"(model_type '{model_type}'). Point it at a {model_type.upper()} checkpoint"
        + (", or use it as image_init" if found == 'vit' else
           ", or use it as text_init" if found == 'bert' else '') + '.')

  def refuse(field, value, expected):
    raise ConfigError(f'{where}: config.json has {field}={value!r}; our {tower} tower '
                      f'computes {expected} only, so this checkpoint cannot be imported '
                      'exactly. Use a checkpoint with that setting.')
  if hf.get('hidden_act', 'gelu') != 'gelu':
    refuse('hidden_act', hf['hidden_act'], "the exact erf GELU ('gelu')")
  eps = hf.get('layer_norm_eps', 1e-12)
  if not math.isclose(eps, 1e-12, rel_tol=1e-3):
    refuse('layer_norm_eps', eps, 'LayerNorm with epsilon 1e-12')
  if tower == 'text':
    if hf.get('position_embedding_type', 'absolute') != 'absolute':
      refuse('position_embedding_type', hf['position_embedding_type'],
             "absolute learned positions ('absolute')")
  else:
    if not hf.get('qkv_bias', True):
      refuse('qkv_bias', hf['qkv_bias'], 'attention with query/key/value biases (True)')
    if hf.get('num_channels', 3) != 3:
      refuse('num_channels', hf['num_channels'], 'RGB images (3)')
    for field in ('image_size', 'patch_size'):
      value = hf.get(field)
      if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
          refuse(field, value, 'square images and patches')
        hf[field] = value[0]
  return hf


def hf_sizes(hf: dict, tower: str) -> dict:
  """Our size keys (`config.model.<tower>`) read from an HF config dict."""
  defaults = TOWERS[tower][3]
  return {ours: int(hf.get(field, defaults[field]))
          for ours, field in SIZE_FIELDS[tower].items()}


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
  folder = pathlib.Path(path).expanduser()
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


def tower_weights(path, tower: str, where: str | None = None) -> tuple[dict, dict]:
  """(sizes, {path in the tower's parameter dict: array}) of a local HF folder."""
  where = where or _where(tower, path)
  hf = read_hf_config(path, tower, where)
  sizes = hf_sizes(hf, tower)
  model_type = TOWERS[tower][0]
  tensors = keys.normalize_keys(read_weights(path, where), model_type)
  rules = (keys.bert_rules if tower == 'text' else keys.vit_rules)(sizes['depth'])
  flat, missing = {}, []
  for key, ours, layout in rules:
    if key in tensors:
      flat[ours] = keys.from_torch(tensors[key], layout)
    elif not key.startswith(OPTIONAL_PREFIXES):
      missing.append(key)
  if missing:
    raise ConfigError(
        f'{where}: the weights lack {len(missing)} tensor(s) a {TOWERS[tower][1]} of this '
        f'config.json has, e.g. {missing[:3]}. The folder holds another model or a partial '
        'save; re-save it with `save_pretrained`.')
  if len(flat) < len(rules):
    logging.warning('%s has no pooler; the tower keeps a freshly initialised one (COOKIE '
                    'does not use it).', where)
  used = {key for key, _, _ in rules}
  ignored = sorted(k for k in tensors if k not in used and not k.endswith('position_ids'))
  if ignored:
    logging.info('%s: ignoring %d tensors outside the base model (e.g. %s).', where,
                 len(ignored), ignored[:3])
  return sizes, flat


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


def pretrained_sizes(config: ml_collections.ConfigDict, tower: str, path=None) -> dict:
  """Sizes of `config.model.<tower>` read from the HF folder (default: the configured one).

  A size the config sets away from its preset's value is the user's choice; if it differs
  from the checkpoint's, that is an error (which one to trust is not ours to guess).
  """
  path = path or config.model[TOWERS[tower][2]]
  where = _where(tower, path)
  sizes = hf_sizes(read_hf_config(path, tower, where), tower)
  try:
    preset = model_config(config.model.preset)[tower]
  except (ValueError, KeyError, AttributeError):
    preset = {}  # an unknown preset: every value counts as set by hand
  current = config.model[tower]
  for key, value in sizes.items():
    have = current[key]
    if have != value and have != preset.get(key, object()):
      field = SIZE_FIELDS[tower][key]
      raise ConfigError(
          f'config.model.{tower}.{key}={have} clashes with the pretrained checkpoint of '
          f'{where} ({field}={value}). Remove that override (the checkpoint sets it) or set '
          f'it to {value}.')
  return sizes


def configure_pretrained_towers(config: ml_collections.ConfigDict
                                ) -> ml_collections.ConfigDict:
  """Sets the tower sizes of `config.model` from `text_init` / `image_init`, in place."""
  m = config.model
  for tower in TOWERS:
    if m.get(TOWERS[tower][2], ''):
      m[tower].update(pretrained_sizes(config, tower))
  if m.get('text_init', ''):
    where = _where('text', m.text_init)
    if not config.data.tokenizer:
      raise ConfigError(
          f"config.data.tokenizer='': {where} expects its own vocabulary, and the synthetic "
          "dataset's token ids mean other words. Set config.data.tokenizer to the same "
          'folder (its tokenizer.json / vocab.txt).')
    if config.data.max_len > m.text.max_positions:
      raise ConfigError(
          f'config.data.max_len={config.data.max_len} exceeds the {m.text.max_positions} '
          f'positions of {where}; use max_len <= {m.text.max_positions}.')
  return config


def apply_pretrained_towers(config: ml_collections.ConfigDict, params):
  """`params` (the model's pure dict) with the towers of `text_init` / `image_init` loaded.

  The structure, dtypes and shardings are those of `params`; leaves of the other modules
  are the same objects.
  """
  for tower, root in (('text', ('text',)), ('vision', ('vision',))):
    path = config.model.get(TOWERS[tower][2], '')
    if not path:
      continue
    where = _where(tower, path)
    sizes, flat = tower_weights(path, tower, where)
    for key, value in sizes.items():
      if config.model[tower][key] != value:
        raise ConfigError(
            f'config.model.{tower}.{key}={config.model[tower][key]} but {where} has '
            f'{value}. Call interop.configure_pretrained_towers(config) before building the '
            'model, so that the tower sizes come from the checkpoint.')
    params = replace_leaves(params, {root + p: v for p, v in flat.items()}, where)
    logging.info('Initialised the %s tower from %s.', tower, path)
  return params


def load_tower(path, tower: str, *, dtype: str = 'float32', dropout: float = 0.0):
  """(module, sizes): our `Bert` or `ViT` with the weights of a local HF folder."""
  where = f'{TOWERS[tower][1]} folder {os.fspath(path)!r}'
  sizes, flat = tower_weights(path, tower, where)
  cfg = ml_collections.ConfigDict(dict(sizes, dropout=dropout, attention_dropout=dropout))
  build = lambda: (Bert if tower == 'text' else ViT)(cfg, dtype=DTYPES[dtype],
                                                      rngs=nnx.Rngs(0))
  # Shapes only: a random init of every weight would be thrown away.
  graphdef, state = nnx.split(nnx.eval_shape(build))
  pure = replace_leaves(nnx.to_pure_dict(state), flat, where)
  if len(flat) < len(jax.tree.leaves(pure)):  # no pooler in the checkpoint: initialise one
    init = nnx.to_pure_dict(nnx.state(build()))
    pure = jax.tree.map(lambda x, y: y if isinstance(x, jax.ShapeDtypeStruct) else x,
                        pure, init)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state), cfg
