"""The text tower: BERT laid out like transformers' `BertModel`, pooler included, with the
options that make it `RobertaModel` / `XLMRobertaModel` exactly (`OPTIONS`).

Options (config.model.text.*; the defaults are `BertModel`'s):
  positions       'absolute': token t has position t (BERT). 'after_padding': fairseq's
                  positions, as transformers' `create_position_ids_from_input_ids`
                  computes them: the i-th token that is not `pad_token_id` has position
                  pad_token_id + i (i from 1), a padding token has pad_token_id itself
                  (RoBERTa, XLM-R). They follow the ids, not the attention mask;
  pad_token_id    the padding id those positions count past (RoBERTa and XLM-R: 1);
  layer_norm_eps  every LayerNorm's epsilon (BERT 1e-12, RoBERTa and XLM-R 1e-5);
  hf_class        the transformers class an export writes: 'BertModel' (positions
                  'absolute'), 'RobertaModel' or 'XLMRobertaModel' (the same computation
                  under two names; positions 'after_padding').
RoBERTa and XLM-R have one token type (`type_vocab_size` 1, a size).
"""

from flax import nnx
import jax
import jax.numpy as jnp

from cookie_jax.models import layers

OPTIONS = dict(positions='absolute', pad_token_id=0, layer_norm_eps=layers.LAYER_NORM_EPS,
               hf_class='BertModel')
POSITIONS = ('absolute', 'after_padding')
# transformers class -> the positions it computes.
HF_CLASSES = {'BertModel': 'absolute', 'RobertaModel': 'after_padding',
              'XLMRobertaModel': 'after_padding'}


def options(cfg) -> dict:
  """The text options of `cfg`, a default for any it lacks (configs saved before them)."""
  return {k: cfg.get(k, v) for k, v in OPTIONS.items()}


def position_ids(input_ids: jax.Array, positions: str, pad_token_id: int) -> jax.Array:
  """[B, T] (or [1, T] for 'absolute') position ids of `input_ids` (see `OPTIONS`)."""
  if positions == 'absolute':
    return jnp.arange(input_ids.shape[1])[None]
  real = (input_ids != pad_token_id).astype(jnp.int32)
  return jnp.cumsum(real, axis=1) * real + pad_token_id


def _embed(num: int, width: int, axes, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(num, width, dtype=jnp.float32, param_dtype=jnp.float32,
                   embedding_init=layers.normal_init(),
                   embedding_metadata={'logical_axes': axes}, rngs=rngs)


class Bert(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, post-LN blocks.

  `__call__(input_ids, attention_mask)` returns every token's state [B, T, width]; padded
  positions are computed but never attended to.
  """

  def __init__(self, cfg, *, dtype, remat: bool | str = False, rngs: nnx.Rngs):
    o = options(cfg)
    self.dropout_rate = cfg.dropout
    self.remat = remat
    self.max_positions = cfg.max_positions
    self.positions, self.pad_token_id = o['positions'], int(o['pad_token_id'])
    eps = float(o['layer_norm_eps'])
    self.word_embeddings = _embed(cfg.vocab_size, cfg.width, ('vocab', 'embed'), rngs)
    self.position_embeddings = _embed(cfg.max_positions, cfg.width, ('length', 'embed'), rngs)
    self.token_type_embeddings = _embed(cfg.type_vocab_size, cfg.width, (None, 'embed'), rngs)
    self.embeddings_norm = layers.layer_norm(cfg.width, rngs=rngs, eps=eps)
    self.layer = nnx.List([
        layers.PostNormBlock(cfg.width, cfg.heads, cfg.mlp_dim, dropout_rate=cfg.dropout,
                             attention_dropout=cfg.attention_dropout, dtype=dtype, rngs=rngs,
                             eps=eps)
        for _ in range(cfg.depth)])
    # BertModel's pooler (dense + tanh on [CLS]). COOKIE pools on its own and never calls
    # it; it is kept so that a pretrained checkpoint imports and exports whole.
    self.pooler = layers.dense(cfg.width, cfg.width, ('embed', None), dtype=dtype, rngs=rngs)

  def pooled(self, hidden: jax.Array) -> jax.Array:
    """BertModel's `pooler_output` of the states returned by `__call__`."""
    return jnp.tanh(self.pooler(hidden[:, 0]).astype(jnp.float32))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None, *,
               rng: jax.Array | None = None) -> jax.Array:
    r_embed, r_blocks = layers.split_rng(rng, 2)
    t = input_ids.shape[1]
    # 'after_padding' reaches position pad_token_id + t.
    last = t + (self.pad_token_id + 1 if self.positions == 'after_padding' else 0)
    if last > self.max_positions:
      raise ValueError(f'Text length {t} needs {last} positions, more than the model\'s '
                       f'max_positions {self.max_positions}; lower config.data.max_len.')
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    positions = position_ids(input_ids, self.positions, self.pad_token_id)
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))
    x = layers.dropout(self.embeddings_norm(x), self.dropout_rate, r_embed)
    return layers.run_blocks(self.layer, x, attention_mask, r_blocks, remat=self.remat)
