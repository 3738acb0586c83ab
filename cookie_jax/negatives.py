"""Composed hard negatives of VLDeformer: captions with a word swapped, images mixed.

VLDeformer (Zhang et al., 2021, "VLDeformer: Vision-Language Decomposed Transformer for
Fast Cross-Modal Retrieval") appends "bimodal hard negatives" to the in-batch negatives of
the cross-modal contrastive loss: for each pair, a caption that differs from the positive
in a noun or attribute, and an image composed from the positive and another image. The
paper gives the idea, not a recipe; our reading:

* caption: one uniformly chosen swappable token (see `cookie_jax.data.concepts.word_groups`)
  is replaced by a uniformly chosen *other* member of its group. One swap is the hardest
  negative that is still false: the rest of the caption stays true.
* image: image i is mixed with image (i + 1) mod B of the global batch, either a random
  rectangle of the partner pasted in (`'region'`, as CutMix) or a random share of its
  patches (`'patch'`, on the ViT's patch grid). The partner is another pair's positive,
  so the mix holds content that the caption of pair i does not describe.

Everything here is a function of arrays and one PRNG key, vectorised over the batch, with
no collective written by hand: called inside `jax.jit` on globally sharded arrays, XLA
partitions it, and with `jax_threefry_partitionable` (the default) the random draws do not
depend on the sharding, so 8 devices give bit-identical results to 1.
"""

import jax
import jax.numpy as jnp


