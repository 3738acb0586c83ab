"""Defaults of the `config.data` section. Pure Python: importing this never imports TF."""

import ml_collections

BUILDERS = ('synthetic', 'karpathy', 'tfds', 'msrvtt', 'synthetic_video', 'img2dataset')
# Builders whose examples are clips of frames ([T, H, W, 3]) rather than images.
VIDEO_BUILDERS = ('msrvtt', 'synthetic_video')
# Builders that train and ship their own WordPiece vocabulary.
OWN_VOCAB_BUILDERS = ('synthetic', 'synthetic_video')
# The allowed values of the `config.data` keys that take one of a few (the one place they
# are written: the checks below and docs/configuration.md read them).
DATA_CHOICES = {
    'builder': BUILDERS,
    'karpathy_dataset': ('coco', 'flickr30k'),
    'msrvtt.train_list': ('9k', '7k'),
}
# config.data.tokenizer naming the synthetic image set's vocabulary rather than a path.
SYNTHETIC_VOCAB = 'synthetic'

# The generated datasets' sizes: the defaults of config.data.synthetic / synthetic_video
# and of their builder configs (builders/synthetic.py, builders/synthetic_video.py).
SYNTHETIC_SIZES = dict(
    train_images=10_000,
    train_captions=3,  # per training image (at most 7): 30k pairs
    eval_images=1000,  # per eval split (val and test)
    eval_captions=5,  # per eval image, as in COCO / Flickr30K (at most 7)
    image_size=64,  # stored resolution; the pipeline resizes to the model's
    seed=0,  # the dataset's own seed, independent of the training seed
    vocab_size=1024,  # upper bound of the trained WordPiece vocabulary (tiny model: 1024)
)
SYNTHETIC_VIDEO_SIZES = dict(
    train_clips=6000,
    train_captions=3,  # per training clip (at most 6)
    eval_clips=1000,  # per eval split (val and test)
    eval_captions=5,  # per eval clip (at most 6)
    frames=4,
    image_size=32,  # stored frame size
    seed=0,  # the dataset's own seed, independent of the training seed
    vocab_size=512,  # upper bound of the trained WordPiece vocabulary
)


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(**_source_keys(), **_input_keys()))


