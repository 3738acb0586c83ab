r"""COOKIE: two towers, a weight-sharing transformer on top, pooling, projection heads.

    images -> ViT ---\                                  /-> pool -> image_head -> L2 norm
                      >-- SharedTransformer (same weights) 
    text  -> BERT ---/                                  \-> pool -> text_head  -> L2 norm

With `shared.depth == 0` it is a plain dual encoder (tower outputs are pooled directly).
Video clips [B, T, H, W, 3] take the image path, with a temporal step between the ViT
and the shared transformer (models/video.py).
The temperature is learned as a log logit scale, kept at most `max_logit_scale`; with
`logit_bias` the model also learns SigLIP's logit bias (losses/sigmoid.py).
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp

from cookie_jax.models import layers
from cookie_jax.models.bert import Bert
from cookie_jax.models.concept import ConceptGCN, attend_concepts
from cookie_jax.models.shared import IMAGE, TEXT, SharedTransformer
from cookie_jax.models.video import clip_tokens, make_temporal
from cookie_jax.models.vit import ViT, prefix_tokens

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def pool(x: jax.Array, mask: jax.Array | None, how: str, *, skip: int) -> jax.Array:
  """'cls': the first token. 'mean': the mean over real tokens after the first `skip`
  (image: the patches, without the class token and registers). In fp32, whatever the
  tokens' dtype."""
  x = x.astype(jnp.float32)
  if how == 'cls':
    return x[:, 0]
  if skip:
    x = x[:, skip:]
    mask = None if mask is None else mask[:, skip:]
  if mask is None:
    return jnp.mean(x, axis=1)
  m = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class CookieModel(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    self.image_pool = cfg.image_pool
    self.image_prefix = prefix_tokens(cfg.vision)
    self.vision_patch_size = cfg.vision.patch_size
    self.text_pool = cfg.text_pool
    self.max_log_scale = math.log(cfg.max_logit_scale)
    # False, or the policy every rematerialised block uses (layers.REMAT_POLICIES).
    remat = cfg.remat and cfg.get('remat_policy', 'full')
    self.vision = ViT(cfg.vision, dtype=dtype, remat=remat, rngs=rngs)
    self.text = Bert(cfg.text, dtype=dtype, remat=remat, rngs=rngs)
    if cfg.shared.depth > 0:
      self.shared = SharedTransformer(cfg.shared, image_width=cfg.vision.width,
                                      text_width=cfg.text.width, dtype=dtype,
                                      remat=remat, rngs=rngs)
      image_width = text_width = cfg.shared.width
    else:
      self.shared = None
      image_width, text_width = cfg.vision.width, cfg.text.width
    self.image_head = layers.dense(image_width, cfg.embed_dim, ('embed', None), dtype=dtype,
                                   rngs=rngs, use_bias=False)
    self.text_head = layers.dense(text_width, cfg.embed_dim, ('embed', None), dtype=dtype,
                                  rngs=rngs, use_bias=False)
    self.log_logit_scale = nnx.Param(jnp.asarray(math.log(1.0 / cfg.temperature_init),
                                                 jnp.float32), logical_axes=())
    # SigLIP's learned logit bias (the sigmoid loss's c); only models built for it have one.
    self.logit_bias = (nnx.Param(jnp.asarray(cfg.logit_bias_init, jnp.float32),
                                 logical_axes=()) if cfg.logit_bias else None)
    # Heads into an external partner's embedding space for the knowledge-sharing losses.
    self.image_partner_head = (
        layers.dense(cfg.embed_dim, cfg.image_partner_dim, (None, None), dtype=dtype,
                     rngs=rngs, use_bias=False) if cfg.image_partner_dim else None)
    self.text_partner_head = (
        layers.dense(cfg.embed_dim, cfg.text_partner_dim, (None, None), dtype=dtype,
                     rngs=rngs, use_bias=False) if cfg.text_partner_dim else None)
    # CODER: prototypes of the online clustering, and the GCN of the concept branch.
    self.prototypes = (
        nnx.Param(layers.normal_init(1.0)(rngs.params(), (cfg.num_prototypes, cfg.embed_dim),
                                          jnp.float32), logical_axes=(None, None))
        if cfg.num_prototypes else None)
    self.concept_gcn = (
        ConceptGCN(cfg.text.width, cfg.embed_dim, depth=cfg.concept_gcn_depth, dtype=dtype,
                   rngs=rngs) if cfg.concept_gcn_depth else None)
    # Video: the temporal step between the image tower and the shared layers (video.py).
    # Made last, so that the other parameters are those of the image model of this seed.
    self.num_frames = cfg.video.num_frames
    self.video = make_temporal(cfg.video, width=cfg.vision.width, dtype=dtype,
                               remat=remat, rngs=rngs)
    kernel = cfg.get('attention_kernel', True)
    for _, module in nnx.iter_modules(self):
      if isinstance(module, layers.MultiHeadAttention):
        module.kernel = kernel

  def logit_scale(self) -> jax.Array:
    """1 / temperature, clamped at `max_logit_scale`.

    Training keeps the parameter at or below the clamp (`step.clip_logit_scale` after
    every update), where this passes the whole gradient, also at the clamp itself
    (`jnp.minimum` would halve it there); the clamp only bounds parameters from elsewhere."""
    log_scale = self.log_logit_scale[...]
    return jnp.exp(jnp.where(log_scale > self.max_log_scale, self.max_log_scale, log_scale))

  def sigmoid_params(self) -> tuple[jax.Array, jax.Array]:
    """(t, c) of the sigmoid loss: the clamped logit scale and the learned bias."""
    return self.logit_scale(), self.logit_bias[...]

  def embed_image(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """Unnormalised image embeddings [B, embed_dim], fp32; clips [B, T, H, W, 3] too.
    `rng` may be `layers.ViewKeys` of interleaved views (`layers.run_views`), for images."""
    r_tower, r_shared = layers.split_rng(rng, 2)
    if images.ndim == 5:  # a clip: frames -> image-shaped tokens (models/video.py)
      if isinstance(rng, layers.ViewKeys):
        # Frames and the temporal step reorder rows, which ViewKeys' draws do not follow.
        raise ValueError('Clips run one view per pass: call embed_image per view.')
      x = clip_tokens(self.vision, self.video, images, num_frames=self.num_frames,
                      rng=r_tower)
    else:
      x = self.vision(images, rng=r_tower)
    if self.image_pool == 'tower':  # the tower's own pooled output (no shared layers)
      return self.image_head(self.vision.pooled(x)).astype(jnp.float32)
    if self.shared is not None:
      x = self.shared(x, None, IMAGE, rng=r_shared)
    return self.image_head(pool(x, None, self.image_pool, skip=self.image_prefix)).astype(
        jnp.float32)

  def embed_text(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                 rng: jax.Array | None = None) -> jax.Array:
    """Unnormalised text embeddings [B, embed_dim], fp32 (`rng`: as in `embed_image`)."""
    r_tower, r_shared = layers.split_rng(rng, 2)
    x = self.text(input_ids, attention_mask, rng=r_tower)
    if self.shared is not None:
      x = self.shared(x, attention_mask, TEXT, rng=r_shared)
    return self.text_head(pool(x, attention_mask, self.text_pool, skip=0)).astype(
        jnp.float32)

  def encode_image(self, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """L2-normalised image embeddings; `rng` turns on dropout (training)."""
    return l2_normalize(self.embed_image(images, rng=rng))

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array, *,
                  rng: jax.Array | None = None) -> jax.Array:
    """L2-normalised text embeddings; `rng` turns on dropout (training)."""
    return l2_normalize(self.embed_text(input_ids, attention_mask, rng=rng))

  def image_partner(self, embedding: jax.Array) -> jax.Array:
    """Unnormalised image embedding -> normalised point in the external partner's space."""
    return l2_normalize(self.image_partner_head(embedding))

  def text_partner(self, embedding: jax.Array) -> jax.Array:
    return l2_normalize(self.text_partner_head(embedding))

  def concept_descriptors(self, concept_ids: jax.Array, adjacency: jax.Array) -> jax.Array:
    """CODER's concept descriptors [K, embed_dim]: the text tower's word embeddings of the
    concept tokens `concept_ids` [K], propagated over the normalised concept graph
    `adjacency` [K, K] by the GCN."""
    return self.concept_gcn(self.text.word_embeddings(concept_ids), adjacency)

  def concept_embedding(self, embedding: jax.Array, descriptors: jax.Array,
                        temperature: float) -> jax.Array:
    """Normalised concept-level embedding: `embedding` [B, D] attending over descriptors."""
    return l2_normalize(attend_concepts(embedding, descriptors, temperature))


def init_model(model_cfg, seed: int) -> CookieModel:
  """The model of `model_cfg`, its parameters initialised from `seed`."""
  return CookieModel(model_cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))


def abstract_model(model_cfg) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, abstract state) of the model of `model_cfg`, allocating nothing: the
  shapes and logical axes that restoring or sharding its parameters needs."""
  return nnx.split(nnx.eval_shape(lambda: init_model(model_cfg, 0)))