def compose_negative_captions(input_ids: jax.Array, attention_mask: jax.Array,
                              token_group: jax.Array, group_members: jax.Array,
                              rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(neg_ids int32 [B, L], valid bool [B]): each caption with one word swapped.

  Args:
    input_ids: int32 [B, L] token ids.
    attention_mask: [B, L], nonzero on real tokens.
    token_group: int32 [V], the swap group of each token id, -1 = not swappable.
    group_members: int32 [G, M], each group's token ids padded with -1 (every group has
      at least 2 members; `concepts.swap_tables` guarantees it).
    rng: a PRNG key.

  `valid[i]` is False where row i has no swappable token; that row is returned unchanged
  and its negative must be masked out of the loss.
  """
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(f'input_ids {input_ids.shape} and attention_mask '
                     f'{attention_mask.shape}: expected both [batch, length].')
  k_pos, k_member = jax.random.split(rng)
  vocab = token_group.shape[0]
  group = token_group[jnp.clip(input_ids, 0, vocab - 1)]
  swappable = (group >= 0) & (attention_mask != 0) & (input_ids < vocab) & (input_ids >= 0)
  valid = jnp.any(swappable, axis=1)

  # The argmax of iid uniforms over the swappable positions is uniform among them.
  scores = jnp.where(swappable, jax.random.uniform(k_pos, input_ids.shape), -1.0)
  pos = jnp.argmax(scores, axis=1)
  old = jnp.take_along_axis(input_ids, pos[:, None], axis=1)[:, 0]
  members = group_members[jnp.maximum(jnp.take_along_axis(group, pos[:, None], 1)[:, 0], 0)]
  n = jnp.sum(members >= 0, axis=1)
  here = jnp.argmax(members == old[:, None], axis=1)
  # Uniform over the n - 1 other members: draw r in [0, n-2] and step over the old one.
  u = jax.random.uniform(k_member, old.shape)
  r = jnp.clip(jnp.floor(u * (n - 1)).astype(jnp.int32), 0, jnp.maximum(n - 2, 0))
  new = jnp.take_along_axis(members, (r + (r >= here))[:, None], axis=1)[:, 0]

  at = (jnp.arange(input_ids.shape[1])[None, :] == pos[:, None]) & valid[:, None]
  neg = jnp.where(at, new[:, None].astype(input_ids.dtype), input_ids)
  return neg, valid


def _check_fraction(fraction) -> tuple[float, float]:
  lo, hi = (float(f) for f in fraction)
  if not 0.0 < lo <= hi < 1.0:
    raise ValueError(f'fraction={tuple(fraction)}: expected (min, max) with '
                     '0 < min <= max < 1, e.g. (0.3, 0.6); at 1 the "mix" is just the '
                     'partner image.')
  return lo, hi


def _region_mask(rng, b: int, h: int, w: int, lo: float, hi: float) -> jax.Array:
  """bool [B, H, W]: one rectangle per image covering a share in [lo, hi] of its area."""
  k_area, k_h, k_y, k_x = jax.random.split(rng, 4)
  area = jax.random.uniform(k_area, (b,), minval=lo, maxval=hi)
  # Height share in [area, 1] and width share = area / height share: both stay <= 1.
  frac_h = area + (1.0 - area) * jax.random.uniform(k_h, (b,))
  rh = jnp.clip(jnp.round(frac_h * h), 1, h).astype(jnp.int32)
  rw = jnp.clip(jnp.round(area / frac_h * w), 1, w).astype(jnp.int32)
  y0 = jnp.floor(jax.random.uniform(k_y, (b,)) * (h - rh + 1)).astype(jnp.int32)
  x0 = jnp.floor(jax.random.uniform(k_x, (b,)) * (w - rw + 1)).astype(jnp.int32)
  ys, xs = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
  in_y = (ys >= y0[:, None]) & (ys < (y0 + rh)[:, None])
  in_x = (xs >= x0[:, None]) & (xs < (x0 + rw)[:, None])
  return in_y[:, :, None] & in_x[:, None, :]


def _patch_mask(rng, b: int, h: int, w: int, p: int, lo: float, hi: float) -> jax.Array:
  """bool [B, H, W]: a share in [lo, hi] of the p x p patches, at least one, chosen at random."""
  if p <= 0 or h % p or w % p:
    raise ValueError(f"patch_size={p}: mode='patch' needs a patch size that divides the "
                     f'image size {h}x{w}; use the ViT patch size (config.model.patch_size).')
  gh, gw = h // p, w // p
  k_share, k_order = jax.random.split(rng)
  share = jax.random.uniform(k_share, (b,), minval=lo, maxval=hi)
  count = jnp.clip(jnp.round(share * gh * gw), 1, gh * gw).astype(jnp.int32)
  # The `count` patches with the lowest iid scores: a uniform subset of that size.
  scores = jax.random.uniform(k_order, (b, gh * gw))
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  chosen = (rank < count[:, None]).reshape(b, gh, gw)
  return jnp.repeat(jnp.repeat(chosen, p, axis=1), p, axis=2)


def compose_negative_images(images: jax.Array, rng: jax.Array, *, mode: str = 'region',
                            patch_size: int = 0, fraction=(0.3, 0.6)) -> jax.Array:
  """Image i mixed with image (i + 1) mod B: same shape, dtype and value range.

  Args:
    images: [B, H, W, C] (any dtype; pixels are copied, never blended).
    rng: a PRNG key.
    mode: 'region' pastes one axis-aligned rectangle of the partner covering a random
      share of the area in `fraction`; 'patch' replaces a random share in `fraction` of
      the patch_size x patch_size patches with the partner's.
    patch_size: the patch side for mode='patch'.
    fraction: (min, max) share of the image taken from the partner.

  The result differs from image i wherever the partner differs from it inside the mixed
  area; with distinct images in the batch, that is always somewhere.
  """
  if images.ndim != 4:
    raise ValueError(f'images {images.shape}: expected [batch, height, width, channels].')
  b, h, w, _ = images.shape
  if b < 2:
    raise ValueError(f'batch size {b}: composed image negatives mix two images of the '
                     'batch; use a batch of at least 2.')
  lo, hi = _check_fraction(fraction)
  if mode == 'region':
    mask = _region_mask(rng, b, h, w, lo, hi)
  elif mode == 'patch':
    mask = _patch_mask(rng, b, h, w, patch_size, lo, hi)
  else:
    raise ValueError(f"mode={mode!r}: use 'region' (a pasted rectangle) or 'patch' "
                     '(a share of the ViT patches).')
  partner = jnp.roll(images, -1, axis=0)
  return jnp.where(mask[..., None], partner, images)
