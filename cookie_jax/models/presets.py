"""Named model sizes, so that a config reads like a recipe: `model_config('base')`.

Each preset is a plain dict of tower sizes. The layouts follow transformers'
`ViTModel` / `BertModel` so that pretrained checkpoints map one-to-one.
"""

import copy

import ml_collections

from cookie_jax.models import bert, vit


def _vit(image_size, patch_size, width, depth, heads, mlp_dim, dropout=0.0, **layout):
  return dict(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
              heads=heads, mlp_dim=mlp_dim, dropout=dropout, attention_dropout=dropout,
              # FLIP's patch dropout: the fraction of patch tokens dropped per image (per
              # clip for video) at training time, in [0, 1); evaluation keeps all.
              patch_dropout=0.0,
              # The layout: ViTModel's by default; CLIP's, SigLIP's and DINOv2's through
              # these (each key is described in cookie_jax/models/vit.py).
              **dict(vit.OPTIONS, **layout))


# The layouts of the vision towers transformers has (`CLIPVisionModel`,
# `SiglipVisionModel`, `Dinov2Model`), as vision options; the importer sets them from a
# checkpoint's config.json, and a recipe may name them with a size (`VISION_PRESETS`).
CLIP_LAYOUT = dict(patch_bias=False, pre_norm=True, final_norm='pooled',
                   activation='quick_gelu', layer_norm_eps=1e-5, pooler='cls')
SIGLIP_LAYOUT = dict(class_token=False, activation='gelu_pytorch_tanh', layer_norm_eps=1e-6,
                     pooler='map')
DINOV2_LAYOUT = dict(layer_norm_eps=1e-6, layer_scale=1.0, pooler='cls', mask_token=True)

# Named image towers (`model_config(..., vision='B/16')`): the sizes of CLIP's ViT-B/32,
# ViT-B/16 and ViT-L/14 with CLIP's layout, and SigLIP's So400m/14 (at 384 pixels) with
# SigLIP's, so that `image_init` of such a checkpoint finds the sizes it expects.
VISION_PRESETS = {
    'B/32': _vit(224, 32, 768, 12, 12, 3072, **CLIP_LAYOUT),
    'B/16': _vit(224, 16, 768, 12, 12, 3072, **CLIP_LAYOUT),
    'L/14': _vit(224, 14, 1024, 24, 16, 4096, **CLIP_LAYOUT),
    'So400m/14': _vit(384, 14, 1152, 27, 16, 4304, **SIGLIP_LAYOUT),
}


def _bert(width, depth, heads, mlp_dim, vocab_size=30522, max_positions=512, dropout=0.1):
  return dict(vocab_size=vocab_size, max_positions=max_positions, type_vocab_size=2,
              width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, dropout=dropout,
              attention_dropout=dropout,
              # The layout: BertModel's; RoBERTa's and XLM-R's through these (each key is
              # described in cookie_jax/models/bert.py).
              **bert.OPTIONS)


def _shared(width, depth, heads, mlp_dim, dropout=0.0):
  return dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, dropout=dropout,
              attention_dropout=dropout,
              # A learned per-modality vector added to the tokens before the shared layers.
              modality_embedding=True,
              # Separate final LayerNorm per modality (True) or one shared LayerNorm (False).
              modality_layernorm=True)


def _video(vision):
  return dict(
      # Frames per clip the model takes at most (the temporal transformer's frame-position
      # table); 0 = an image-only model. Clips [B, T, H, W, 3] need T <= num_frames.
      num_frames=0,
      # How the frames' tokens become one image-shaped token sequence before the
      # weight-sharing transformer: 'mean' (each token averaged over frames; no
      # parameters) or 'transformer' (attention across frames per token, then the mean).
      temporal='mean',
      # The temporal transformer (temporal='transformer'); its width is the image tower's.
      depth=1, heads=vision['heads'], mlp_dim=vision['mlp_dim'], dropout=0.0,
      attention_dropout=0.0)


