"""COOKIE in PyTorch: the exported model, built from transformers' own `BertModel` (or the
RoBERTa / XLM-R model of text_encoder/), `ViTModel` (or the CLIP / SigLIP / DINOv2 vision
model of image_encoder/) and `ViTLayer`.

Needs torch, transformers (>= 5) and safetensors only; no JAX and no cookie_jax install.
The export copies this file next to the weights, so on a PyTorch-only machine:

    import sys; sys.path.insert(0, OUT)
    from torch_model import CookieTorchModel
    model = CookieTorchModel.from_pretrained(OUT)
    image = model.encode_image(pixel_values)              # [B, 3, H, W], normalised pixels
    text = model.encode_text(input_ids, attention_mask)   # tokenizer of OUT/text_encoder
    video = model.encode_video(frames)                    # [B, T, 3, H, W]: 'mean' video

gives the L2-normalised embeddings of the JAX model it was exported from.
"""

import inspect
import json
import math
import os

from safetensors.torch import load_file
import torch
from torch import nn
import transformers
from transformers.models.vit.modeling_vit import ViTLayer

_NEEDS_5 = (f'transformers {transformers.__version__}: CookieTorchModel needs transformers>=5, '
            'whose ViTLayer takes the attention mask that the text path of the shared layers '
            'needs (the text_encoder/ and image_encoder/ folders alone also load in 4.x).')
try:
  from transformers.masking_utils import create_bidirectional_mask
except ImportError as e:
  raise ImportError(_NEEDS_5) from e

IMAGE, TEXT = 0, 1
FORMAT = 'cookie_jax.torch/1'
CONFIG_NAME = 'cookie_config.json'
WEIGHTS_NAME = 'cookie.safetensors'

# cookie.safetensors names the shared layers as the original (4.x) `ViTLayer` does, like
# the exported towers; these are the installed `ViTLayer`'s names where they differ.
_LAYER_NAMES = {
    'attention.attention.query': 'attention.q_proj',
    'attention.attention.key': 'attention.k_proj',
    'attention.attention.value': 'attention.v_proj',
    'attention.output.dense': 'attention.o_proj',
    'intermediate.dense': 'mlp.fc1',
    'output.dense': 'mlp.fc2',
}


def _module_key(key: str) -> str:
  parts = key.split('.')
  if parts[:2] == ['shared', 'layer'] and len(parts) > 4:
    stem = '.'.join(parts[3:-1])
    if stem in _LAYER_NAMES:
      return '.'.join(parts[:3] + [_LAYER_NAMES[stem], parts[-1]])
  return key


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
  x = x.float()
  return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=eps * eps))


def pool(x: torch.Tensor, mask: torch.Tensor | None, how: str, *,
         skip: int) -> torch.Tensor:
  """'cls': the first token. 'mean': the mean over real tokens after the first `skip`
  (image: the patches, without the class token and registers)."""
  if how == 'cls':
    return x[:, 0]
  if skip:
    x = x[:, skip:]
    mask = None if mask is None else mask[:, skip:]
  if mask is None:
    return x.mean(dim=1)
  m = mask.to(x.dtype)[..., None]
  return (x * m).sum(dim=1) / torch.clamp(m.sum(dim=1), min=1.0)


class SharedTransformer(nn.Module):
  """The weight-sharing transformer: per-modality input Linears, an optional modality
  vector, the same pre-LN `ViTLayer`s for both paths, a final LayerNorm."""

  def __init__(self, cfg: dict, *, image_width: int, text_width: int, eps: float,
               attn_implementation: str):
    super().__init__()
    if 'attention_mask' not in inspect.signature(ViTLayer.forward).parameters:
      raise ImportError(_NEEDS_5)
    width = cfg['width']
    self.config = transformers.ViTConfig(
        hidden_size=width, num_hidden_layers=cfg['depth'], num_attention_heads=cfg['heads'],
        intermediate_size=cfg['mlp_dim'], hidden_act='gelu',
        hidden_dropout_prob=cfg['dropout'],
        attention_probs_dropout_prob=cfg['attention_dropout'], layer_norm_eps=eps,
        qkv_bias=True)
    self.config._attn_implementation = attn_implementation
    self.image_in = nn.Linear(image_width, width)
    self.text_in = nn.Linear(text_width, width)
    self.modality_embedding = (nn.Parameter(torch.zeros(2, width))
                               if cfg['modality_embedding'] else None)
    self.layer = nn.ModuleList([ViTLayer(self.config) for _ in range(cfg['depth'])])
    self.modality_layernorm = cfg['modality_layernorm']
    if self.modality_layernorm:
      self.image_norm = nn.LayerNorm(width, eps=eps)
      self.text_norm = nn.LayerNorm(width, eps=eps)
    else:
      self.norm = nn.LayerNorm(width, eps=eps)

  def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
              modality: int) -> torch.Tensor:
    x = (self.image_in if modality == IMAGE else self.text_in)(tokens)
    if self.modality_embedding is not None:
      x = x + self.modality_embedding[modality]
    # Padded text tokens are never attended to, as in the JAX model's boolean mask.
    mask = None if attention_mask is None else create_bidirectional_mask(
        config=self.config, inputs_embeds=x, attention_mask=attention_mask)
    for layer in self.layer:
      x = layer(x, mask)
    if self.modality_layernorm:
      return (self.image_norm if modality == IMAGE else self.text_norm)(x)
    return self.norm(x)