def _source_keys() -> dict:
  """What is read: the builder, its files and splits, the tokenizer."""
  return dict(
      # 'synthetic' (embedded, generated), 'karpathy' (COCO/Flickr30K from local files),
      # 'tfds' (any tfds dataset with an image and a text feature), 'img2dataset'
      # (img2dataset's webdataset or parquet shards, built once into ArrayRecord), and for video
      # 'msrvtt' (MSR-VTT from local files) or 'synthetic_video' (embedded, generated).
      builder='synthetic',
      # Where tfds datasets are written and read; '' = tfds' default (~/tensorflow_datasets).
      data_dir='',
      # Token length after truncation / padding.
      max_len=32,

      # A folder (local, or any path etils.epath reads: gs://...) holding tokenizer.json or
      # vocab.txt, or either file. '' = the WordPiece vocabulary stored with the synthetic
      # dataset (image or video) being read; 'synthetic' = the synthetic image set's (config
      # `synthetic`) whatever the builder, e.g. to fine-tune a synthetic run on synthetic_video.
      tokenizer='',
      # Lowercase before WordPiece; used for a bare vocab.txt (tokenizer.json says itself).
      lowercase=True,
      # The raw files, read only to build the dataset ('' once it is built in data_dir):
      # karpathy: the folder with dataset_<name>.json and the images; msrvtt: the MSRVTT
      # folder (see builders/msrvtt.py); img2dataset: the folder img2dataset wrote (*.tar
      # or *.parquet shards; a local path or anything tfds reads, e.g. gs://...).
      manual_dir='',
      # builder='karpathy': 'coco' or 'flickr30k'.
      karpathy_dataset='coco',
      # builder='tfds': a prepared dataset, e.g. 'coco_captions' or 'name/config:1.0.0'.
      # It is never downloaded here; prepare it with `tfds build` first.
      tfds_name='',
      # builder='tfds': feature keys; '/' goes into nested features. The text feature
      # may be one string or a sequence of strings (all are kept, one is drawn per visit).
      tfds_image_key='image',
      tfds_text_key='captions/text',

      # tfds split expressions. COCO Karpathy: 'train+restval' gives the usual 113k images.
      train_split='train',
      val_split='val',
      test_split='test',

      # builder='synthetic': sizes of the generated dataset (each size set is its own
      # tfds config, so changing one builds a new copy once and never overwrites).
      synthetic=dict(SYNTHETIC_SIZES),

      # builder='img2dataset': how the shards are built into a tfds dataset (see
      # builders/img2dataset.py). name, max_side, quality and val_fraction name the built
      # copy (data_dir/img2dataset/<name>_side<max_side>_q<quality>[_val<fraction>]/), so
      # changing one builds a new copy and never overwrites.
      img2dataset=dict(
          # The corpus's name in that folder name, e.g. 'cc3m'. '' = the base name of
          # manual_dir and a hash of its full path (so a moved folder builds anew).
          name='',
          max_side=384,  # longer side of stored images at most (pre-resized); 0 = keep
          quality=95,  # JPEG quality of images that are re-encoded
          # img2dataset output has no splits: everything is 'train', except this
          # fraction of keys, chosen by a hash of the key, which goes to 'val'.
          val_fraction=0.0,
          # Processes of a local build, each taking whole shards; 0 = one per core.
          # (A Beam build, launch/build_data.py --beam_pipeline_options, has its own.)
          workers=0,
      ),

      # Video builders: frames per clip fed to the model, taken evenly spread from the
      # frames stored per clip (the centre of each of num_frames equal segments);
      # 0 = every stored frame. A temporal transformer takes at most model.video.num_frames.
      num_frames=0,
      # builder='msrvtt': what is built once from the videos (each setting is its own tfds
      # config, so changing one builds a new copy and never overwrites).
      msrvtt=dict(
          # Training videos: '9k' (MSRVTT_train.9k.csv: every video outside the 1k-A test,
          # the usual choice with the 1k-A test) or '7k' (MSRVTT_train.7k.csv: the
          # official train + validate videos, for the full 2,990-video test).
          train_list='9k',
          frames=12,  # frames sampled per clip (segment centres), as CLIP4Clip
          image_size=224,  # stored frame size: shorter side resized, centre-cropped
      ),
      # builder='synthetic_video': sizes of the generated clips (see builders/motion.py).
      synthetic_video=dict(SYNTHETIC_VIDEO_SIZES),

  )


def _input_keys() -> dict:
  """How it is read: mixtures, caching, augmentation, parallelism."""
  return dict(
      # A weighted mixture of training datasets: entries (overrides, weight), each
      # overrides a dict of the builder keys above (builder, manual_dir, train_split,
      # tfds_name, synthetic, ...) applied on top of this section; ({}, w) is this
      # section's own dataset. Rows are drawn in the weights' proportions, exactly per
      # block of 4096 positions, as a function of (seed, step). () = this dataset alone.
      # Tokenizer, augmentation and the rest are shared: they cannot be overridden.
      mixture=(),
      # Records drawn together: the shuffle permutes groups of `group_size` consecutive
      # records (in stored order) and a group fills consecutive rows of one batch, so
      # records stored side by side are each other's in-batch negatives. The synthetic
      # sets store the twins of a scene (or clip) side by side: group_size=2 puts a scene
      # and its one-binding-changed twin in the same batch, the hard negative that
      # retrieval over the whole split must tell apart. 1 = records drawn independently.
      # Needs one dataset (no mixture) and a per-process batch that it divides.
      group_size=1,
      # Equal-sized images (the synthetic set) are kept decoded in memory, with their
      # captions tokenised, when the whole training split needs at most this many MB
      # (every process holds all of it: any process may read any record); 0 = never.
      cache_mb=1024,
      # Random resized crop: fraction of the image area and aspect-ratio range. The
      # defaults keep every object of a synthetic scene in view; for photos CLIP-style
      # training uses about (0.5, 1.0) or (0.08, 1.0).
      crop_scale=(0.8, 1.0),
      crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
      # Random horizontal flip. Off because captions name 'left' and 'right' (all of the
      # synthetic relations, and some COCO captions): a flip would make them false.
      flip=False,
      # Per-channel normalisation of [0, 1] pixels (ImageNet statistics).
      mean=(0.485, 0.456, 0.406),
      std=(0.229, 0.224, 0.225),
      # tf.data parallelism of decoding and augmentation; -1 = autotune.
      num_parallel_calls=-1,
      # Batches prepared ahead of the accelerator; -1 = autotune.
      prefetch=2,
      # Global batches a background thread puts on the devices ahead of the training
      # step (cookie_jax/data/prefetch.py); 0 = none, the loop's thread does it.
      device_prefetch=2,
  )


