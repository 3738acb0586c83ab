"""The image tower: a ViT laid out like transformers' `ViTModel`, pooler included.

Patch dropout (FLIP, Li et al. 2023; `patch_dropout` of the vision config): in training,
each image keeps CLS and a random `keep_count` of its patch tokens (after the position
embeddings, so each kept token still knows where it was), and the blocks run on the
shorter sequence. The kept set is drawn from the step's rng, so it is a function of
(seed, step) like every other random choice, and it is drawn for the global batch, so a
sharded step keeps the same tokens as an unsharded one. Without an rng (evaluation)
nothing is dropped.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from cookie_jax.models import layers


PATCH_DROPOUT_STREAM = 0x50445250  # fold_in constant of the patch-dropout key


def keep_count(num_patches: int, rate: float) -> int:
  """Patch tokens an image keeps under patch dropout `rate`: floor(N * (1 - rate)), at
  least 1, as open_clip rounds, but of the exact product: in floats 100 * (1 - 0.9) is
  9.999999999999998, which open_clip's int() floors to 9 instead of 10."""
  return max(1, int(num_patches * (1.0 - rate) + 1e-6))


class ViT(nnx.Module):
  """Conv patch embedding, CLS token, learned positions, pre-LN blocks, final LayerNorm.

  `__call__(images)` takes NHWC images and returns all tokens [B, 1 + N, width], CLS first.
  """

  def __init__(self, cfg, *, dtype, remat: bool = False, rngs: nnx.Rngs):
    self.patch_size = cfg.patch_size
    self.patch_dropout = float(cfg.get('patch_dropout', 0.0))
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

  def keep_count(self, num_patches: int) -> int:
    return keep_count(num_patches, self.patch_dropout)

  def drop_patches(self, x: jax.Array, rng: jax.Array, group: int = 1) -> jax.Array:
    """[B, 1 + N, d] -> [B, 1 + keep_count(N), d]: CLS and a random subset of patches,
    in their original order. Each run of `group` consecutive images (the frames of a
    clip) keeps the same patch positions."""
    b, n = x.shape[0], x.shape[1] - 1
    noise = layers.draw_rows(jax.random.uniform, rng, (b // group, n))
    keep = jnp.sort(jax.lax.top_k(noise, self.keep_count(n))[1], axis=1)
    # Pinned like the tokens, so that each device gathers its own images' patches.
    keep = layers.constrain(jnp.repeat(keep, group, axis=0), ('batch', None))
    x = layers.constrain(x, ('batch', 'length', 'embed'))
    patches = jnp.take_along_axis(x[:, 1:], keep[..., None], axis=1)
    return jnp.concatenate([x[:, :1], patches], axis=1)

  def __call__(self, images: jax.Array, *, rng: jax.Array | None = None,
               group: int = 1) -> jax.Array:
    """`group`: images per clip (consecutive), which share one patch-dropout subset."""
    r_embed, r_blocks = layers.split_rng(rng, 2)
    x = self.patch_embeddings(images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d).astype(jnp.float32)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...]
    if rng is not None and self.patch_dropout > 0:
      # A stream of its own (not a third split), so the dropout masks stay those of a
      # model without patch dropout.
      x = self.drop_patches(x, layers.fold_in(rng, PATCH_DROPOUT_STREAM), group)
    x = layers.dropout(x, self.dropout_rate, r_embed)
    x = layers.run_blocks(self.layer, x, None, r_blocks, remat=self.remat)
    return self.layernorm(x)