class CookieTorchModel(nn.Module):
  """Image tower, text tower, shared transformer, pooling, projection heads, temperature."""

  def __init__(self, config: dict, text: transformers.PreTrainedModel,
               vision: transformers.PreTrainedModel):
    super().__init__()
    if config.get('format') != FORMAT:
      raise ValueError(f"{CONFIG_NAME} has format {config.get('format')!r}; this loader "
                       f'reads {FORMAT!r}. Use the torch_model.py written with the export.')
    self.config = config
    self.text = text
    self.vision = vision
    shared = config['shared']
    if shared:
      attn = getattr(text.config, '_attn_implementation', None) or 'sdpa'
      self.shared = SharedTransformer(
          shared, image_width=config['image_width'], text_width=config['text_width'],
          eps=config['layer_norm_eps'], attn_implementation=attn)
      image_width = text_width = shared['width']
    else:
      self.shared = None
      image_width, text_width = config['image_width'], config['text_width']
    self.image_head = nn.Linear(image_width, config['embed_dim'], bias=False)
    self.text_head = nn.Linear(text_width, config['embed_dim'], bias=False)
    # Heads into external partner spaces (knowledge-sharing losses); kept for fine-tuning.
    for side in ('image', 'text'):
      dim = config[f'{side}_partner_dim']
      setattr(self, f'{side}_partner_head',
              nn.Linear(config['embed_dim'], dim, bias=False) if dim else None)
    self.log_logit_scale = nn.Parameter(torch.zeros(()))

  @classmethod
  def from_pretrained(cls, path, **tower_kwargs) -> 'CookieTorchModel':
    """Loads an export folder; `tower_kwargs` go to both towers' `from_pretrained`."""
    path = os.fspath(path)
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
      raise FileNotFoundError(f'{path} has no {CONFIG_NAME}; give the folder written by '
                              '`python launch/export_torch.py --output=...`.')
    with open(config_file, encoding='utf-8') as f:
      config = json.load(f)
    # BertModel, or the RobertaModel / XLMRobertaModel the text tower was exported as.
    text = transformers.AutoModel.from_pretrained(os.path.join(path, 'text_encoder'),
                                                  **tower_kwargs)
    # ViTModel, or the CLIPVisionModel / SiglipVisionModel / Dinov2Model the tower's
    # layout was exported as (its config.json says which).
    vision = transformers.AutoModel.from_pretrained(os.path.join(path, 'image_encoder'),
                                                    **tower_kwargs)
    model = cls(config, text, vision)
    model.load_cookie_weights(load_file(os.path.join(path, WEIGHTS_NAME)))
    return model.eval()

  def load_cookie_weights(self, tensors: dict) -> None:
    """Everything but the towers, from the tensors of cookie.safetensors."""
    state = {_module_key(k): v for k, v in tensors.items()}
    missing, unexpected = self.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(('text.', 'vision.'))]
    if missing or unexpected:
      raise ValueError(
          f'{WEIGHTS_NAME} does not fit the model of {CONFIG_NAME}: missing {missing[:5]}, '
          f'unexpected {unexpected[:5]}. Keep the two files of one export together.')

  def logit_scale(self) -> torch.Tensor:
    """1 / temperature, clamped as in training."""
    return torch.exp(torch.clamp(self.log_logit_scale,
                                 max=math.log(self.config['max_logit_scale'])))

  def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unnormalised image embeddings [B, embed_dim], fp32."""
    out = self.vision(pixel_values=pixel_values)
    if self.config['image_pool'] == 'tower':  # the tower's own pooled output
      return self.image_head(out.pooler_output).float()
    return self._embed_image_tokens(out.last_hidden_state)

  def embed_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unnormalised clip embeddings [B, embed_dim] of frames [B, T, 3, H, W]: the image
    tower on every frame, each token averaged over the frames (a video model with
    temporal='mean'), then the image path."""
    b, t = pixel_values.shape[:2]
    x = self.vision(pixel_values=pixel_values.flatten(0, 1)).last_hidden_state
    return self._embed_image_tokens(x.unflatten(0, (b, t)).mean(dim=1))

  def _embed_image_tokens(self, x: torch.Tensor) -> torch.Tensor:
    if self.shared is not None:
      x = self.shared(x, None, IMAGE)
    skip = self.config.get('image_prefix_tokens', 1)  # class token + registers
    return self.image_head(pool(x, None, self.config['image_pool'], skip=skip)).float()

  def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalised text embeddings [B, embed_dim], fp32."""
    x = self.text(input_ids=input_ids, attention_mask=attention_mask,
                  token_type_ids=token_type_ids).last_hidden_state
    if self.shared is not None:
      x = self.shared(x, attention_mask, TEXT)
    return self.text_head(pool(x, attention_mask, self.config['text_pool'], skip=0)).float()

  def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of normalised NCHW pixels."""
    return l2_normalize(self.embed_image(pixel_values))

  def encode_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised clip embeddings of normalised frames [B, T, 3, H, W]."""
    return l2_normalize(self.embed_video(pixel_values))

  def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised text embeddings; padding (mask 0) is ignored."""
    return l2_normalize(self.embed_text(input_ids, attention_mask, token_type_ids))

  def forward(self, pixel_values=None, input_ids=None, attention_mask=None) -> dict:
    """CLIP-style: the embeddings given, and image-text logits when both are."""
    out = {}
    if pixel_values is not None:
      out['image_embeds'] = self.encode_image(pixel_values)
    if input_ids is not None:
      if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
      out['text_embeds'] = self.encode_text(input_ids, attention_mask)
    if len(out) == 2:
      out['logits_per_image'] = (self.logit_scale() * out['image_embeds']
                                 @ out['text_embeds'].T)
    return out
