"""The one table between our parameter paths and the PyTorch state-dict keys.

Import and export both read these rules, so that export -> import is the identity by
construction and a renamed parameter cannot be converted one way only. A rule is
`(torch key, path in our pure parameter dict, layout)`; layouts:

  'copy'   the same array (embeddings, LayerNorm scale/bias, biases, CLS, positions);
  'linear' torch `weight` [out, in] <-> our `kernel` [in, out];
  'conv'   torch [D, 3, p, p] (OIHW) <-> our [p, p, 3, D] (HWIO);
  'rows'   torch [N, D] (an `nn.Embedding` of positions) <-> our [1, N, D];
  'vector' torch [D] (CLIP's class embedding) <-> our [1, 1, D].

Tower keys are transformers' original (4.x) layout, which 4.x loads as is and 5.x
converts on load (5.x also writes it back on `save_pretrained`).

Pure Python and numpy: no JAX and no torch here.
"""

import re

import numpy as np

Rule = tuple[str, tuple, str]


def to_torch(array, layout: str) -> np.ndarray:
  a = np.asarray(array, np.float32)
  if layout == 'linear':
    a = a.T
  elif layout == 'conv':
    a = a.transpose(3, 2, 0, 1)
  elif layout in ('rows', 'vector'):
    a = a.reshape(a.shape[1:] if layout == 'rows' else a.shape[2:])
  return a.copy(order='C')  # contiguous for safetensors; 0-d stays 0-d


def from_torch(array, layout: str) -> np.ndarray:
  a = np.asarray(array, np.float32)
  if layout == 'linear':
    a = a.T
  elif layout == 'conv':
    a = a.transpose(2, 3, 1, 0)
  elif layout in ('rows', 'vector'):
    a = a.reshape((1,) + a.shape if layout == 'rows' else (1, 1) + a.shape)
  return a.copy(order='C')  # contiguous for safetensors; 0-d stays 0-d


def _dense(torch_name: str, path: tuple, bias: bool = True) -> list[Rule]:
  rules = [(f'{torch_name}.weight', path + ('kernel',), 'linear')]
  if bias:
    rules.append((f'{torch_name}.bias', path + ('bias',), 'copy'))
  return rules


def _norm(torch_name: str, path: tuple) -> list[Rule]:
  return [(f'{torch_name}.weight', path + ('scale',), 'copy'),
          (f'{torch_name}.bias', path + ('bias',), 'copy')]


def _vit_layer(prefix: str, path: tuple) -> list[Rule]:
  """One pre-LN block (`layers.PreNormBlock`) as a 4.x `ViTLayer`."""
  att = path + ('attention',)
  return (_norm(f'{prefix}.layernorm_before', path + ('layernorm_before',))
          + _dense(f'{prefix}.attention.attention.query', att + ('query',))
          + _dense(f'{prefix}.attention.attention.key', att + ('key',))
          + _dense(f'{prefix}.attention.attention.value', att + ('value',))
          + _dense(f'{prefix}.attention.output.dense', att + ('out',))
          + _norm(f'{prefix}.layernorm_after', path + ('layernorm_after',))
          + _dense(f'{prefix}.intermediate.dense', path + ('intermediate',))
          + _dense(f'{prefix}.output.dense', path + ('output',)))


def bert_rules(depth: int, root: tuple = ()) -> list[Rule]:
  """`BertModel`, `RobertaModel` or `XLMRobertaModel` (pooler included; the three name
  their tensors alike) <-> our `Bert` at `root` in the parameter dict."""
  rules = [
      ('embeddings.word_embeddings.weight', root + ('word_embeddings', 'embedding'), 'copy'),
      ('embeddings.position_embeddings.weight', root + ('position_embeddings', 'embedding'),
       'copy'),
      ('embeddings.token_type_embeddings.weight',
       root + ('token_type_embeddings', 'embedding'), 'copy'),
  ] + _norm('embeddings.LayerNorm', root + ('embeddings_norm',))
  for i in range(depth):
    prefix, path = f'encoder.layer.{i}', root + ('layer', i)
    att = path + ('attention',)
    rules += (_dense(f'{prefix}.attention.self.query', att + ('query',))
              + _dense(f'{prefix}.attention.self.key', att + ('key',))
              + _dense(f'{prefix}.attention.self.value', att + ('value',))
              + _dense(f'{prefix}.attention.output.dense', att + ('out',))
              + _norm(f'{prefix}.attention.output.LayerNorm', path + ('attention_norm',))
              + _dense(f'{prefix}.intermediate.dense', path + ('intermediate',))
              + _dense(f'{prefix}.output.dense', path + ('output',))
              + _norm(f'{prefix}.output.LayerNorm', path + ('output_norm',)))
  return rules + _dense('pooler.dense', root + ('pooler',))


