"""The PyTorch peer of our train step, for `benchmarks/train_throughput.py`.

A plain PyTorch training step of the same COOKIE model: transformers' `ViTModel` and
`BertModel` with our preset's sizes (the configs our exporter writes), the shared
transformer of the exported `CookieTorchModel` (transformers' `ViTLayer`s), the same
pooling and heads, the same symmetric InfoNCE terms and weights, and `torch.optim.AdamW`
with the same hyper-parameters, weight-decay mask and global-norm clipping. Nothing here
is tuned beyond what a PyTorch user would write, except `torch.compile` where asked.
"""

import torch
import torch.nn.functional as F
import transformers

from cookie_jax.interop import hf_export, torch_model
from cookie_jax.optim import NO_DECAY_NAMES


def build_model(model_cfg, *, attn_implementation: str = 'sdpa'
                ) -> torch_model.CookieTorchModel:
  text_cfg = transformers.BertConfig(**hf_export.bert_config(model_cfg.text))
  vision_cfg = transformers.ViTConfig(**hf_export.vit_config(model_cfg.vision))
  for cfg in (text_cfg, vision_cfg):
    cfg._attn_implementation = attn_implementation  # pylint: disable=protected-access
  model = torch_model.CookieTorchModel(
      hf_export.cookie_config(model_cfg), transformers.BertModel(text_cfg),
      transformers.ViTModel(vision_cfg))
  return model.train()


def info_nce(a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
  """Symmetric InfoNCE of row-aligned L2-normalised embeddings (open_clip's ClipLoss)."""
  logits = scale * (a.float() @ b.float().T)
  labels = torch.arange(a.shape[0], device=a.device)
  return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def optimizer(model: torch.nn.Module, optim_cfg, **kwargs) -> torch.optim.AdamW:
  """AdamW with our decay mask: matrices decay, vectors, positions, CLS, poolers do not."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    names = name.split('.')
    skip = p.ndim < 2 or any(n in NO_DECAY_NAMES for n in names) or 'cls_token' in names
    (no_decay if skip else decay).append(p)
  groups = [dict(params=decay, weight_decay=optim_cfg.weight_decay),
            dict(params=no_decay, weight_decay=0.0)]
  return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2),
                           eps=optim_cfg.eps, **kwargs)


def loss_fn(model, batch, loss_cfg) -> torch.Tensor:
  """The weighted sum of the COOKIE terms with weight > 0, as `cookie_jax.step`."""
  image = model.embed_image(batch['pixel_values'])
  text = model.embed_text(batch['input_ids'], batch['attention_mask'])
  norm = torch_model.l2_normalize
  total = 0.0
  if loss_cfg.cross_modal.weight > 0:
    total = total + loss_cfg.cross_modal.weight * info_nce(norm(image), norm(text),
                                                           model.logit_scale())
  if loss_cfg.visual.weight > 0:
    view2 = model.encode_image(batch['pixel_values_view2'])
    total = total + loss_cfg.visual.weight * info_nce(
        norm(image), view2, 1.0 / loss_cfg.visual.temperature)
  if loss_cfg.textual.weight > 0:  # a second pass: another dropout mask
    text2 = model.encode_text(batch['input_ids'], batch['attention_mask'])
    total = total + loss_cfg.textual.weight * info_nce(
        norm(text), text2, 1.0 / loss_cfg.textual.temperature)
  return total


class TorchTrainer:
  """`step()` runs one update on the fixed batch; `sync()` waits for the device."""

  def __init__(self, config, batch: dict, *, device: str = 'cpu', dtype: str = 'float32',
               compile_model: bool = False, fused_adamw: bool | None = None):
    self.device = torch.device(device)
    self.model = build_model(config.model).to(self.device)
    self.loss_cfg = config.loss
    self.clip = config.optim.clip_norm
    kwargs = {} if fused_adamw is None else {'fused': fused_adamw}
    self.opt = optimizer(self.model, config.optim, **kwargs)
    self.batch = {k: v.to(self.device) for k, v in batch.items()}
    self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                     if dtype == 'bfloat16' else None)
    self._loss = loss_fn
    if compile_model:
      self._loss = torch.compile(loss_fn)

  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def step(self) -> torch.Tensor:
    self.opt.zero_grad(set_to_none=True)
    if self.autocast is not None:
      with self.autocast:
        loss = self._loss(self.model, self.batch, self.loss_cfg)
    else:
      loss = self._loss(self.model, self.batch, self.loss_cfg)
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    return loss

  def sync(self) -> None:
    if self.device.type == 'cuda':
      torch.cuda.synchronize()


def torch_batch(batch: dict) -> dict:
  """Our NHWC numpy batch as torch tensors (NCHW pixels), the same values."""
  out = {'pixel_values': torch.from_numpy(batch['image']).permute(0, 3, 1, 2).contiguous(),
         'input_ids': torch.from_numpy(batch['input_ids']).long(),
         'attention_mask': torch.from_numpy(batch['attention_mask']).long()}
  if 'image_view2' in batch:
    out['pixel_values_view2'] = torch.from_numpy(batch['image_view2']).permute(
        0, 3, 1, 2).contiguous()
  return out
