"""The text tower: BERT laid out like transformers' `BertModel`, pooler included."""

from flax import nnx
import jax
import jax.numpy as jnp

from cookie_jax.models import layers


def _embed(num: int, width: int, axes, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(num, width, dtype=jnp.float32, param_dtype=jnp.float32,
                   embedding_init=layers.normal_init(),
                   embedding_metadata={'logical_axes': axes}, rngs=rngs)


class Bert(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, post-LN blocks.

  `__call__(input_ids, attention_mask)` returns every token's state [B, T, width]; padded
  positions are computed but never attended to.
  """

  def __init__(self, cfg, *, dtype, remat: bool = False, rngs: nnx.Rngs):
    self.dropout_rate = cfg.dropout
    self.remat = remat
    self.max_positions = cfg.max_positions
    self.word_embeddings = _embed(cfg.vocab_size, cfg.width, ('vocab', 'embed'), rngs)
    self.position_embeddings = _embed(cfg.max_positions, cfg.width, ('length', 'embed'), rngs)
    self.token_type_embeddings = _embed(cfg.type_vocab_size, cfg.width, (None, 'embed'), rngs)
    self.embeddings_norm = layers.layer_norm(cfg.width, rngs=rngs)
    self.layer = nnx.List([
        layers.PostNormBlock(cfg.width, cfg.heads, cfg.mlp_dim, dropout_rate=cfg.dropout,
                             attention_dropout=cfg.attention_dropout, dtype=dtype, rngs=rngs)
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
    if t > self.max_positions:
      raise ValueError(f'Text length {t} exceeds the model\'s max_positions '
                       f'{self.max_positions}; lower config.data.max_len.')
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(t))[None]
         + self.token_type_embeddings(token_type_ids))
    x = layers.dropout(self.embeddings_norm(x), self.dropout_rate, r_embed)
    return layers.run_blocks(self.layer, x, attention_mask, r_blocks, remat=self.remat)
