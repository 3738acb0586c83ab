"""The weight-sharing transformer: one set of layers that processes both modalities.

Each tower's tokens are first projected to the shared width by a per-modality Linear
(`image_in` / `text_in`); an optional learned modality vector is added; then the *same*
pre-LN blocks run over the image path and the text path separately (each modality alone,
so retrieval still encodes each side once); a final LayerNorm, per modality or shared,
closes the stack.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from cookie_jax.models import layers

IMAGE, TEXT = 0, 1


class SharedTransformer(nnx.Module):

  def __init__(self, cfg, *, image_width: int, text_width: int, dtype, remat: bool | str = False,
               rngs: nnx.Rngs):
    self.remat = remat
    self.modality_layernorm = cfg.modality_layernorm
    self.image_in = layers.dense(image_width, cfg.width, (None, 'embed'), dtype=dtype,
                                 rngs=rngs)
    self.text_in = layers.dense(text_width, cfg.width, (None, 'embed'), dtype=dtype,
                                rngs=rngs)
    self.modality_embedding = (
        nnx.Param(layers.normal_init()(rngs.params(), (2, cfg.width), jnp.float32),
                  logical_axes=(None, 'embed'))
        if cfg.modality_embedding else None)
    self.layer = nnx.List([
        layers.PreNormBlock(cfg.width, cfg.heads, cfg.mlp_dim, dropout_rate=cfg.dropout,
                            attention_dropout=cfg.attention_dropout, dtype=dtype, rngs=rngs)
        for _ in range(cfg.depth)])
    if cfg.modality_layernorm:
      self.image_norm = layers.layer_norm(cfg.width, rngs=rngs)
      self.text_norm = layers.layer_norm(cfg.width, rngs=rngs)
    else:
      self.norm = layers.layer_norm(cfg.width, rngs=rngs)

  def __call__(self, tokens: jax.Array, mask: jax.Array | None, modality: int, *,
               rng: jax.Array | None = None) -> jax.Array:
    proj = self.image_in if modality == IMAGE else self.text_in
    x = proj(tokens).astype(jnp.float32)
    if self.modality_embedding is not None:
      x = x + self.modality_embedding[modality]
    x = layers.run_blocks(self.layer, x, mask, rng, remat=self.remat)
    if self.modality_layernorm:
      return (self.image_norm if modality == IMAGE else self.text_norm)(x)
    return self.norm(x)