def vit_rules(depth: int, root: tuple = ()) -> list[Rule]:
  """`ViTModel` (pooler included) <-> our `ViT` at `root` in the parameter dict."""
  rules = [
      ('embeddings.cls_token', root + ('cls_token',), 'copy'),
      ('embeddings.position_embeddings', root + ('position_embeddings',), 'copy'),
      ('embeddings.patch_embeddings.projection.weight', root + ('patch_embeddings', 'kernel'),
       'conv'),
      ('embeddings.patch_embeddings.projection.bias', root + ('patch_embeddings', 'bias'),
       'copy'),
  ]
  for i in range(depth):
    rules += _vit_layer(f'encoder.layer.{i}', root + ('layer', i))
  return rules + _norm('layernorm', root + ('layernorm',)) + _dense('pooler.dense',
                                                                  root + ('pooler',))


def _encoder_layer(prefix: str, path: tuple) -> list[Rule]:
  """One pre-LN block as a `CLIPEncoderLayer` / `SiglipEncoderLayer`."""
  att = path + ('attention',)
  return (_norm(f'{prefix}.layer_norm1', path + ('layernorm_before',))
          + _dense(f'{prefix}.self_attn.q_proj', att + ('query',))
          + _dense(f'{prefix}.self_attn.k_proj', att + ('key',))
          + _dense(f'{prefix}.self_attn.v_proj', att + ('value',))
          + _dense(f'{prefix}.self_attn.out_proj', att + ('out',))
          + _norm(f'{prefix}.layer_norm2', path + ('layernorm_after',))
          + _dense(f'{prefix}.mlp.fc1', path + ('intermediate',))
          + _dense(f'{prefix}.mlp.fc2', path + ('output',)))


# CLIPVisionModel and SiglipVisionModel keys carry this prefix in the original (4.x)
# layout, as the vision half of a full CLIPModel / SiglipModel does.
TOWER_PREFIX = 'vision_model.'


def clip_rules(depth: int, root: tuple = ()) -> list[Rule]:
  """`CLIPVisionModel` <-> our `ViT` with CLIP's layout."""
  p = TOWER_PREFIX
  rules = [(f'{p}embeddings.class_embedding', root + ('cls_token',), 'vector'),
           (f'{p}embeddings.patch_embedding.weight', root + ('patch_embeddings', 'kernel'),
            'conv'),
           (f'{p}embeddings.position_embedding.weight', root + ('position_embeddings',),
            'rows')] + _norm(f'{p}pre_layrnorm', root + ('pre_layernorm',))
  for i in range(depth):
    rules += _encoder_layer(f'{p}encoder.layers.{i}', root + ('layer', i))
  return rules + _norm(f'{p}post_layernorm', root + ('layernorm',))


def siglip_rules(depth: int, root: tuple = ()) -> list[Rule]:
  """`SiglipVisionModel` (attention-pooling head included) <-> our `ViT` with SigLIP's
  layout."""
  p, head = TOWER_PREFIX, root + ('head',)
  rules = [(f'{p}embeddings.patch_embedding.weight', root + ('patch_embeddings', 'kernel'),
            'conv'),
           (f'{p}embeddings.patch_embedding.bias', root + ('patch_embeddings', 'bias'), 'copy'),
           (f'{p}embeddings.position_embedding.weight', root + ('position_embeddings',),
            'rows')]
  for i in range(depth):
    rules += _encoder_layer(f'{p}encoder.layers.{i}', root + ('layer', i))
  return (rules + _norm(f'{p}post_layernorm', root + ('layernorm',))
          + [(f'{p}head.probe', head + ('probe',), 'copy'),
             (f'{p}head.attention.in_proj_weight', head + ('in_proj', 'kernel'), 'linear'),
             (f'{p}head.attention.in_proj_bias', head + ('in_proj', 'bias'), 'copy')]
          + _dense(f'{p}head.attention.out_proj', head + ('out_proj',))
          + _norm(f'{p}head.layernorm', head + ('layernorm',))
          + _dense(f'{p}head.mlp.fc1', head + ('fc1',))
          + _dense(f'{p}head.mlp.fc2', head + ('fc2',)))


def dinov2_rules(depth: int, root: tuple = (), *, registers: bool,
                 mask_token: bool) -> list[Rule]:
  """`Dinov2Model` / `Dinov2WithRegistersModel` <-> our `ViT` with DINOv2's layout."""
  rules = [
      ('embeddings.cls_token', root + ('cls_token',), 'copy'),
      ('embeddings.position_embeddings', root + ('position_embeddings',), 'copy'),
      ('embeddings.patch_embeddings.projection.weight', root + ('patch_embeddings', 'kernel'),
       'conv'),
      ('embeddings.patch_embeddings.projection.bias', root + ('patch_embeddings', 'bias'),
       'copy')]
  if mask_token:
    rules.append(('embeddings.mask_token', root + ('mask_token',), 'copy'))
  if registers:
    rules.append(('embeddings.register_tokens', root + ('register_tokens',), 'copy'))
  for i in range(depth):
    prefix, path = f'encoder.layer.{i}', root + ('layer', i)
    att = path + ('attention',)
    rules += (_norm(f'{prefix}.norm1', path + ('layernorm_before',))
              + _dense(f'{prefix}.attention.attention.query', att + ('query',))
              + _dense(f'{prefix}.attention.attention.key', att + ('key',))
              + _dense(f'{prefix}.attention.attention.value', att + ('value',))
              + _dense(f'{prefix}.attention.output.dense', att + ('out',))
              + [(f'{prefix}.layer_scale1.lambda1', path + ('layer_scale1',), 'copy')]
              + _norm(f'{prefix}.norm2', path + ('layernorm_after',))
              + _dense(f'{prefix}.mlp.fc1', path + ('intermediate',))
              + _dense(f'{prefix}.mlp.fc2', path + ('output',))
              + [(f'{prefix}.layer_scale2.lambda1', path + ('layer_scale2',), 'copy')])
  return rules + _norm('layernorm', root + ('layernorm',))


