"""The image tower: a ViT laid out like transformers' `ViTModel`, pooler included, with
the options that make it CLIP's, SigLIP's or DINOv2's vision tower exactly (`OPTIONS`).

Options (config.model.vision.*; the defaults are `ViTModel`'s layout):
  class_token  a learned class token first (False: SigLIP, patches only);
  registers    DINOv2's register tokens, after the class token, without positions;
  patch_bias   the patch embedding's bias (CLIP has none);
  pre_norm     a LayerNorm right after the embeddings (CLIP's `pre_layrnorm`);
  final_norm   'tokens': the last LayerNorm on every token (ViT, SigLIP, DINOv2);
               'pooled': on the pooled class token only, the tokens left as the last
               block wrote them (CLIP's `post_layernorm`);
  activation   the MLP's: 'gelu' (erf), 'gelu_pytorch_tanh' (SigLIP), 'quick_gelu' (CLIP);
  layer_norm_eps  every LayerNorm's epsilon (ViT 1e-12, CLIP 1e-5, SigLIP/DINOv2 1e-6);
  layer_scale  LayerScale's initial value on both residual branches; 0 = none (DINOv2);
  position_grid  the side of the learned position table; 0 = image_size // patch_size
               (the patch grid is floored, as transformers' patch conv floors it).
               Another grid is resized to the input's (`positions.py`), as DINOv2 does;
  position_interpolation  how: 'bicubic' (Dinov2Model) or 'bicubic_antialias'
               (Dinov2WithRegistersModel);
  pooler       the tower's pooled output (transformers' `pooler_output`): 'tanh'
               (ViTModel's dense + tanh on the class token), 'cls' (the class token;
               with final_norm='pooled' its LayerNorm: CLIP, DINOv2) or 'map' (SigLIP's
               attention-pooling head: a probe token attending over all tokens, then a
               LayerNorm and an MLP on a residual);
  mask_token   DINOv2's mask token (masked-image pre-training): never used here, kept so
               that a checkpoint imports and exports whole.

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

from cookie_jax.models import layers, positions


PATCH_DROPOUT_STREAM = 0x50445250  # fold_in constant of the patch-dropout key


def keep_count(num_patches: int, rate: float) -> int:
  """Patch tokens an image keeps under patch dropout `rate`: floor(N * (1 - rate)), at
  least 1, as open_clip rounds, but of the exact product: in floats 100 * (1 - 0.9) is
  9.999999999999998, which open_clip's int() floors to 9 instead of 10."""
  return max(1, int(num_patches * (1.0 - rate) + 1e-6))


# The vision options with their `ViTModel` defaults; presets.py puts them in every config.
OPTIONS = dict(class_token=True, registers=0, patch_bias=True, pre_norm=False,
               final_norm='tokens', activation='gelu', layer_norm_eps=layers.LAYER_NORM_EPS,
               layer_scale=0.0, position_grid=0, position_interpolation='bicubic',
               pooler='tanh', mask_token=False)


def options(cfg) -> dict:
  """The vision options of `cfg`, a default for any it lacks."""
  return {k: cfg.get(k, v) for k, v in OPTIONS.items()}


# The options that make each transformers vision tower (hf_vision.CLASSES names them);
# activation and epsilon are free. No other layout is computed by transformers, so
# config.py refuses it (a run of it could not be exported).
FAMILY_LAYOUTS = {
    'vit': dict(class_token=True, registers=0, patch_bias=True, pre_norm=False,
                final_norm='tokens', layer_scale=0.0, pooler='tanh', mask_token=False),
    'clip': dict(class_token=True, registers=0, patch_bias=False, pre_norm=True,
                 final_norm='pooled', layer_scale=0.0, pooler='cls', mask_token=False),
    'siglip': dict(class_token=False, registers=0, patch_bias=True, pre_norm=False,
                   final_norm='tokens', layer_scale=0.0, pooler='map', mask_token=False),
    'dinov2': dict(class_token=True, registers=0, patch_bias=True, pre_norm=False,
                   final_norm='tokens', pooler='cls', position_interpolation='bicubic'),
    'dinov2_with_registers': dict(class_token=True, patch_bias=True, pre_norm=False,
                                  final_norm='tokens', pooler='cls', mask_token=True,
                                  position_interpolation='bicubic_antialias'),
}


