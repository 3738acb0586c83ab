r"""A COOKIE export with open_clip's interface, for LAION's CLIP_benchmark.

Needs torch, transformers (>= 5), tokenizers and safetensors; no JAX and no cookie_jax
install. The export copies this file into its folder OUT (beside torch_model.py and
image_processing_cookie.py, which it uses), so with CLIP_benchmark installed:

    python OUT/clip_benchmark_cookie.py eval --model_type=cookie --pretrained=OUT \
        --dataset=cifar10 --dataset_root=DATA/cifar10 --output=cifar10.json

runs CLIP_benchmark's own command line with one more `--model_type`, 'cookie', whose
`--pretrained` is the export folder. From Python, `load(OUT)` gives what CLIP_benchmark's
model loaders give, `(model, transform, tokenizer)`:

  model.encode_image(images)   images [B, 3, H, W] as `transform` makes them;
  model.encode_text(tokens)    token ids [B, L]; the attention mask is `tokens != pad id`;
  transform(pil_image)         cookie_jax's evaluation view, as a float32 [3, H, W] tensor;
  tokenizer(texts)             the training tokenizer: LongTensor [N, max_len], padded.

Embeddings are L2-normalised, equal to the JAX model's.
"""

import json
import os
import sys

import torch
from torch import nn

try:  # cookie_jax.interop.clip_benchmark_cookie
  from . import image_processing_cookie, torch_model
except ImportError:  # OUT/clip_benchmark_cookie.py, with OUT on sys.path
  import image_processing_cookie  # pylint: disable=g-import-not-at-top
  import torch_model  # pylint: disable=g-import-not-at-top

MODEL_TYPE = 'cookie'


def _read_json(path: str) -> dict:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


class CookieOpenCLIP(nn.Module):
  """`CookieTorchModel` behind open_clip's `encode_image` / `encode_text`."""

  def __init__(self, cookie: torch_model.CookieTorchModel, pad_id: int):
    super().__init__()
    self.cookie = cookie
    self.pad_id = pad_id

  def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    del normalize  # always L2-normalised
    return self.cookie.encode_image(image)

  def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    del normalize
    return self.cookie.encode_text(text, (text != self.pad_id).long())

  def forward(self, image=None, text=None):
    """(image features, text features, logit scale), as open_clip's CLIP.forward."""
    image = None if image is None else self.encode_image(image)
    text = None if text is None else self.encode_text(text)
    return image, text, self.cookie.logit_scale()


class Tokenizer:
  """open_clip's tokenizer interface: `tokenizer(texts)` -> LongTensor [N, max_len] of
  [CLS] text [SEP] [PAD]... (<s> text </s> <pad>...), truncated and padded as in
  training."""

  def __init__(self, path: str, max_len: int):
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
    self.tokenizer = HFTokenizer.from_file(path)
    # BERT's [PAD], or RoBERTa's / XLM-R's <pad>.
    self.pad_token = next((t for t in ('[PAD]', '<pad>')
                           if self.tokenizer.token_to_id(t) is not None), None)
    if self.pad_token is None:
      raise ValueError(f'{path} has no [PAD] (or <pad>) token; give the tokenizer of the '
                       'export.')
    self.pad_id = self.tokenizer.token_to_id(self.pad_token)
    self.context_length = max_len

  def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
    texts = [texts] if isinstance(texts, str) else list(texts)
    length = context_length or self.context_length
    self.tokenizer.enable_truncation(max_length=length)
    self.tokenizer.enable_padding(length=length, pad_id=self.pad_id, pad_token=self.pad_token)
    return torch.tensor([e.ids for e in self.tokenizer.encode_batch(texts)], dtype=torch.long)


class Transform:
  """PIL image (or HWC array) -> float32 [3, H, W]: `CookieImageProcessor`, the eval view."""

  def __init__(self, image_size: int, mean, std):
    self.processor = image_processing_cookie.CookieImageProcessor(
        size={'shortest_edge': image_size}, crop_size={'height': image_size,
                                                       'width': image_size},
        image_mean=list(mean), image_std=list(std))

  def __call__(self, image) -> torch.Tensor:
    return torch.from_numpy(self.processor(image, return_tensors='np')['pixel_values'][0])


def load(path, device='cpu'):
  """(model, transform, tokenizer) of the export folder `path`."""
  path = os.fspath(path)
  cfg_file = os.path.join(path, torch_model.CONFIG_NAME)
  tok_file = os.path.join(path, 'text_encoder', 'tokenizer.json')
  if not os.path.isfile(cfg_file) or not os.path.isfile(tok_file):
    raise FileNotFoundError(f'{path} lacks {torch_model.CONFIG_NAME} or '
                            'text_encoder/tokenizer.json: give the folder written by '
                            '`python launch/export_torch.py --output=...` (with its tokenizer).')
  cfg = _read_json(cfg_file)
  if 'image_mean' not in cfg:
    raise ValueError(f'{cfg_file} has no image_mean / image_std / max_len: the export was '
                     'written without its data config; export the run with '
                     'launch/export_torch.py.')
  size = _read_json(os.path.join(path, 'image_encoder', 'config.json'))['image_size']
  tokenizer = Tokenizer(tok_file, cfg['max_len'])
  model = CookieOpenCLIP(torch_model.CookieTorchModel.from_pretrained(path), tokenizer.pad_id)
  return model.to(device).eval(), Transform(size, cfg['image_mean'], cfg['image_std']), tokenizer


def load_for_clip_benchmark(model_name: str = '', pretrained: str = '', cache_dir=None,
                            device='cpu'):
  """CLIP_benchmark's loader signature (`clip_benchmark.models.TYPE2FUNC`): `pretrained`
  is the export folder; `model_name` and `cache_dir` are not used."""
  del model_name, cache_dir
  return load(pretrained, device)


def register() -> None:
  """Adds `--model_type=cookie` to CLIP_benchmark (in this process)."""
  from clip_benchmark import models  # pylint: disable=g-import-not-at-top
  models.TYPE2FUNC[MODEL_TYPE] = load_for_clip_benchmark
  if MODEL_TYPE not in models.MODEL_TYPES:
    models.MODEL_TYPES.append(MODEL_TYPE)  # the list the command line's choices are


def topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
  """CLIP_benchmark 1.6.2's `zeroshot_classification.accuracy`, its last line made valid
  for NumPy >= 2.4: it calls float() on a 1-element 1-d array, which NumPy now refuses
  ('only 0-dimensional arrays can be converted', LAION-AI/CLIP_benchmark issue #147)."""
  pred = output.topk(max(topk), 1, True, True)[1].t()
  correct = pred.eq(target.view(1, -1).expand_as(pred))
  return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def fix_clip_benchmark_accuracy() -> None:
  """Replaces CLIP_benchmark's top-k accuracy by `topk_accuracy` (in this process)."""
  from clip_benchmark.metrics import zeroshot_classification  # pylint: disable=g-import-not-at-top
  zeroshot_classification.accuracy = topk_accuracy


def main() -> None:
  """CLIP_benchmark's command line (`clip_benchmark eval ...`) with model type 'cookie'."""
  try:
    register()
    fix_clip_benchmark_accuracy()
    from clip_benchmark import cli  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    sys.exit(f'CLIP_benchmark, or a package it needs, is missing ({e}): pip install '
             'clip-benchmark (after torch and torchvision, e.g. their CPU builds: pip '
             'install torch torchvision --index-url https://download.pytorch.org/whl/cpu).')
  cli.main()


if __name__ == '__main__':
  main()
