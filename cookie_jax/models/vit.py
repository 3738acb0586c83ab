"""The image tower: a ViT laid out like transformers' `ViTModel`, pooler included."""

from flax import nnx
import jax
import jax.numpy as jnp

from cookie_jax.models import layers


class ViT(nnx.Module):
  """Conv patch embedding, CLS token, learned positions, pre-LN blocks, final LayerNorm.

  `__call__(images)` takes NHWC images and returns all tokens [B, 1 + N, width], CLS first.
  """

  def __init__(self, cfg, *, dtype, remat: bool = False, rngs: nnx.Rngs):
    self.patch_size = cfg.patch_size
    self.dropout_rate = cfg.dropout
    self.remat = remat
    self.dtype = dtype
    num_patches = (cfg.image_size // cfg.patch_size) ** 2
    self.patch_embeddings = nnx.Conv(
        3, cfg.width, kernel_size=(cfg.patch_size, cfg.patch_size),
        strides=(cfg.patch_size, cfg.patch_size), padding='VALID', dtype=dtype,
        param_dtype=jnp.float32, kernel_init=layers.normal_init(),
        kernel_metadata={'logical_axes': ('patch', 'patch', None, 'embed')},
        bias_metadata={'logical_axes': ('embed',)}, rngs=rngs)
    init = layers.normal_init()
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, cfg.width), jnp.float32),
                               logical_axes=(None, None, 'embed'))
    self.position_embeddings = nnx.Param(
        init(rngs.params(), (1, num_patches + 1, cfg.width), jnp.float32),
        logical_axes=(None, 'length', 'embed'))
    self.layer = nnx.List([
        layers.PreNormBlock(cfg.width, cfg.heads, cfg.mlp_dim, dropout_rate=cfg.dropout,
                            attention_dropout=cfg.attention_dropout, dtype=dtype, rngs=rngs)
        for _ in range(cfg.depth)])
    self.layernorm = layers.layer_norm(cfg.width, rngs=rngs)
    # ViTModel's pooler (dense + tanh on CLS). COOKIE pools on its own and never calls it;
    # it is kept so that a pretrained checkpoint imports and exports whole.
    self.pooler = layers.dense(cfg.width, cfg.width, ('embed', None), dtype=dtype, rngs=rngs)

  def pooled(self, hidden: jax.Array) -> jax.Array:
    """ViTModel's `pooler_output` of the tokens returned by `__call__`."""
    return jnp.tanh(self.pooler(hidden[:, 0]).astype(jnp.float32))

  def __call__(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    r_embed, r_blocks = layers.split_rng(rng, 2)
    x = self.patch_embeddings(images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d).astype(jnp.float32)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...]
    x = layers.dropout(x, self.dropout_rate, r_embed)
    x = layers.run_blocks(self.layer, x, None, r_blocks, remat=self.remat)
    return self.layernorm(x)