def transformers_family(cfg) -> str | None:
  """The family of FAMILY_LAYOUTS whose forward pass is the tower of `cfg` (None: none)."""
  o = options(cfg)
  grid = cfg.image_size // cfg.patch_size
  for fam, fixed in FAMILY_LAYOUTS.items():
    if any(o[k] != v for k, v in fixed.items()):
      continue
    if fam.startswith('dinov2'):
      if o['layer_scale'] > 0:
        return fam
    elif o['position_grid'] in (0, grid):
      return fam
  return None


def prefix_tokens(cfg) -> int:
  """Tokens before the patches: the class token and the registers."""
  o = options(cfg)
  return int(o['class_token']) + int(o['registers'])


class AttentionPoolHead(nnx.Module):
  """SigLIP's multi-head attention pooling (`SiglipMultiheadAttentionPoolingHead`): a
  learned probe attends over the tokens (a `torch.nn.MultiheadAttention`, whose fused
  query/key/value projection is kept fused as `in_proj`), then x + MLP(LayerNorm(x))."""

  def __init__(self, width, heads, mlp_dim, *, eps, activation, dtype, rngs):
    self.heads = heads
    self.dtype = dtype
    self.activation = layers.ACTIVATIONS[activation]
    self.probe = nnx.Param(layers.normal_init()(rngs.params(), (1, 1, width), jnp.float32),
                           logical_axes=(None, None, 'embed'))
    self.in_proj = layers.dense(width, 3 * width, ('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.out_proj = layers.dense(width, width, ('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.layernorm = layers.layer_norm(width, rngs=rngs, eps=eps)
    self.fc1 = layers.dense(width, mlp_dim, ('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.fc2 = layers.dense(mlp_dim, width, ('mlp', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    hd = d // self.heads
    kernel = self.in_proj.kernel[...].astype(self.dtype)
    bias = self.in_proj.bias[...].astype(self.dtype)
    probe = self.probe[...].astype(self.dtype)
    q = (probe @ kernel[:, :d] + bias[:d]).reshape(1, self.heads, hd)
    kv = x.astype(self.dtype) @ kernel[:, d:] + bias[d:]
    k, v = (y.reshape(b, t, self.heads, hd) for y in jnp.split(kv, 2, axis=-1))
    logits = jnp.einsum('hd,bkhd->bhk', q[0], k).astype(jnp.float32) / jnp.sqrt(
        jnp.float32(hd))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = self.out_proj(jnp.einsum('bhk,bkhd->bhd', probs, v).reshape(b, d))
    return h + self.fc2(self.activation(self.fc1(self.layernorm(h))))


class ViT(nnx.Module):
  """Conv patch embedding, class token, learned positions, pre-LN blocks, final LayerNorm
  (each as the options of the module docstring say).

  `__call__(images)` takes NHWC images and returns all tokens [B, prefix + N, width]
  (transformers' `last_hidden_state`), the class token and registers first;
  `pooled(tokens)` is transformers' `pooler_output`.
  """

  def __init__(self, cfg, *, dtype, remat: bool | str = False, rngs: nnx.Rngs):
    o = options(cfg)
    self.patch_size = cfg.patch_size
    self.patch_dropout = float(cfg.get('patch_dropout', 0.0))
    self.dropout_rate = cfg.dropout
    self.remat = remat
    self.dtype = dtype
    self.final_norm, self.pooler_kind = o['final_norm'], o['pooler']
    self.prefix = prefix_tokens(cfg)
    self.position_grid = o['position_grid'] or cfg.image_size // cfg.patch_size
    self.position_interpolation = o['position_interpolation']
    eps, width = float(o['layer_norm_eps']), cfg.width
    self.patch_embeddings = nnx.Conv(
        3, width, kernel_size=(cfg.patch_size, cfg.patch_size),
        strides=(cfg.patch_size, cfg.patch_size), padding='VALID', dtype=dtype,
        param_dtype=jnp.float32, kernel_init=layers.normal_init(), use_bias=o['patch_bias'],
        kernel_metadata={'logical_axes': ('patch', 'patch', None, 'embed')},
        bias_metadata={'logical_axes': ('embed',)}, rngs=rngs)
    init = layers.normal_init()
    token = lambda n: nnx.Param(init(rngs.params(), (1, n, width), jnp.float32),
                                logical_axes=(None, None, 'embed'))
    self.cls_token = token(1) if o['class_token'] else None
    self.register_tokens = token(o['registers']) if o['registers'] else None
    self.mask_token = (nnx.Param(jnp.zeros((1, width), jnp.float32),
                                 logical_axes=(None, 'embed')) if o['mask_token'] else None)
    self.position_embeddings = nnx.Param(
        init(rngs.params(), (1, self.position_grid ** 2 + int(o['class_token']), width),
             jnp.float32), logical_axes=(None, 'length', 'embed'))
    self.pre_layernorm = layers.layer_norm(width, rngs=rngs, eps=eps) if o['pre_norm'] else None
    self.layer = nnx.List([
        layers.PreNormBlock(width, cfg.heads, cfg.mlp_dim, dropout_rate=cfg.dropout,
                            attention_dropout=cfg.attention_dropout, dtype=dtype, rngs=rngs,
                            activation=o['activation'], eps=eps,
                            layer_scale_init=float(o['layer_scale']))
        for _ in range(cfg.depth)])
    self.layernorm = layers.layer_norm(width, rngs=rngs, eps=eps)
    # ViTModel's pooler (dense + tanh on CLS). COOKIE pools on its own and never calls it
    # unless model.image_pool='tower'; it is kept so that a pretrained checkpoint imports
    # and exports whole.
    self.pooler = (layers.dense(width, width, ('embed', None), dtype=dtype, rngs=rngs)
                   if o['pooler'] == 'tanh' else None)
    self.head = (AttentionPoolHead(width, cfg.heads, cfg.mlp_dim, eps=eps,
                                   activation=o['activation'], dtype=dtype, rngs=rngs)
                 if o['pooler'] == 'map' else None)

  def pooled(self, hidden: jax.Array) -> jax.Array:
    """transformers' `pooler_output` of the tokens returned by `__call__`, fp32."""
    if self.pooler_kind == 'map':
      return self.head(hidden).astype(jnp.float32)
    if self.pooler_kind == 'tanh':
      return jnp.tanh(self.pooler(hidden[:, 0]).astype(jnp.float32))
    cls = hidden[:, 0]
    return self.layernorm(cls) if self.final_norm == 'pooled' else cls.astype(jnp.float32)

  def keep_count(self, num_patches: int) -> int:
    return keep_count(num_patches, self.patch_dropout)

  def drop_patches(self, x: jax.Array, rng: jax.Array, group: int = 1) -> jax.Array:
    """[B, P + N, d] -> [B, P + keep_count(N), d]: the P prefix tokens (class token,
    registers) and a random subset of patches, in their original order. Each run of
    `group` consecutive images (the frames of a clip) keeps the same patch positions."""
    p = self.prefix
    b, n = x.shape[0], x.shape[1] - p
    noise = layers.draw_rows(jax.random.uniform, rng, (b // group, n))
    keep = jnp.sort(jax.lax.top_k(noise, self.keep_count(n))[1], axis=1)
    # Pinned like the tokens, so that each device gathers its own images' patches.
    keep = layers.constrain(jnp.repeat(keep, group, axis=0), ('batch', None))
    x = layers.constrain(x, ('batch', 'length', 'embed'))
    patches = jnp.take_along_axis(x[:, p:], keep[..., None], axis=1)
    return jnp.concatenate([x[:, :p], patches], axis=1)

  def embed(self, images: jax.Array) -> jax.Array:
    """Patches, class token and positions, then the registers: [B, P + N, d] fp32."""
    x = self.patch_embeddings(images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d).astype(jnp.float32)
    table = self.position_embeddings[...]
    if self.cls_token is None:
      return x + positions.resize_grid(table, self.position_grid, (h, w),
                                       self.position_interpolation)
    pos = positions.resize_grid(table[:, 1:], self.position_grid, (h, w),
                                self.position_interpolation)
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (b, 1, d)), x], axis=1)
    x = x + jnp.concatenate([table[:, :1], pos], axis=1)
    if self.register_tokens is not None:
      regs = jnp.broadcast_to(self.register_tokens[...], (b, *self.register_tokens.shape[1:]))
      x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
    return x

  def __call__(self, images: jax.Array, *, rng: jax.Array | None = None,
               group: int = 1) -> jax.Array:
    """`group`: images per clip (consecutive), which share one patch-dropout subset."""
    r_embed, r_blocks = layers.split_rng(rng, 2)
    x = self.embed(images)
    if rng is not None and self.patch_dropout > 0:
      # A stream of its own (not a third split), so the dropout masks stay those of a
      # model without patch dropout.
      x = self.drop_patches(x, layers.fold_in(rng, PATCH_DROPOUT_STREAM), group)
    x = layers.dropout(x, self.dropout_rate, r_embed)
    if self.pre_layernorm is not None:
      x = self.pre_layernorm(x)
    x = layers.run_blocks(self.layer, x, None, r_blocks, remat=self.remat)
    return self.layernorm(x) if self.final_norm == 'tokens' else x