def _require(cond, key, value, expected):
  if not cond:
    raise ValueError(f'config.data.{key}={value!r}: {expected}')


def one_of(allowed) -> str:
  """"use 'a', 'b' or 'c'.": the fix of a value outside `allowed`."""
  names = [repr(a) for a in allowed]
  return f"use {', '.join(names[:-1])} or {names[-1]}." if len(names) > 1 else (
      f'use {names[0]}.')


def _range_ok(r, lo, hi):
  return len(r) == 2 and lo < r[0] <= r[1] <= hi


def validate_img2dataset(d) -> None:
  """The checks of builder='img2dataset' alone (building needs no tokenizer)."""
  w = d.img2dataset
  _require(bool(d.manual_dir or w.name), 'manual_dir', d.manual_dir,
           "builder=img2dataset needs the folder img2dataset wrote (or, for a copy "
           "already built in data_dir, its config.data.img2dataset.name).")
  _require(all(c.isalnum() or c == '_' for c in w.name), 'img2dataset.name', w.name,
           "use letters, digits and '_' only, e.g. 'cc3m'.")
  _require(w.max_side == 0 or w.max_side >= 16, 'img2dataset.max_side', w.max_side,
           'use 0 (keep the size) or a longer side of at least 16, e.g. 384.')
  _require(1 <= w.quality <= 100, 'img2dataset.quality', w.quality,
           'JPEG quality is 1 to 100; use e.g. 95.')
  _require(0.0 <= w.val_fraction < 1.0, 'img2dataset.val_fraction', w.val_fraction,
           "use 0 ('train' only) or a fraction below 1, e.g. 0.001.")
  _require(w.workers >= 0, 'img2dataset.workers', w.workers,
           'use 0 (one per core) or a number of processes.')


# Keys of `config.data` that a mixture entry cannot override: the whole batch shares them.
SHARED_KEYS = ('mixture', 'tokenizer', 'lowercase', 'max_len', 'val_split', 'test_split',
               'num_frames', 'group_size', 'cache_mb', 'crop_scale', 'crop_ratio', 'flip',
               'mean', 'std', 'num_parallel_calls', 'prefetch', 'device_prefetch')


