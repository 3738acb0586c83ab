"""Frozen pretrained unimodal "partner" encoders for the knowledge-sharing losses.

`load_partner_encoder(path)` imports a local Hugging Face BERT or ViT folder into our own
tower and returns a jitted, frozen `batch -> embeddings` in JAX: for example
all-MiniLM-L6-v2 as a sentence-transformers model (mean over real tokens, L2-normalised),
to fill `batch['text_partner']` for `loss.textual.partner='external'` with
`model.text_partner_dim = encoder.dim`. Its token ids must come from the partner's own
tokenizer (the folder's tokenizer.json / vocab.txt).
"""

import json
import pathlib

from flax import nnx
import jax

from cookie_jax.config import ConfigError
from cookie_jax.interop import hf_import
from cookie_jax.models.cookie import l2_normalize, pool as pool_tokens

POOLS = ('mean', 'cls', 'pooler')


def _default_pool(folder: pathlib.Path, tower: str) -> str:
  # A sentence-transformers folder says how it pools; otherwise CLS for images (as
  # ViTModel's pooler reads it) and the masked mean for text.
  st = folder / '1_Pooling' / 'config.json'
  if st.is_file():
    modes = json.loads(st.read_text(encoding='utf-8'))
    if modes.get('pooling_mode_cls_token'):
      return 'cls'
    if modes.get('pooling_mode_mean_tokens'):
      return 'mean'
  return 'cls' if tower == 'vision' else 'mean'


class PartnerEncoder:
  """`encoder(batch)` -> L2-normalised fp32 embeddings [B, dim], without gradients.

  A text partner reads `batch['input_ids']` and `batch['attention_mask']`; an image
  partner reads `batch['image']` (NHWC, normalised as its checkpoint expects).
  """

  def __init__(self, path, *, pool: str | None = None):
    folder = pathlib.Path(path).expanduser()
    cfg_file = folder / 'config.json'
    if not cfg_file.is_file():
      raise FileNotFoundError(f'Partner encoder {str(path)!r}: no config.json there; give a '
                              'local Hugging Face BERT or ViT folder.')
    model_type = json.loads(cfg_file.read_text(encoding='utf-8')).get('model_type')
    towers = {'bert': 'text', 'vit': 'vision'}
    if model_type not in towers:
      raise ConfigError(f'Partner encoder {str(path)!r}: model_type={model_type!r}; a '
                        "partner is a BERT ('bert') or ViT ('vit') checkpoint.")
    self.tower = towers[model_type]
    self.pool = pool or _default_pool(folder, self.tower)
    if self.pool not in POOLS:
      raise ConfigError(f'Partner encoder pool={self.pool!r}: use one of {POOLS}.')
    module, cfg = hf_import.load_tower(folder, self.tower)
    self.dim = cfg.width
    graphdef, self._state = nnx.split(module)
    tower, how = self.tower, self.pool

    def encode(state, inputs):
      m = nnx.merge(graphdef, state)
      if tower == 'text':
        mask = inputs['attention_mask']
        x = m(inputs['input_ids'], mask)
      else:
        mask = None
        x = m(inputs['image'])
      if how == 'pooler':
        y = m.pooled(x)
      else:
        y = pool_tokens(x, mask, how, skip=m.prefix if tower == 'vision' else 0)
      return jax.lax.stop_gradient(l2_normalize(y))
    self._encode = jax.jit(encode)

  def __call__(self, batch) -> jax.Array:
    names = ('input_ids', 'attention_mask') if self.tower == 'text' else ('image',)
    missing = [n for n in names if n not in batch]
    if missing:
      raise ValueError(f'The {self.tower} partner encoder needs batch{missing}; the batch '
                       f'has {sorted(batch)}.')
    return self._encode(self._state, {n: batch[n] for n in names})


def load_partner_encoder(path, *, pool: str | None = None) -> PartnerEncoder:
  """A frozen imported tower as `batch -> embeddings` (see `PartnerEncoder`)."""
  return PartnerEncoder(path, pool=pool)
