"""COOKIE as a transformers model: `AutoModel.from_pretrained(OUT, trust_remote_code=True)`.

Remote code: an export copies this file, `configuration_cookie.py` and `torch_model.py`
into its folder, and config.json names them in `auto_map`. The model itself is
`torch_model.CookieTorchModel` (the module code that `CookieTorchModel.from_pretrained`
loads from the tower folders), wrapped as a `PreTrainedModel` so that it loads, saves and
pushes to the Hub like any transformers model:

    model = AutoModel.from_pretrained(OUT, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(OUT)
    processor = AutoImageProcessor.from_pretrained(OUT, trust_remote_code=True)
    text = model.get_text_features(**tokenizer(captions, padding=True, return_tensors='pt'))
    image = model.get_image_features(**processor(pictures, return_tensors='pt'))
    logits = model(**inputs).logits_per_image          # [images, texts], as CLIPModel

The features are the L2-normalised embeddings of the JAX model it was exported from. It
needs torch, transformers (>= 5) and safetensors; no JAX.
"""

import dataclasses

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_cookie import CookieConfig
from .torch_model import CookieTorchModel


@dataclasses.dataclass
class CookieOutput(ModelOutput):
  """`loss` (with `return_loss`): the symmetric InfoNCE of the batch's pairs;
  `logits_per_image` [images, texts] and `logits_per_text` [texts, images]: the scaled
  cosine similarities; `image_embeds`, `text_embeds`: L2-normalised embeddings."""

  loss: torch.FloatTensor | None = None
  logits_per_image: torch.FloatTensor | None = None
  logits_per_text: torch.FloatTensor | None = None
  text_embeds: torch.FloatTensor | None = None
  image_embeds: torch.FloatTensor | None = None


class CookiePreTrainedModel(PreTrainedModel):
  config_class = CookieConfig
  config: CookieConfig
  base_model_prefix = 'cookie'
  main_input_name = 'pixel_values'
  input_modalities = ('image', 'text')
  _supports_sdpa = True
  _no_split_modules = ['BertLayer', 'RobertaLayer', 'XLMRobertaLayer', 'ViTLayer']


class CookieModel(CookiePreTrainedModel):
  """Image tower (ViT), text tower (BERT), weight-sharing transformer, pooling,
  projection heads and the learned temperature."""

  def __init__(self, config: CookieConfig):
    super().__init__(config)
    # Each tower's class follows its config's model_type (text: BERT, RoBERTa, XLM-R;
    # image: ViT, CLIP, SigLIP, DINOv2).
    self.cookie = CookieTorchModel(config.cookie, AutoModel.from_config(config.text_config),
                                   AutoModel.from_config(config.vision_config))
    self.post_init()

  def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """L2-normalised image embeddings [B, embed_dim] of pixels [B, 3, H, W] (normalised
    as the image processor of this folder does)."""
    del kwargs
    return self.cookie.encode_image(pixel_values)

  def get_video_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """L2-normalised clip embeddings of frames [B, T, 3, H, W] (a 'mean' video model)."""
    del kwargs
    if not self.config.cookie.get('video'):
      raise ValueError('This is an image-text model (cookie.video is null); use '
                       'get_image_features, or export a video model.')
    return self.cookie.encode_video(pixel_values)

  def get_text_features(self, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None,
                        token_type_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """L2-normalised text embeddings [B, embed_dim]; padding (mask 0) is ignored."""
    del kwargs
    if attention_mask is None:
      attention_mask = torch.ones_like(input_ids)
    return self.cookie.encode_text(input_ids, attention_mask, token_type_ids)

  def logit_scale(self) -> torch.Tensor:
    """1 / temperature, clamped as in training."""
    return self.cookie.logit_scale()

  def forward(self, input_ids: torch.Tensor | None = None,
              pixel_values: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None, return_loss: bool = False,
              **kwargs) -> CookieOutput:
    del kwargs
    out = CookieOutput()
    if pixel_values is not None:
      out.image_embeds = (self.get_video_features(pixel_values) if pixel_values.ndim == 5
                          else self.get_image_features(pixel_values))
    if input_ids is not None:
      out.text_embeds = self.get_text_features(input_ids, attention_mask, token_type_ids)
    if out.image_embeds is not None and out.text_embeds is not None:
      out.logits_per_image = self.logit_scale() * out.image_embeds @ out.text_embeds.T
      out.logits_per_text = out.logits_per_image.T
      if return_loss:
        if out.logits_per_image.shape[0] != out.logits_per_image.shape[1]:
          raise ValueError(f'return_loss needs image-text pairs, but there are '
                           f'{out.logits_per_image.shape[0]} images and '
                           f'{out.logits_per_image.shape[1]} texts.')
        target = torch.arange(len(out.logits_per_image), device=out.logits_per_image.device)
        out.loss = 0.5 * (nn.functional.cross_entropy(out.logits_per_image, target) +
                          nn.functional.cross_entropy(out.logits_per_text, target))
    return out


__all__ = ['CookieModel', 'CookiePreTrainedModel', 'CookieOutput']
