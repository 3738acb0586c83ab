"""The transformers vision towers our ViT reproduces exactly, both ways.

  family                  transformers class(es)                  model_type in config.json
  'vit'                   ViTModel                                vit
  'clip'                  CLIPVisionModel (CLIPModel's vision)    clip_vision_model (clip)
  'siglip'                SiglipVisionModel (SiglipModel's)       siglip_vision_model (siglip)
  'dinov2'                Dinov2Model                             dinov2
  'dinov2_with_registers' Dinov2WithRegistersModel                dinov2_with_registers

SigLIP 2 at a fixed resolution (google/siglip2-*-patch16-224, ...) is published as
`SiglipModel` and so is 'siglip'. `Siglip2VisionModel` (model_type 'siglip2') is NaFlex:
patches of any aspect ratio with per-image position resizing and padding masks, which our
square-grid tower does not compute; it is refused.

Import: `settings(hf, where)` reads a config.json into our vision keys (sizes and the
layout options of models/vit.py). Export: `family(vision_cfg)` finds the class whose
computation is ours, `config_json` writes its config.json, and `rules` names the tensors
(keys.py) both ways. Pure Python: no torch, no transformers.
"""

import json
import pathlib

from cookie_jax.errors import ConfigError
from cookie_jax.interop import keys
from cookie_jax.models import layers, presets, vit

CLASSES = {'vit': 'ViTModel', 'clip': 'CLIPVisionModel', 'siglip': 'SiglipVisionModel',
           'dinov2': 'Dinov2Model', 'dinov2_with_registers': 'Dinov2WithRegistersModel'}
MODEL_TYPES = {'vit': 'vit', 'clip': 'clip_vision_model', 'siglip': 'siglip_vision_model',
               'dinov2': 'dinov2', 'dinov2_with_registers': 'dinov2_with_registers'}
_FAMILY_OF = {**{t: f for f, t in MODEL_TYPES.items()}, 'clip': 'clip', 'siglip': 'siglip'}
REFUSED_TYPES = {
    'siglip2': "SigLIP 2's NaFlex variable resolution (Siglip2Model: patches of any aspect "
               'ratio, positions resized per image, padding masks) is not reproduced; the '
               'fixed-resolution SigLIP 2 checkpoints (SiglipModel, e.g. '
               'google/siglip2-base-patch16-224) load',
}
REFUSED_TYPES['siglip2_vision_model'] = REFUSED_TYPES['siglip2']

# What each class's config takes when its config.json leaves a field out.
_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, image_size=224, num_channels=3)
DEFAULTS = {
    'vit': dict(_BASE, patch_size=16, hidden_act='gelu', layer_norm_eps=1e-12),
    'clip': dict(_BASE, patch_size=32, hidden_act='quick_gelu', layer_norm_eps=1e-5),
    'siglip': dict(_BASE, patch_size=16, hidden_act='gelu_pytorch_tanh',
                   layer_norm_eps=1e-6, vision_use_head=True),
    'dinov2': dict(_BASE, patch_size=14, hidden_act='gelu', layer_norm_eps=1e-6,
                   mlp_ratio=4, layerscale_value=1.0, use_swiglu_ffn=False,
                   use_mask_token=True),
}
DEFAULTS['dinov2_with_registers'] = dict(DEFAULTS['dinov2'], patch_size=16,
                                         num_register_tokens=4)
LAYOUTS = {'vit': {}, 'clip': presets.CLIP_LAYOUT, 'siglip': presets.SIGLIP_LAYOUT,
           'dinov2': presets.DINOV2_LAYOUT, 'dinov2_with_registers': presets.DINOV2_LAYOUT}
# Keys an import sets that the user may still choose: DINOv2 resizes its positions to
# any input, so the image size is the run's.
FREE_KEYS = {'dinov2': ('image_size',), 'dinov2_with_registers': ('image_size',)}


def family_of(hf: dict, where: str) -> str | None:
  """The family of a config.json (None: not a vision tower we know)."""
  found = hf.get('model_type')
  if found in REFUSED_TYPES:
    raise ConfigError(f'{where}: config.json has model_type={found!r}: '
                      f'{REFUSED_TYPES[found]}.')
  return _FAMILY_OF.get(found)


def _refuse(where, field, value, supported):
  raise ConfigError(f'{where}: config.json has {field}={value!r}; the image tower computes '
                    f'{supported} only, so this checkpoint cannot be imported exactly.')


def _square(where, hf, field) -> int:
  value = hf[field]
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      _refuse(where, field, value, 'square images and patches')
    value = value[0]
  return int(value)