def cookie_rules(model_cfg) -> list[Rule]:
  """Everything above the towers: the file `cookie.safetensors` of an export."""
  rules = []
  s = model_cfg.shared
  if s.depth > 0:
    root = ('shared',)
    rules += _dense('shared.image_in', root + ('image_in',))
    rules += _dense('shared.text_in', root + ('text_in',))
    if s.modality_embedding:
      rules.append(('shared.modality_embedding', root + ('modality_embedding',), 'copy'))
    for i in range(s.depth):
      rules += _vit_layer(f'shared.layer.{i}', root + ('layer', i))
    if s.modality_layernorm:
      rules += _norm('shared.image_norm', root + ('image_norm',))
      rules += _norm('shared.text_norm', root + ('text_norm',))
    else:
      rules += _norm('shared.norm', root + ('norm',))
  rules += _dense('image_head', ('image_head',), bias=False)
  rules += _dense('text_head', ('text_head',), bias=False)
  for side in ('image', 'text'):
    if model_cfg[f'{side}_partner_dim']:
      rules += _dense(f'{side}_partner_head', (f'{side}_partner_head',), bias=False)
  return rules + [('log_logit_scale', ('log_logit_scale',), 'copy')]


# Checkpoints in other layouts of the same architectures, mapped onto the 4.x keys above.
_BERT_LEGACY = ((re.compile(r'^bert\.'), ''),            # BertFor* task models
                (re.compile(r'LayerNorm\.gamma$'), 'LayerNorm.weight'),  # TF-era names
                (re.compile(r'LayerNorm\.beta$'), 'LayerNorm.bias'))
_VIT_LEGACY = ((re.compile(r'^vit\.'), ''),              # ViTFor* task models
               # transformers 5.x module names (a raw `state_dict()` saved by hand).
               (re.compile(r'^layers\.(\d+)\.'), r'encoder.layer.\1.'),
               (re.compile(r'\.attention\.q_proj\.'), '.attention.attention.query.'),
               (re.compile(r'\.attention\.k_proj\.'), '.attention.attention.key.'),
               (re.compile(r'\.attention\.v_proj\.'), '.attention.attention.value.'),
               (re.compile(r'\.attention\.o_proj\.'), '.attention.output.dense.'),
               (re.compile(r'\.mlp\.fc1\.'), '.intermediate.dense.'),
               (re.compile(r'\.mlp\.fc2\.'), '.output.dense.'))


# transformers 5.x writes a CLIPVisionModel / SiglipVisionModel without the prefix.
_TOWER_LEGACY = ((re.compile(r'^(?!vision_model\.|text_model\.|logit_|text_projection|'
                             r'visual_projection)'), TOWER_PREFIX),)
_DINOV2_LEGACY = ((re.compile(r'^dinov2(_with_registers)?\.'), ''),  # Dinov2For* task models
                  (re.compile(r'\.attention\.q_proj\.'), '.attention.attention.query.'),
                  (re.compile(r'\.attention\.k_proj\.'), '.attention.attention.key.'),
                  (re.compile(r'\.attention\.v_proj\.'), '.attention.attention.value.'),
                  (re.compile(r'\.attention\.o_proj\.'), '.attention.output.dense.'))
# RobertaFor* / XLMRobertaFor* task models; their encoders are BERT's.
_ROBERTA_LEGACY = ((re.compile(r'^roberta\.'), ''),) + _BERT_LEGACY[1:]
_LEGACY = {'bert': _BERT_LEGACY, 'roberta': _ROBERTA_LEGACY, 'xlm-roberta': _ROBERTA_LEGACY,
           'vit': _VIT_LEGACY, 'clip': _TOWER_LEGACY,
           'siglip': _TOWER_LEGACY, 'dinov2': _DINOV2_LEGACY,
           'dinov2_with_registers': _DINOV2_LEGACY}


def normalize_keys(tensors: dict, model_type: str) -> dict:
  """Renames the keys of other layouts of a checkpoint to the 4.x layout (`model_type`:
  a text family of `hf_text.CLASSES` or a vision family of `hf_vision.CLASSES`)."""
  table = _LEGACY[model_type]
  out = {}
  for key, value in tensors.items():
    for pattern, repl in table:
      key = pattern.sub(repl, key)
    out[key] = value
  return out


def get_path(tree, path):
  """The leaf of the nested dict `tree` at the key tuple `path` (a rule's `ours`)."""
  for k in path:
    tree = tree[k]
  return tree