PRESETS = {
    # CPU tests and the demo: a few hundred thousand parameters.
    'tiny': dict(
        vision=_vit(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64),
        text=_bert(width=32, depth=2, heads=2, mlp_dim=64, vocab_size=1024,
                   max_positions=64, dropout=0.1),
        shared=_shared(width=32, depth=1, heads=2, mlp_dim=64),
        embed_dim=32),
    # ViT-S/16 with a MiniLM-L6-H384-shaped BERT (so all-MiniLM-L6-v2 imports directly).
    'small': dict(
        vision=_vit(image_size=224, patch_size=16, width=384, depth=12, heads=6, mlp_dim=1536),
        text=_bert(width=384, depth=6, heads=12, mlp_dim=1536),
        shared=_shared(width=384, depth=2, heads=6, mlp_dim=1536),
        embed_dim=256),
    # ViT-B/16 + BERT-base: the pre-training recipe.
    'base': dict(
        vision=_vit(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
        text=_bert(width=768, depth=12, heads=12, mlp_dim=3072),
        shared=_shared(width=768, depth=2, heads=12, mlp_dim=3072),
        embed_dim=512),
    # ViT-L/16 + BERT-large.
    'large': dict(
        vision=_vit(image_size=224, patch_size=16, width=1024, depth=24, heads=16, mlp_dim=4096),
        text=_bert(width=1024, depth=24, heads=16, mlp_dim=4096),
        shared=_shared(width=1024, depth=2, heads=16, mlp_dim=4096),
        embed_dim=768),
}


def model_config(preset: str = 'tiny', vision: str = '') -> ml_collections.ConfigDict:
  """The full `config.model` section for a named size; `vision` names an image tower of
  `VISION_PRESETS` in place of the preset's own ('' = the preset's)."""
  if preset not in PRESETS:
    raise ValueError(f'Unknown model preset {preset!r}; choose one of {sorted(PRESETS)}.')
  if vision and vision not in VISION_PRESETS:
    raise ValueError(f'Unknown vision preset {vision!r}; choose one of '
                     f'{sorted(VISION_PRESETS)}.')
  p = copy.deepcopy(PRESETS[preset])
  if vision:
    p['vision'] = copy.deepcopy(VISION_PRESETS[vision])
  return ml_collections.ConfigDict(dict(
      preset=preset,
      # The named image tower of VISION_PRESETS that replaced the preset's ('' = none);
      # its values count as defaults, e.g. when image_init checks sizes set by hand.
      vision_preset=vision,
      vision=p['vision'],
      text=p['text'],
      shared=p['shared'],
      video=_video(p['vision']),
      # Pooling of each path's shared-transformer output: 'cls' (first token) or 'mean'
      # (masked mean over real tokens; for images over the patches, without the class
      # token and registers). image_pool='tower' (with shared.depth=0 only): the image
      # tower's own pooled output (vision.pooler: CLIP's normalised class token,
      # SigLIP's attention-pooling head), as CLIP and SigLIP embed images. A tower
      # without a class token (SigLIP's So400m/14) defaults to 'mean'.
      image_pool='cls' if p['vision'].get('class_token', True) else 'mean',
      text_pool='cls',
      embed_dim=p['embed_dim'],
      # Initial softmax temperature; the model learns log(1/temperature).
      temperature_init=0.07,
      # Upper bound of the logit scale 1/temperature (CLIP's clamp).
      max_logit_scale=100.0,
      # A learned logit bias, initialised at `logit_bias_init`: the c of SigLIP's sigmoid
      # loss (loss.cross_modal.form='sigmoid' needs it; SigLIP: temperature_init=0.1,
      # logit_bias_init=-10).
      logit_bias=False,
      logit_bias_init=-10.0,
      # Compute dtype of matmuls: 'float32' or 'bfloat16'. Parameters stay fp32.
      dtype='float32',
      # Rematerialise each transformer block in the backward pass (saves activation memory).
      remat=False,
      # What a rematerialised block keeps for the backward pass (layers.REMAT_POLICIES):
      # 'full' (only its input), 'dots' (also its dense layers' outputs), 'all_dots'.
      remat_policy='full',
      # On TPU, attention without dropout runs as one Pallas kernel (models/attention.py).
      attention_kernel=True,
      # Width of external partner embeddings for the knowledge-sharing losses (e.g. a frozen
      # unimodal encoder's output); 0 = no external partner, no partner head.
      image_partner_dim=0,
      text_partner_dim=0,
      # Learnable prototypes for CODER's online clustering (loss.cluster); 0 = none.
      num_prototypes=0,
      # Layers of the GCN over the concept graph for CODER's concept branch (loss.concept);
      # 0 = no concept branch.
      concept_gcn_depth=0,
      # A local Hugging Face BERT folder (config.json + model.safetensors or
      # pytorch_model.bin) to initialise the text tower from; its sizes replace
      # `text`'s. '' = random init.
      text_init='',
      # Likewise a Hugging Face folder for the image tower ('' = random init): ViTModel,
      # CLIPVisionModel / CLIPModel, SiglipVisionModel / SiglipModel, Dinov2Model or
      # Dinov2WithRegistersModel; its sizes and layout replace `vision`'s
      # (cookie_jax/interop/hf_vision.py).
      image_init='',
  ))


def fully_shared(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """VLDeformer's decomposed single stream: every transformer layer shared by both
  modalities. The towers keep only their embeddings (patch / word + position, with
  their LayerNorm); the shared stack takes the towers' depth plus its own, so the
  per-modality depth stays the same. Each modality still runs alone, so retrieval
  encodes each side once. Returns `model_cfg`, changed in place."""
  model_cfg.shared.depth += max(model_cfg.vision.depth, model_cfg.text.depth)
  model_cfg.vision.depth = 0
  model_cfg.text.depth = 0
  return model_cfg