def settings(hf_file: dict, where: str, folder=None) -> tuple[str, dict]:
  """(family, {vision key: value}) of a config.json: every size and layout option; for
  DINOv2 the image size is the folder's preprocessor crop size if it has one."""
  fam = family_of(hf_file, where)
  full = hf_file.get('model_type') in ('clip', 'siglip')  # CLIPModel / SiglipModel
  sub = (hf_file.get('vision_config') or {}) if full else hf_file
  hf = dict(DEFAULTS[fam], **sub)
  act = hf['hidden_act']
  if act not in layers.ACTIVATIONS:
    _refuse(where, 'hidden_act', act, f'the activations {sorted(layers.ACTIVATIONS)}')
  if hf['num_channels'] != 3:
    _refuse(where, 'num_channels', hf['num_channels'], 'RGB images (3)')
  if not hf.get('qkv_bias', True):
    _refuse(where, 'qkv_bias', hf['qkv_bias'], 'attention with query/key/value biases (True)')
  if hf.get('use_swiglu_ffn'):
    _refuse(where, 'use_swiglu_ffn', True, 'the two-layer MLP (False)')
  if not hf.get('vision_use_head', True):
    _refuse(where, 'vision_use_head', False, "SigLIP's attention-pooling head (True)")
  image, patch, width = _square(where, hf, 'image_size'), _square(where, hf, 'patch_size'), \
      int(hf['hidden_size'])
  mlp = int(width * hf['mlp_ratio']) if fam.startswith('dinov2') else hf['intermediate_size']
  out = dict(vit.OPTIONS, **LAYOUTS[fam])
  out.update(image_size=image, patch_size=patch, width=width,
             depth=int(hf['num_hidden_layers']), heads=int(hf['num_attention_heads']),
             mlp_dim=int(mlp), activation=act, layer_norm_eps=float(hf['layer_norm_eps']))
  if fam.startswith('dinov2'):
    out.update(position_grid=image // patch, layer_scale=float(hf['layerscale_value']) or 1.0,
               registers=int(hf.get('num_register_tokens', 0)),
               mask_token=bool(hf.get('use_mask_token', True)),
               position_interpolation=('bicubic_antialias' if fam == 'dinov2_with_registers'
                                       else 'bicubic'))
    crop = preprocessor(folder).get('size') if folder else None
    if crop:
      out['image_size'] = int(crop)
  return fam, out


def preprocessor(folder) -> dict:
  """{'mean', 'std', 'size'} of the folder's preprocessor_config.json ({} without one):
  the normalisation and the square input size the tower was trained on."""
  file = pathlib.Path(folder) / 'preprocessor_config.json'
  if not file.is_file():
    return {}
  p = json.loads(file.read_text(encoding='utf-8'))
  out = {}
  if p.get('image_mean') and p.get('image_std'):
    out.update(mean=tuple(float(x) for x in p['image_mean']),
               std=tuple(float(x) for x in p['image_std']))
  size = p.get('crop_size') if p.get('do_center_crop', 'crop_size' in p) else p.get('size')
  if isinstance(size, dict):
    side = size.get('height', size.get('shortest_edge'))
    if size.get('width', side) == side:
      size = side
  if isinstance(size, int):
    out['size'] = size
  return out


# Export ---------------------------------------------------------------------------------

def family(vision_cfg) -> str:
  """The transformers class whose forward pass is our tower's, by its layout options."""
  fam = vit.transformers_family(vision_cfg)
  if fam is None:
    raise ConfigError(
        f'config.model.vision: the layout {vit.options(vision_cfg)} is none of the '
        f'transformers vision towers {sorted(CLASSES.values())}, so it cannot be exported '
        'to one exactly. Use the layout of one (models/presets.py: CLIP_LAYOUT, '
        'SIGLIP_LAYOUT, DINOV2_LAYOUT, or the defaults for ViTModel).')
  return fam


def config_json(vision_cfg) -> dict:
  """config.json of the transformers class of `family(vision_cfg)`."""
  fam, v, o = family(vision_cfg), vision_cfg, vit.options(vision_cfg)
  out = dict(architectures=[CLASSES[fam]], model_type=MODEL_TYPES[fam],
             hidden_size=v.width, num_hidden_layers=v.depth, num_attention_heads=v.heads,
             hidden_act=o['activation'], layer_norm_eps=float(o['layer_norm_eps']),
             image_size=v.image_size, patch_size=v.patch_size, num_channels=3,
             dtype='float32')
  if fam in ('clip', 'siglip'):
    out.update(intermediate_size=v.mlp_dim, attention_dropout=v.attention_dropout)
    if fam == 'siglip':
      out['vision_use_head'] = True
    return out
  out.update(hidden_dropout_prob=v.dropout, attention_probs_dropout_prob=v.attention_dropout,
             initializer_range=0.02, qkv_bias=True)
  if fam == 'vit':
    return dict(out, intermediate_size=v.mlp_dim, encoder_stride=v.patch_size,
                pooler_output_size=v.width, pooler_act='tanh')
  ratio = v.mlp_dim / v.width
  if int(v.width * ratio) != v.mlp_dim:
    raise ConfigError(f'config.model.vision.mlp_dim={v.mlp_dim}: DINOv2 sets its MLP as '
                      f'hidden_size x mlp_ratio, which no ratio gives for width {v.width}.')
  out.update(image_size=(o['position_grid'] or v.image_size // v.patch_size) * v.patch_size,
             mlp_ratio=int(ratio) if ratio == int(ratio) else ratio,
             layerscale_value=float(o['layer_scale']), use_swiglu_ffn=False,
             drop_path_rate=0.0)
  if fam == 'dinov2':
    return dict(out, use_mask_token=bool(o['mask_token']))
  return dict(out, num_register_tokens=int(o['registers']))


def rules(fam: str, vision_cfg, root: tuple = ()) -> list:
  """The tensor names of `fam` for our tower of `vision_cfg` (keys.py)."""
  o = vit.options(vision_cfg)
  if fam == 'vit':
    return keys.vit_rules(vision_cfg.depth, root)
  if fam == 'clip':
    return keys.clip_rules(vision_cfg.depth, root)
  if fam == 'siglip':
    return keys.siglip_rules(vision_cfg.depth, root)
  return keys.dinov2_rules(vision_cfg.depth, root, registers=o['registers'] > 0,
                           mask_token=bool(o['mask_token']))

