"""docs/configuration.md, generated from the config schema: every key with its default,
its allowed values and its meaning in one line.

    python -m cookie_jax.config_doc            # rewrites docs/configuration.md
    python -m cookie_jax.config_doc --check    # exit 1 if the file is out of date

The defaults are `default_config()`'s, the allowed values `config.CHOICES` (the tuples
`validate_config` checks against), the meanings `MEANINGS` below: a one-line summary of
the comment beside each key where the schema defines it. A key of the schema without a
meaning here stops the generator, naming it, so that the reference never skips one.
"""

import difflib
import pathlib
import sys

import ml_collections

from cookie_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = ROOT / 'docs' / 'configuration.md'
COMMAND = 'python -m cookie_jax.config_doc'

# Section -> its keys' meanings: one line each, what the value means and what 0 / '' does.
_MODEL = {
    'preset': ("the named size the model came from: 'tiny', 'small', 'base' or 'large' "
               '(models/presets.py)'),
    'vision_preset': ("a named image tower (CLIP's B/32, B/16, L/14; SigLIP's So400m/14) in place "
                      "of the preset's; '' = the preset's"),
    'embed_dim': 'width of the shared embedding space both sides are projected into',
    'image_pool': ("pooling of the image path: 'cls', 'mean' over patches, or 'tower' (the image "
                   "tower's own pooled output; shared.depth=0 only)"),
    'text_pool': "pooling of the text path's shared-transformer output: 'cls' or masked 'mean'",
    'temperature_init': 'initial softmax temperature; the model learns log(1/temperature)',
    'max_logit_scale': "upper bound of the logit scale 1/temperature (CLIP's clamp)",
    'logit_bias': ("a learned logit bias, the c of SigLIP's sigmoid loss (needs "
                   "loss.cross_modal.form='sigmoid')"),
    'logit_bias_init': 'initial value of that bias (SigLIP: -10)',
    'dtype': 'compute dtype of the matmuls; parameters, LayerNorm, softmax and losses stay fp32',
    'remat': ('rematerialise each transformer block in the backward pass (less activation memory, '
              'more compute)'),
    'remat_policy': ("what a rematerialised block keeps for the backward pass: 'full' (only "
                     "its input), 'dots' (also its dense layers' outputs: attention "
                     "projections and MLP), 'all_dots' (every matmul's output, the attention "
                     "scores included)"),
    'attention_kernel': ('on TPU, attention without dropout runs as one Pallas kernel that '
                         'keeps the scores in VMEM (cookie_jax/models/attention.py); False: '
                         "XLA's einsums, as on every other platform"),
    'image_partner_dim': ('width of external image partner embeddings '
                          "(loss.visual.partner='external'); 0 = none"),
    'text_partner_dim': ('width of external text partner embeddings '
                         "(loss.textual.partner='external'); 0 = none"),
    'num_prototypes': "learnable prototypes of CODER's online clustering (loss.cluster); 0 = none",
    'concept_gcn_depth': ("layers of the GCN over CODER's concept graph (loss.concept); 0 = no "
                          'concept branch'),
    'text_init': ('a Hugging Face BERT / RoBERTa / XLM-R folder or Hub id to start the text tower '
                  "from; '' = random init"),
    'image_init': ('a Hugging Face ViT / CLIP / SigLIP / DINOv2 folder or Hub id to start the '
                   "image tower from; '' = random init"),
}
_BLOCKS = {  # keys every transformer stack has (vision, text, shared, video)
    'width': 'hidden width of the tokens',
    'depth': 'transformer blocks',
    'heads': 'attention heads (must divide width)',
    'mlp_dim': 'hidden width of each MLP',
    'dropout': 'dropout rate on the residual branches and embeddings, in training',
    'attention_dropout': 'dropout rate on the attention weights, in training',
}
_VISION = {
    'image_size': 'input images are resized to this many pixels a side',
    'patch_size': 'pixels a side of each patch token',
    'patch_dropout': ("FLIP's patch dropout: the fraction of patch tokens dropped per image in "
                      'training, in [0, 1)'),
    'class_token': 'a learned class token first (False: SigLIP, patches only)',
    'registers': "DINOv2's register tokens after the class token; 0 = none",
    'patch_bias': "the patch embedding's bias (CLIP has none)",
    'pre_norm': "a LayerNorm right after the embeddings (CLIP's pre_layrnorm)",
    'final_norm': ("'tokens': the last LayerNorm on every token; 'pooled': on the pooled class "
                   'token only (CLIP)'),
    'activation': ("the MLP's activation: erf 'gelu', 'gelu_pytorch_tanh' (SigLIP), 'quick_gelu' "
                   '(CLIP)'),
    'layer_norm_eps': "every LayerNorm's epsilon (ViT 1e-12, CLIP 1e-5, SigLIP / DINOv2 1e-6)",
    'layer_scale': "LayerScale's initial value on both residual branches (DINOv2); 0 = none",
    'position_grid': ('side of the learned position table, resized to the patch grid; 0 = '
                      'image_size // patch_size'),
    'position_interpolation': ("how that table is resized: 'bicubic' (Dinov2Model) or "
                               "'bicubic_antialias' (with registers)"),
    'pooler': ("the tower's pooled output: 'tanh' (ViTModel), 'cls' (CLIP, DINOv2) or 'map' "
               "(SigLIP's attention pooling)"),
    'mask_token': ("DINOv2's mask token: never used, kept so that a checkpoint imports and "
                   'exports whole'),
}
_TEXT = {
    'vocab_size': 'rows of the word-embedding table (the tokenizer must fit in it)',
    'max_positions': 'rows of the position-embedding table: the longest text the tower takes',
    'type_vocab_size': "rows of the token-type table (BERT 2, RoBERTa 1)",
    'positions': ("'absolute' (BERT) or 'after_padding' (RoBERTa, XLM-R: positions count past "
                  'pad_token_id)'),
    'pad_token_id': 'the padding id those positions count past (RoBERTa and XLM-R: 1)',
    'layer_norm_eps': "every LayerNorm's epsilon (BERT 1e-12, RoBERTa and XLM-R 1e-5)",
    'hf_class': 'the transformers class an export writes for this tower',
}
_SHARED = {
    'modality_embedding': ('a learned per-modality vector added to the tokens before the shared '
                           'layers'),
    'modality_layernorm': 'a final LayerNorm per modality (True) or one for both (False)',
}
_VIDEO = {
    'num_frames': ('frames per clip the model takes at most (the temporal position table); 0 = an '
                   'image-only model'),
    'temporal': ("how frames become one token sequence: 'mean' over frames, or 'transformer' "
                 '(attention across frames, then the mean)'),
}
_LOSS = {
    'cross_modal.weight': 'weight of the image<->text InfoNCE in the total; 0 = off',
    'cross_modal.temperature': ("0 = the model's learned temperature; > 0 = fixed (VLDeformer: "
                                '0.02)'),
    'cross_modal.negative_weighting': ("'none' (InfoNCE), 'diversity' (CODER's weights) or 'topk' "
                                       '(only the topk hardest negatives)'),
    'cross_modal.diversity_beta': "beta of CODER's diversity weights exp(beta * sim); 0 = InfoNCE",
    'cross_modal.topk': "negatives kept per row with negative_weighting='topk'",
    'cross_modal.form': ("'softmax' (InfoNCE) or 'sigmoid' (SigLIP's pairwise loss as a ring; "
                         'needs model.logit_bias)'),
    'visual.weight': 'weight of the image<->image knowledge-sharing term; 0 = off',
    'visual.partner': ("'augmented' (a second augmented view) or 'external' (a given partner "
                       'embedding)'),
    'visual.temperature': 'fixed temperature of the visual term',
    'textual.weight': 'weight of the text<->text knowledge-sharing term; 0 = off',
    'textual.partner': "'dropout' (a second pass with another dropout mask) or 'external'",
    'textual.temperature': 'fixed temperature of the textual term',
    'chunk_size': ('negatives per chunk of the InfoNCE logsumexp (same loss, B_local x chunk '
                   'logits); 0 = unchunked'),
    'fuse_views': ("'on': all views of a step through each tower as one batch; 'off': one pass "
                   "per view; 'auto': on over >1 device"),
    'hard_negatives.captions': ("VLDeformer's composed negative captions (one word swapped within "
                                'its group)'),
    'hard_negatives.images': "VLDeformer's composed negative images (mixed with the next image)",
    'hard_negatives.image_mix': ("how images are mixed: 'region' (a pasted rectangle) or 'patch' "
                                 '(a share of the patches)'),
    'hard_negatives.word_groups': ("a JSON file of word lists to swap within; '' = "
                                   'colours/shapes/sides or mined content words'),
    'momentum.queue_size': ("keys of CODER's momentum encoder kept as extra negatives (a multiple "
                            'of the batch); 0 = off'),
    'momentum.momentum': 'EMA rate of the momentum encoder, in [0, 1)',
    'cluster.weight': "weight of CODER's online-clustering term; 0 = off",
    'cluster.temperature': 'softmax temperature of the code predictions',
    'cluster.epsilon': 'entropy regularisation of Sinkhorn-Knopp',
    'cluster.iterations': 'Sinkhorn-Knopp iterations',
    'concept.weight': "weight of CODER's concept-level alignment term; 0 = off",
    'concept.num_concepts': 'content words mined from the training captions as concepts',
    'concept.temperature': 'softmax temperature of the attention over concepts',
    'concept.captions': 'training captions read to mine the concepts',
}
_SIZES = {
    'train_images': 'training images generated', 'train_clips': 'training clips generated',
    'train_captions': 'captions per training item',
    'eval_images': 'images per eval split (val, test)',
    'eval_clips': 'clips per eval split (val, test)', 'eval_captions': 'captions per eval item',
    'image_size': 'stored pixels a side', 'frames': 'frames stored per clip',
    'seed': "the dataset's own seed, independent of the training seed",
    'vocab_size': 'upper bound of the WordPiece vocabulary trained on its captions',
}
_DATA = {
    'builder': ("what is read: the embedded 'synthetic' set, COCO / Flickr30K 'karpathy' folders, "
                "any 'tfds' set, 'img2dataset' shards, or video"),
    'data_dir': ("where tfds datasets are written and read (local or gs://); '' = "
                 '~/tensorflow_datasets'),
    'max_len': 'token length after truncation and padding',
    'tokenizer': ("a folder, file or Hub id with tokenizer.json or vocab.txt; '' = the synthetic "
                  "dataset's own vocabulary"),
    'lowercase': 'lowercase before WordPiece (for a bare vocab.txt; tokenizer.json says itself)',
    'manual_dir': ('the raw files, read only to build the dataset (Karpathy, MSRVTT or '
                   'img2dataset folder)'),
    'karpathy_dataset': "builder='karpathy': which dataset's split file",
    'tfds_name': "builder='tfds': a prepared dataset, e.g. 'coco_captions' (never downloaded here)",
    'tfds_image_key': "builder='tfds': the image feature ('/' goes into nested features)",
    'tfds_text_key': "builder='tfds': the text feature, one string or a sequence",
    'train_split': 'tfds split expression trained on',
    'val_split': 'tfds split expression validated on',
    'test_split': 'tfds split expression tested on after training',
    'img2dataset.name': ("the corpus's name in the built copy's folder; '' = the folder's name "
                         'and a hash of its path'),
    'img2dataset.max_side': 'longer side of stored images at most; 0 = keep the size',
    'img2dataset.quality': 'JPEG quality of re-encoded images',
    'img2dataset.val_fraction': "fraction of keys (by hash) that go to 'val'; the rest is 'train'",
    'img2dataset.workers': 'processes of a local build, each taking whole shards; 0 = one per core',
    'num_frames': 'video: frames per clip fed, evenly spread over those stored; 0 = all',
    'msrvtt.train_list': ("MSRVTT training videos: '9k' (all outside the 1k-A test) or '7k' "
                          '(official train + validate)'),
    'msrvtt.frames': 'frames sampled per clip when building (segment centres)',
    'msrvtt.image_size': 'stored frame size (shorter side resized, centre-cropped)',
    'mixture': ('weighted training datasets: ((overrides of the builder keys, weight), ...); () = '
                'this dataset alone'),
    'group_size': ('consecutive stored records drawn together into one batch (2 = the synthetic '
                   'twins); 1 = independent'),
    'cache_mb': ('keep equal-sized decoded images in memory when the split needs at most this '
                 'many MB; 0 = never'),
    'crop_scale': 'random resized crop: range of the fraction of the image area kept',
    'crop_ratio': 'random resized crop: range of aspect ratios',
    'flip': "random horizontal flip (off: captions say 'left' and 'right')",
    'mean': 'per-channel mean subtracted from [0, 1] pixels',
    'std': 'per-channel standard deviation the pixels are divided by',
    'num_parallel_calls': 'tf.data parallelism of decoding and augmentation; -1 = autotune',
    'prefetch': 'batches tf.data prepares ahead; -1 = autotune',
    'device_prefetch': ('global batches a background thread puts on the devices ahead of the '
                        'step; 0 = none'),
}
_OPTIM = {
    'lr': 'peak learning rate (AdamW)', 'warmup_steps': 'steps of linear warmup from 0',
    'schedule': 'the decay after warmup',
    'end_lr_factor': 'final learning rate as a fraction of lr',
    'weight_decay': 'AdamW weight decay (not on biases, norms or frozen parameters)',
    'b1': "Adam's first-moment decay", 'b2': "Adam's second-moment decay",
    'eps': "Adam's epsilon", 'clip_norm': 'global-norm gradient clipping; 0 = off',
}
_TRAIN = {
    'batch_size': 'global batch over all processes and devices',
    'steps': 'training steps',
    'log_every': 'steps between logged metrics (metrics.jsonl, TensorBoard, progress bar)',
    'accum_steps': ('micro-batches per step (GradCache: the loss still sees the whole batch as '
                    'negatives)'),
    'init_from': "fine-tuning: another run's workdir or checkpoint to start from; '' = random init",
    'init_step': 'the step of init_from; -1 = its latest',
    'freeze': ("locked parameters (LiT): regular expressions over '/'-joined paths, e.g. "
               "('vision',); () = none"),
    'progress_bar': 'a console progress bar (process 0)',
    'peak_flops': "peak FLOP/s of one device for MFU; 0 = looked up by device kind (none for CPUs)",
    'profile_steps': ('a jax.profiler trace of steps (start, stop) into WORKDIR/profile; (0, 0) = '
                      'none'),
    'wandb_project': "mirror metrics to this Weights & Biases project ('[wandb]' extra); '' = off",
    'wandb_entity': "the W&B entity; '' = your default",
    'wandb_run': "the W&B run's display name; '' = W&B's choice",
    'compiled': ("a train step saved by launch/compile.py --save=PATH, loaded instead of "
                 "compiling (refused if jax, devices, mesh or program differ); '' = compile"),
}
_EVAL = {
    'batch_size': 'global batch of the encoders in validation and test',
    'every': 'validation retrieval every N steps; 0 = never during training',
    'test_at_end': 'evaluate the test split after training (WORKDIR/test_retrieval.json)',
    'data': ('the dataset validation and test read, as config.data keys on top of it; {} = '
             "config.data's"),
}
_MESH = {
    'data': 'devices on the data axis (batch only); -1 = the devices left over',
    'fsdp': 'devices on the fsdp axis (batch, parameters and optimiser state); -1 = left over',
    'tensor': 'devices on the tensor axis (heads and MLP split); -1 = left over',
    'dcn_data': 'slices joined over the data-centre network (TPU multislice); 1 = one slice',
}
_CHECKPOINT = {
    'every': 'save every N steps; 0 = only at the end and on preemption',
    'keep': 'keep the last N checkpoints',
    'keep_best': '... plus the best one by validation RSUM',
    'async_save': 'write checkpoints in the background while training continues',
}