def _override(node, overrides, where, shared=SHARED_KEYS):
  for key, value in overrides.items():
    if key not in node or key in shared:
      allowed = sorted(k for k in node.keys() if k not in shared)
      raise ValueError(f'{where}: {key!r} is not a key it can set; use one of {allowed} '
                       '(the rest of config.data is shared).')
    if isinstance(node[key], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise ValueError(f'{where}: {key!r} must be a dict of its keys, got {value!r}.')
      _override(node[key], value, f'{where}.{key}', shared=())
    else:
      node[key] = value


def mixture_components(data_cfg) -> list:
  """[(data config, weight)] of each training dataset: `data_cfg` alone, weight 1, or
  each entry of `data_cfg.mixture` applied on top of it."""
  if not data_cfg.mixture:
    return [(data_cfg, 1.0)]
  out = []
  for i, entry in enumerate(data_cfg.mixture):
    where = f'config.data.mixture[{i}]'
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2
            and isinstance(entry[0], dict)):
      raise ValueError(f'{where}={entry!r}: each entry is (overrides, weight), e.g. '
                       "({'builder': 'karpathy', 'manual_dir': '/data/coco'}, 0.3).")
    cfg = data_cfg.copy_and_resolve_references()
    cfg.mixture = ()
    _override(cfg, entry[0], where)
    out.append((cfg, entry[1]))
  from cookie_jax.data.order import check_weights  # pylint: disable=g-import-not-at-top
  weights = check_weights([w for _, w in out])
  return [(cfg, float(w)) for (cfg, _), w in zip(out, weights)]


def clip_frames(data_cfg) -> int | None:
  """Frames per clip the input feeds for a video builder (`num_frames`, or every stored
  frame when it is 0); None for an image builder."""
  if data_cfg.builder not in VIDEO_BUILDERS:
    return None
  return data_cfg.num_frames or data_cfg[data_cfg.builder].frames


def eval_data_config(data_cfg, overrides) -> ml_collections.ConfigDict:
  """What evaluation reads: `data_cfg` with `overrides` (config.eval.data) on top, no
  mixture. Tokenizer, max_len and normalisation follow config.data unless overridden."""
  cfg = data_cfg.copy_and_resolve_references()
  cfg.mixture = ()
  overrides = overrides.to_dict() if hasattr(overrides, 'to_dict') else dict(overrides or {})
  if 'mixture' in overrides:
    raise ValueError("config.eval.data: 'mixture' is not a key evaluation reads; give one "
                     'dataset (builder, manual_dir, ...).')
  _override(cfg, overrides, 'config.eval.data', shared=('mixture',))
  return cfg


def _check_generated_sizes(d) -> None:
  """The stored frames of the video builders and the sizes of the generated sets."""
  if d.builder == 'msrvtt':
    m = d.msrvtt
    _require(m.train_list in DATA_CHOICES['msrvtt.train_list'], 'msrvtt.train_list',
             m.train_list, one_of(DATA_CHOICES['msrvtt.train_list']))
    for key in ('frames', 'image_size'):
      _require(m[key] > 0, f'msrvtt.{key}', m[key], 'must be positive.')
    _require(d.num_frames <= m.frames, 'num_frames', d.num_frames,
             f'msrvtt stores msrvtt.frames={m.frames} frames per clip; feed at most that.')
  if d.builder == 'synthetic_video':
    v = d.synthetic_video
    for key in ('train_clips', 'eval_clips', 'frames', 'image_size', 'vocab_size'):
      _require(v[key] > 0, f'synthetic_video.{key}', v[key], 'must be positive.')
    for key in ('train_captions', 'eval_captions'):
      _require(1 <= v[key] <= 6, f'synthetic_video.{key}', v[key],
               'there are 6 phrasings per clip; use 1 to 6.')
    _require(v.frames >= 2, 'synthetic_video.frames', v.frames,
             'motion and change need at least 2 frames; use e.g. 4.')
    _require(d.num_frames <= v.frames, 'num_frames', d.num_frames,
             f'synthetic_video stores {v.frames} frames per clip; feed at most that.')
    _require(v.vocab_size >= 64, 'synthetic_video.vocab_size', v.vocab_size,
             'the characters and special tokens alone need about 40; use e.g. 512.')
    _require(not d.flip, 'flip', d.flip,
             "the synthetic clips move left and right, which a flip reverses; set "
             'flip=False.')
  if d.builder == 'synthetic':
    s = d.synthetic
    for key in ('train_images', 'eval_images', 'image_size', 'vocab_size'):
      _require(s[key] > 0, f'synthetic.{key}', s[key], 'must be positive.')
    for key in ('train_captions', 'eval_captions'):
      _require(1 <= s[key] <= 7, f'synthetic.{key}', s[key],
               'there are 7 phrasings per scene; use 1 to 7.')
    _require(s.vocab_size >= 64, 'synthetic.vocab_size', s.vocab_size,
             'the characters and special tokens alone need about 40; use e.g. 1024.')
    _require(not d.flip, 'flip', d.flip,
             "the synthetic captions say 'left of' / 'right of', which a flip makes "
             'false; set flip=False.')


