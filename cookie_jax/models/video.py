r"""The video path: the image tower on every frame, then a temporal step, then the usual
weight-sharing transformer.

    clip [B, T, H, W, 3] -> ViT on B*T frames -> tokens [B, T, 1+N, w]
        -> temporal step -> tokens [B, 1+N, w]  (the layout of one image's tokens)
        -> SharedTransformer (image path) -> pool -> image_head -> L2 norm

So the frames meet the shared layers as one image-shaped token sequence: everything after
the temporal step (shared transformer, pooling, head, losses, sharding, checkpoints) is
the image path unchanged. The temporal step (`config.model.video.temporal`) is

* 'mean': each token averaged over the frames. No parameters; a clip of one repeated
  frame gives exactly that frame's tokens, hence its image embedding.
* 'transformer': learned frame-position embeddings, then `depth` pre-LN blocks that
  attend across the T frames of each token position (TimeSformer's temporal attention,
  after the spatial tower), then the mean over frames. The blocks' residual outputs start
  at zero and the position embeddings are centred over the frames, so at initialisation
  it computes exactly 'mean': a model fine-tuned from an image-text checkpoint starts
  where that checkpoint is.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from cookie_jax.models import layers

TEMPORAL_KINDS = ('mean', 'transformer')


class TemporalTransformer(nnx.Module):
  """[B, T, S, w] per-frame tokens -> [B, S, w]: attention over frames, then their mean."""

  def __init__(self, cfg, *, width: int, dtype, remat: bool | str = False, rngs: nnx.Rngs):
    self.num_frames = cfg.num_frames
    self.remat = remat
    self.position_embeddings = nnx.Param(
        layers.normal_init()(rngs.params(), (cfg.num_frames, width), jnp.float32),
        logical_axes=(None, 'embed'))
    self.layer = nnx.List([
        layers.PreNormBlock(width, cfg.heads, cfg.mlp_dim, dropout_rate=cfg.dropout,
                            attention_dropout=cfg.attention_dropout, dtype=dtype, rngs=rngs)
        for _ in range(cfg.depth)])
    for block in self.layer:
      # Zero residual branches: the blocks start as the identity (see the module doc).
      for out in (block.attention.out, block.output):
        out.kernel[...] = jnp.zeros_like(out.kernel[...])

  def __call__(self, tokens: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    b, t, s, w = tokens.shape
    if t > self.num_frames:
      raise ValueError(
          f'A clip of {t} frames, but config.model.video.num_frames={self.num_frames} (the '
          'frame-position table of the temporal transformer). Feed at most that many '
          f'frames (config.data.num_frames={self.num_frames}) or build the model with '
          f'model.video.num_frames={t}.')
    pos = self.position_embeddings[:t]
    # Centred over the frames the clip has, so that they cancel in the final mean.
    x = tokens + (pos - jnp.mean(pos, axis=0, keepdims=True))[None, :, None, :]
    x = jnp.swapaxes(x, 1, 2).reshape(b * s, t, w)
    x = layers.run_blocks(self.layer, x, None, rng, remat=self.remat)
    return jnp.mean(x.reshape(b, s, t, w), axis=2)


def make_temporal(cfg, *, width: int, dtype, remat: bool | str, rngs: nnx.Rngs):
  """The module of the temporal step, or None where it has no parameters ('mean')."""
  if cfg.num_frames <= 0 or cfg.temporal == 'mean':
    return None
  if cfg.temporal == 'transformer':
    return TemporalTransformer(cfg, width=width, dtype=dtype, remat=remat, rngs=rngs)
  raise ValueError(f'config.model.video.temporal={cfg.temporal!r}: use one of '
                   f'{list(TEMPORAL_KINDS)}.')


def clip_tokens(vision, temporal, clips: jax.Array, *, num_frames: int,
                rng: jax.Array | None = None) -> jax.Array:
  """[B, T, H, W, 3] clips -> [B, 1+N, w] tokens for the shared transformer's image path.

  `vision` is the image tower, `temporal` the module from `make_temporal` (None = mean).
  """
  if num_frames <= 0:
    raise ValueError(
        f'A clip of shape {tuple(clips.shape)} reached an image model '
        '(config.model.video.num_frames=0). Set model.video.num_frames to the frames per '
        'clip to build the video path, or feed [B, H, W, 3] images.')
  r_tower, r_temporal = layers.split_rng(rng, 2)
  b, t = clips.shape[:2]
  # Under patch dropout the frames of a clip keep the same patch positions, so that the
  # temporal step still pairs each token with the same place in the other frames.
  tokens = vision(clips.reshape(b * t, *clips.shape[2:]), rng=r_tower, group=t)
  tokens = tokens.reshape(b, t, *tokens.shape[1:])
  if temporal is None:
    return jnp.mean(tokens, axis=1)
  return temporal(tokens, rng=r_temporal)