def _prefixed(prefix: str, table: dict) -> dict:
  return {f'{prefix}.{k}': v for k, v in table.items()}


MEANINGS = {
    'seed': 'the one seed model init, data order, augmentation and dropout derive from',
    **_prefixed('model', _MODEL),
    **{f'model.{tower}.{k}': v for tower in ('vision', 'text', 'shared', 'video')
       for k, v in _BLOCKS.items() if (tower, k) != ('video', 'width')},  # video: vision's
    **_prefixed('model.vision', _VISION), **_prefixed('model.text', _TEXT),
    **_prefixed('model.shared', _SHARED), **_prefixed('model.video', _VIDEO),
    **_prefixed('loss', _LOSS), **_prefixed('data', _DATA),
    **{f'data.synthetic.{k}': v for k, v in _SIZES.items() if 'clip' not in k and k != 'frames'},
    **{f'data.synthetic_video.{k}': v for k, v in _SIZES.items() if 'images' not in k},
    **_prefixed('optim', _OPTIM), **_prefixed('train', _TRAIN), **_prefixed('eval', _EVAL),
    **_prefixed('mesh', _MESH), **_prefixed('checkpoint', _CHECKPOINT),
}


def _leaves(node, prefix=''):
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict) and not (prefix + key) == 'eval.data':
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _cell(value) -> str:
  text = repr(tuple(value) if isinstance(value, list) else
              value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
  return '`' + text.replace('|', '\\|') + '`'


def reference() -> str:
  """The text of docs/configuration.md."""
  schema = config_lib.default_config()
  rows = list(_leaves(schema))
  missing = [key for key, _ in rows if key not in MEANINGS]
  if missing:
    raise KeyError(f'No meaning for config key(s) {missing} in cookie_jax/config_doc.py '
                   'MEANINGS; add one line each, then run ' + COMMAND + '.')
  paths = {key for key, _ in rows}
  stale = sorted(set(MEANINGS) - paths) + sorted(set(config_lib.CHOICES) - paths)
  if stale:
    raise KeyError(f'cookie_jax/config_doc.py MEANINGS or config.CHOICES name keys the schema '
                   f'does not have: {stale}.')
  out = [
      '# Configuration reference',
      '',
      f'<!-- Generated by `{COMMAND}` from cookie_jax/config.py; do not edit by hand. -->',
      '',
      'Configs are `ml_collections.ConfigDict`s from `get_config(arg)`, selected as',
      '`--config=configs/base.py:<variant>` and changed with `--config.KEY=VALUE`. The',
      'top-level sections are `model`, `loss`, `data`, `optim`, `train`, `eval`, `mesh` and',
      '`checkpoint`. `validate_config` rejects unknown keys (suggesting the nearest valid',
      'one) and values that cannot work, naming the key, the value and the fix. The',
      'defaults below are the schema\'s (`default_config()`, the `tiny` model); the sizes of',
      '`small`, `base` and `large` are in `cookie_jax/models/presets.py`, and each variant of',
      '`configs/base.py` changes some of these values:',
      '',
      ', '.join(f'`{v}`' for v in _variants()) + '.',
      '',
      '"allowed" lists the only values a key takes where it takes one of a few',
      '(`config.CHOICES`, which the checks use); the comments beside each key in',
      '`cookie_jax/config.py`, `cookie_jax/data/defaults.py` and',
      '`cookie_jax/models/presets.py` say more.',
  ]
  section = None
  for key, default in rows:
    top = key.split('.')[0] if '.' in key else '(top level)'
    if top != section:
      section = top
      out += ['', f'## {section}', '', '| key | default | allowed | meaning |', '|---|---|---|---|']
    allowed = ', '.join(_cell(a) for a in config_lib.CHOICES.get(key, ()))
    out.append(f'| `{key}` | {_cell(default)} | {allowed} | {MEANINGS[key]} |')
  return '\n'.join(out) + '\n'


def _variants() -> tuple:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('cookie_configs_base', ROOT / 'configs' / 'base.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.VARIANTS


def stale_message() -> str | None:
  """None when docs/configuration.md is what `reference()` writes; else why, in one line."""
  want = reference()
  have = OUTPUT.read_text(encoding='utf-8') if OUTPUT.exists() else ''
  if have == want:
    return None
  diff = [l for l in difflib.unified_diff(have.splitlines(), want.splitlines(), lineterm='', n=0)
          if l[:1] in '+-' and l[:3] not in ('+++', '---')]
  return (f'docs/configuration.md is out of date with the config schema ({len(diff)} lines '
          f'differ, first: {diff[0][:100]!r}); regenerate it: {COMMAND}')


def main(argv) -> int:
  if '--check' in argv[1:]:
    message = stale_message()
    print(message or 'docs/configuration.md is up to date.')
    return 1 if message else 0
  OUTPUT.write_text(reference(), encoding='utf-8')
  print(f'wrote {OUTPUT}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