def validate_data_config(data_cfg) -> None:
  """Raises ValueError naming `config.data.<key>`, the value and the fix."""
  d = data_cfg
  if d.mixture:
    for i, (cfg, _) in enumerate(mixture_components(d)):
      try:
        validate_data_config(cfg)
      except ValueError as e:
        raise ValueError(f'config.data.mixture[{i}]: {e}') from None
  _require(d.builder in DATA_CHOICES['builder'], 'builder', d.builder,
           one_of(DATA_CHOICES['builder']))
  _require(d.max_len >= 2, 'max_len', d.max_len,
           'needs room for [CLS] and [SEP]; use e.g. 32.')
  # manual_dir (the raw files) is not required here: a copy already built in data_dir
  # opens without it, and building one without it fails naming both (data/sources.py).
  if d.builder == 'karpathy':
    _require(d.karpathy_dataset in DATA_CHOICES['karpathy_dataset'], 'karpathy_dataset',
             d.karpathy_dataset, one_of(DATA_CHOICES['karpathy_dataset']))
  if d.builder == 'img2dataset':
    validate_img2dataset(d)
  if d.builder == 'tfds':
    _require(bool(d.tfds_name), 'tfds_name', d.tfds_name,
             "builder=tfds needs a prepared dataset's name, e.g. 'coco_captions'.")
  if d.builder not in OWN_VOCAB_BUILDERS:
    _require(bool(d.tokenizer), 'tokenizer', d.tokenizer,
             'only the synthetic datasets ship a vocabulary; give a folder (local or '
             'gs://...) with tokenizer.json or vocab.txt (e.g. of bert-base-uncased).')
  _require(d.num_frames >= 0, 'num_frames', d.num_frames,
           'must be >= 0 (0 = every stored frame of a clip).')
  _check_generated_sizes(d)
  _require(d.group_size >= 1, 'group_size', d.group_size,
           'must be >= 1 (1 = records drawn one by one).')
  _require(d.group_size == 1 or not d.mixture, 'group_size', d.group_size,
           'groups of records need one dataset; with a mixture, set it to 1.')
  _require(d.cache_mb >= 0, 'cache_mb', d.cache_mb, 'must be >= 0 (0 = no cache).')
  _require(_range_ok(d.crop_scale, 0.0, 1.0), 'crop_scale', d.crop_scale,
           'must be (min, max) with 0 < min <= max <= 1, e.g. (0.8, 1.0).')
  _require(_range_ok(d.crop_ratio, 0.0, float('inf')), 'crop_ratio', d.crop_ratio,
           'must be (min, max) with 0 < min <= max, e.g. (0.75, 1.333).')
  _require(len(d.mean) == 3 and len(d.std) == 3 and min(d.std) > 0, 'std', d.std,
           'mean and std need 3 values each (RGB), std > 0.')
  _require(d.num_parallel_calls == -1 or d.num_parallel_calls >= 1, 'num_parallel_calls',
           d.num_parallel_calls, 'use -1 (autotune) or a positive count.')
  _require(d.device_prefetch >= 0, 'device_prefetch', d.device_prefetch,
           'use 0 (none) or a number of batches, e.g. 2.')
  _require(d.prefetch >= -1, 'prefetch', d.prefetch,
           'use -1 (autotune), 0 (none) or a number of batches.')
