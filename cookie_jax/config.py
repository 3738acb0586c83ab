"""The config schema: every key, its default and its meaning, and the checks on values.

`configs/*.py` start from `default_config()` and change values; `validate_config` rejects
any key that is not in the schema (with the nearest valid name) and any value that cannot
work, naming the key, the value and the fix.
"""

import difflib
import json
import math

from absl import logging
import ml_collections

from cookie_jax.errors import ConfigError
from cookie_jax.data.defaults import (DATA_CHOICES, VIDEO_BUILDERS, data_config,
                                     eval_data_config, one_of, validate_data_config)
from cookie_jax.losses import LOSS_NAMES
from cookie_jax.models import bert, vit
from cookie_jax.models.cookie import DTYPES
from cookie_jax.models.layers import ACTIVATIONS, REMAT_POLICIES
from cookie_jax.models.positions import METHODS as POSITION_METHODS
from cookie_jax.models.presets import VISION_PRESETS, model_config
from cookie_jax.optim import SCHEDULES
from cookie_jax.sharding import BATCH_AXES, MESH_AXES, mesh_shape


# The allowed values of every key that takes one of a few: the one place each is written.
# validate_config checks against them, and docs/configuration.md lists them
# (python -m cookie_jax.config_doc).
CHOICES = {
    'model.vision_preset': ('',) + tuple(VISION_PRESETS),
    'model.vision.final_norm': ('tokens', 'pooled'),
    'model.vision.activation': tuple(ACTIVATIONS),
    'model.vision.position_interpolation': tuple(POSITION_METHODS),
    'model.vision.pooler': ('tanh', 'cls', 'map'),
    'model.text.positions': tuple(bert.POSITIONS),
    'model.text.hf_class': tuple(bert.HF_CLASSES),
    'model.video.temporal': ('mean', 'transformer'),
    'model.image_pool': ('cls', 'mean', 'tower'),
    'model.text_pool': ('cls', 'mean'),
    'model.dtype': tuple(DTYPES),
    'model.remat_policy': tuple(REMAT_POLICIES),
    'loss.cross_modal.negative_weighting': ('none', 'diversity', 'topk'),
    'loss.cross_modal.form': ('softmax', 'sigmoid'),
    'loss.visual.partner': ('augmented', 'external'),
    'loss.textual.partner': ('dropout', 'external'),
    'loss.fuse_views': ('auto', 'on', 'off'),
    'loss.hard_negatives.image_mix': ('region', 'patch'),
    'optim.schedule': tuple(SCHEDULES),
    **{f'data.{key}': allowed for key, allowed in DATA_CHOICES.items()},
}


def _choice(key, value):
  _require(value in CHOICES[key], key, value, one_of(CHOICES[key]))


def default_config(preset: str = 'tiny', vision: str = '') -> ml_collections.ConfigDict:
  """`vision`: a named image tower of presets.VISION_PRESETS ('B/16', ...) in place of the
  preset's."""
  c = ml_collections.ConfigDict()
  # The one seed from which model init, data order, augmentation and dropout derive.
  c.seed = 0
  c.model = model_config(preset, vision)
  c.loss = _loss_config()
  c.data = data_config()
  c.optim = _optim_config()
  c.train = _train_config()
  c.eval = _eval_config()
  # Device mesh sizes; -1 takes the devices left over. data * fsdp shards the batch,
  # fsdp also shards parameters and optimiser state, tensor shards heads and MLP.
  # dcn_data: the number of slices (TPU multislice, joined over the data-centre network);
  # data, fsdp and tensor then describe one slice, and the batch is also split over the
  # slices (the mesh's data axis is dcn_data x data). 1 = one slice.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
  c.checkpoint = _checkpoint_config()
  return c


def _loss_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # image<->text InfoNCE over the global batch, with the model's learned temperature.
      # negative_weighting: 'none' | 'diversity' (CODER: stop-gradient weights
      # exp(diversity_beta * sim) / mean over the row's negatives; beta 0 = InfoNCE) |
      # 'topk' (in-batch hard-negative mining: only the `topk` most similar negatives).
      # temperature: 0 = learned (model.temperature_init); > 0 = fixed, e.g. VLDeformer's
      # sharp 0.02. See losses/contrastive.py.
      # form: 'softmax' (the InfoNCE above) | 'sigmoid' (SigLIP's pairwise sigmoid loss
      # with a learned scale and bias, computed as a ring over the batch devices; needs
      # model.logit_bias=True; SigLIP's init: model.temperature_init=0.1,
      # model.logit_bias_init=-10; see losses/sigmoid.py).
      cross_modal=dict(weight=1.0, temperature=0.0, negative_weighting='none',
                       diversity_beta=0.0, topk=16, form='softmax'),
      # image<->image: each image embedding against its partner view (see losses/contrastive.py).
      # partner: 'augmented' (a second augmented view through the same path) or 'external'
      # (a fixed partner embedding supplied with the batch as `image_partner`).
      visual=dict(weight=0.0, partner='augmented', temperature=0.1),
      # text<->text: partner 'dropout' (a second pass with another dropout mask) or 'external'
      # (`text_partner` in the batch).
      textual=dict(weight=0.0, partner='dropout', temperature=0.1),
      # Negatives per chunk of the InfoNCE logsumexp (0 = unchunked). The same loss and
      # gradients with B_local x chunk_size logits per device instead of B_local x B_global:
      # for global batches whose logits do not fit in memory.
      chunk_size=0,
      # How the views of a step share a tower (the second image view, the second dropout
      # pass, the composed negatives): 'on' runs every image view through the image tower
      # as one batch and every text view through the text tower as one (each view with
      # its own dropout; equal to one pass per view up to float rounding), so that under
      # FSDP each weight is gathered, and its gradient reduced, once per step instead of
      # once per view; 'off' runs one pass per view; 'auto' is 'on' where the step runs
      # on more than one device (on one CPU device separate passes of the tiny model ran
      # faster: docs/BENCHMARKS.md, "Communication audit").
      fuse_views='auto',
      # VLDeformer's bimodal hard negatives, appended to the cross-modal term's in-batch
      # negatives: `captions` composes a negative caption per pair by swapping one word for
      # another of its group (colour for colour, shape for shape on the synthetic set; the
      # mined content words elsewhere, or the groups in `word_groups`, a JSON list of word
      # lists); `images` mixes each image with the next one of the global batch
      # (`image_mix`: 'region' pastes a rectangle, 'patch' a random half of the patches).
      hard_negatives=dict(captions=False, images=False, image_mix='region', word_groups=''),
      # CODER's momentum encoder and queues (dynamic dictionaries): an EMA copy of the
      # model embeds every batch; its keys are enqueued (all devices' keys, FIFO) and the
      # last `queue_size` of them serve as extra cross-modal negatives. 0 = off.
      momentum=dict(queue_size=0, momentum=0.995),
      # CODER's online clustering: Sinkhorn-Knopp codes over model.num_prototypes
      # prototypes, each modality predicting the other's codes (losses/clustering.py).
      cluster=dict(weight=0.0, temperature=0.1, epsilon=0.05, iterations=3),
      # CODER's concept branch: `num_concepts` content words mined from the first
      # `captions` training captions, their co-occurrence graph through the model's GCN;
      # each embedding attends over the concept descriptors (softmax at `temperature`) and
      # the concept-level image and text embeddings are aligned like the cross-modal pair.
      concept=dict(weight=0.0, num_concepts=64, temperature=0.1, captions=20000),
  ))


def _optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1e-3,
      warmup_steps=0,
      # 'cosine' | 'linear' | 'constant' after the linear warmup.
      schedule='cosine',
      # Final learning rate as a fraction of `lr` (cosine and linear).
      end_lr_factor=0.0,
      weight_decay=0.05,
      b1=0.9,
      b2=0.98,
      eps=1e-6,
      # Global-norm gradient clipping; 0 disables it.
      clip_norm=1.0,
  ))


def _train_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Global batch over all processes and devices.
      batch_size=64,
      steps=100,
      log_every=10,
      # Micro-batches per step (GradCache): the loss still sees the negatives of the whole
      # batch; only one micro-batch's activations are alive at a time.
      accum_steps=1,
      # Fine-tuning: initialise the parameters from another run's workdir or checkpoint
      # directory ('' = random init). Ignored once this run has its own checkpoint.
      init_from='',
      # Which step of `init_from`; -1 = its latest.
      init_step=-1,
      # Locked parameters (LiT): regular expressions over '/'-joined parameter paths, each
      # matching whole leading path components, e.g. ('vision',) for the image tower or
      # ('text/layer/[0-3]',) for four text layers (cookie_jax/freeze.py). Frozen
      # parameters get no gradient (stop_gradient before the loss), no optimiser state
      # and no weight decay. () = train everything.
      freeze=(),
      # Show a console progress bar (process 0).
      progress_bar=True,
      # Peak matmul FLOP/s of one device, for train/mfu; 0 = from the table in
      # cookie_jax/flops.py by device kind (GPUs, TPUs; none for CPUs: no MFU logged).
      peak_flops=0.0,
      # A jax.profiler trace of steps (start, stop), both counted like logged steps and
      # included, into WORKDIR/profile/ (cookie_jax/profiler.py); (0, 0) = none.
      profile_steps=(0, 0),
      # Weights & Biases: mirror metrics.jsonl to this project ('' = off; needs the
      # `[wandb]` extra). A resumed run continues the same W&B run (WORKDIR/wandb_run.json).
      wandb_project='',
      wandb_entity='',  # '' = your default entity
      wandb_run='',  # the run's display name; '' = W&B's choice
      # A train step compiled ahead of time for this run's machine and saved by
      # `launch/compile.py --save=PATH` (cookie_jax/compiled_step.py): loaded instead of
      # compiling; refused, naming what differs, if the jax version, the devices, the mesh
      # or the program differ. '' = compile at the first step. Load only files you wrote
      # (an executable is a pickle).
      compiled='',
  ))


def _eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      batch_size=64,
      # Validation retrieval every N steps (0 = never during training).
      every=0,
      # Evaluate the test split after training and write WORKDIR/test_retrieval.json.
      test_at_end=True,
      # The dataset validation and test read, as keys of config.data set on top of it,
      # e.g. {'builder': 'karpathy', 'manual_dir': '/data/coco'} to validate a CC3M run
      # on COCO. {} = config.data itself; a builder without the split (img2dataset has
      # only 'train') then skips validation / test, and the log says so once.
      data={},
  ))


def _checkpoint_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Save every N steps (0 = only at the end and on preemption).
      every=0,
      # Keep the last N checkpoints ...
      keep=2,
      # ... plus the best one by validation RSUM.
      keep_best=True,
      # Write checkpoints in the background while training continues.
      async_save=True,
  ))


# Keys that configs saved by earlier versions hold and today's schema no longer has, with
# why; a saved config drops them (with a note), a config given today is refused.
RETIRED_KEYS = {
    'data.shuffle_buffer': 'the input now shuffles all records every epoch (a global '
                           'permutation), with no buffer',
}


def _drop_retired(saved: dict) -> dict:
  saved = json.loads(json.dumps(saved))  # a deep copy of plain JSON values
  for path, why in RETIRED_KEYS.items():
    *parents, leaf = path.split('.')
    node = saved
    for part in parents:
      node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node:
      del node[leaf]
      logging.info('The saved config has %r, which this version no longer has (%s); '
                   'ignored.', path, why)
  return saved


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
  """A config saved as JSON (e.g. in a checkpoint), on top of today's defaults.

  Keys added to the schema after the run was saved take their defaults; keys retired
  since (`RETIRED_KEYS`) are dropped; any other key the schema lacks is an error."""
  saved = _drop_retired(saved)
  preset = saved.get('model', {}).get('preset', 'tiny')
  config = default_config(preset if preset in _presets() else 'tiny')
  _check_keys(saved, config)

  def merge(node, values):
    for key, value in values.items():
      if node is config.eval and key == 'data':
        node[key] = value  # keys of config.data, not of the schema's empty {}
      elif isinstance(node[key], ml_collections.ConfigDict):
        merge(node[key], value)
      else:
        node[key] = tuple(value) if isinstance(node[key], tuple) else value
  merge(config, saved)
  return config


def _presets():
  from cookie_jax.models.presets import PRESETS  # pylint: disable=g-import-not-at-top
  return PRESETS


# Names other code bases give our keys, which string similarity alone would not find.
KEY_SYNONYMS = {
    'learning_rate': 'lr', 'total_steps': 'steps', 'num_steps': 'steps',
    'max_steps': 'steps', 'train_steps': 'steps', 'global_batch_size': 'batch_size',
    'batch': 'batch_size', 'wd': 'weight_decay', 'warmup': 'warmup_steps',
    'grad_clip': 'clip_norm', 'max_grad_norm': 'clip_norm', 'eval_every': 'every',
    'save_every': 'every', 'tokenizer_path': 'tokenizer', 'dataset': 'builder',
}


def _leaves(node, prefix=''):
  for key, value in node.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


def nearest_key(path: str, schema=None) -> str | None:
  """The valid key nearest to the dotted `path` that is not one, or None.

  In order: a known synonym or the same name in the section the path names (for
  'optim.learning_rate': 'optim.lr'), the same name in another section ('train.lr':
  'optim.lr'), then the most similar name in the section, then anywhere.
  """
  schema = default_config() if schema is None else schema
  parts, node = path.split('.'), schema
  for i, part in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return '.'.join(parts[:i])  # the path goes on below a value
    if part not in node:
      break
    node = node[part]
  else:
    return None  # a valid key
  done, leaves, leaf = parts[:i], list(_leaves(schema)), KEY_SYNONYMS.get(part, part)
  if leaf in node:
    return '.'.join(done + [leaf] + parts[i + 1:])
  elsewhere = [p for p in leaves if p.rsplit('.', 1)[-1] == leaf]
  close = difflib.get_close_matches(part, list(node.keys()), n=1)
  if not elsewhere and close:
    guess = '.'.join(done + close + parts[i + 1:])
    return guess if guess in leaves else '.'.join(done + close)
  names = {p.rsplit('.', 1)[-1]: p for p in reversed(leaves)}  # each name's first path
  close = elsewhere or [names[n] for n in difflib.get_close_matches(part, list(names), n=1)]
  return close[0] if close else None


def _check_keys(config, schema, prefix=''):
  for key in config.keys():
    path = f'{prefix}{key}'
    if path == 'eval.data':
      continue  # keys of config.data, checked by `_check_eval_data`
    if key not in schema and path in RETIRED_KEYS:
      raise ConfigError(f"Config key '{path}' was removed: {RETIRED_KEYS[path]}. Drop it.")
    if key not in schema:
      close = nearest_key(key, schema)
      hint = f" Did you mean '{prefix}{close}'?" if close else ''
      raise ConfigError(
          f"Unknown config key '{path}'.{hint} Valid keys here: {sorted(schema.keys())}.")
    value, ref = config[key], schema[key]
    if isinstance(ref, (ml_collections.ConfigDict, dict)):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"Config key '{path}' must be a section, got {value!r}.")
      _check_keys(value, ref, prefix=f'{path}.')


def _require(cond, key, value, expected):
  if not cond:
    raise ConfigError(f'config.{key}={value!r}: {expected}')


def _check_transformer(name, m):
  _require(m.width % m.heads == 0, f'{name}.heads', m.heads,
           f'width {m.width} is not divisible by {m.heads} heads; '
           f'pick heads that divide {m.width} (e.g. {max(1, m.width // 64)}).')
  for k in ('width', 'heads', 'mlp_dim'):
    _require(m[k] > 0, f'{name}.{k}', m[k], 'must be positive.')
  _require(m.depth >= 0, f'{name}.depth', m.depth, 'must be >= 0.')
  for k in ('dropout', 'attention_dropout'):
    _require(0.0 <= m[k] < 1.0, f'{name}.{k}', m[k], 'must be in [0, 1).')


def _check_method_options(config):
  """The VLDeformer / CODER switches of `loss` and what they need of the model."""
  losses, m = config.loss, config.model
  cm = losses.cross_modal
  _require(cm.temperature >= 0, 'loss.cross_modal.temperature', cm.temperature,
           'must be >= 0 (0 = the learned temperature).')
  _choice('loss.cross_modal.negative_weighting', cm.negative_weighting)
  _require(cm.topk >= 1, 'loss.cross_modal.topk', cm.topk, 'must be >= 1.')
  hn = losses.hard_negatives
  _choice('loss.hard_negatives.image_mix', hn.image_mix)
  if hn.images:
    _require(m.video.num_frames == 0, 'loss.hard_negatives.images', hn.images,
             'composed negative images mix still images; turn it off for a video model '
             '(model.video.num_frames > 0).')
  mo = losses.momentum
  _require(mo.queue_size >= 0, 'loss.momentum.queue_size', mo.queue_size,
           'must be >= 0 (0 = no momentum queue).')
  _require(0.0 <= mo.momentum < 1.0, 'loss.momentum.momentum', mo.momentum,
           'must be in [0, 1), e.g. 0.995.')
  if mo.queue_size:
    _require(mo.queue_size % config.train.batch_size == 0, 'loss.momentum.queue_size',
             mo.queue_size, f'must be a multiple of train.batch_size='
             f'{config.train.batch_size}, so that every step enqueues one whole batch.')
  extras = (('loss.hard_negatives.captions', hn.captions, False),
            ('loss.hard_negatives.images', hn.images, False),
            ('loss.momentum.queue_size', mo.queue_size, 0),
            ('loss.cross_modal.negative_weighting', cm.negative_weighting, 'none'))
  if losses.chunk_size:
    for key, value, off in extras:
      _require(value == off, 'loss.chunk_size', losses.chunk_size,
               f'the chunked loss supports plain InfoNCE only, not with {key}={value!r}; '
               f"set {key.split('.', 1)[1]}={off!r}, or loss.chunk_size=0.")
  if any(value != off for _, value, off in extras):
    _require(cm.weight > 0, 'loss.cross_modal.weight', cm.weight,
             'hard negatives, queues and negative weighting act on the cross-modal term; '
             'give it a positive weight.')
  cl = losses.cluster
  if cl.weight > 0:
    _require(m.num_prototypes >= 2, 'model.num_prototypes', m.num_prototypes,
             'loss.cluster.weight > 0 needs >= 2 prototypes (e.g. 64).')
  for key in ('temperature', 'epsilon'):
    _require(cl[key] > 0, f'loss.cluster.{key}', cl[key], 'must be positive.')
  _require(cl.iterations >= 1, 'loss.cluster.iterations', cl.iterations, 'must be >= 1.')
  co = losses.concept
  if co.weight > 0:
    _require(m.concept_gcn_depth >= 1, 'model.concept_gcn_depth', m.concept_gcn_depth,
             'loss.concept.weight > 0 needs the concept GCN (e.g. 2 layers).')
  _require(co.num_concepts >= 2, 'loss.concept.num_concepts', co.num_concepts,
           'must be >= 2.')
  _require(co.temperature > 0, 'loss.concept.temperature', co.temperature,
           'must be positive.')
  _require(co.captions >= 1, 'loss.concept.captions', co.captions, 'must be >= 1.')


def _check_cost_levers(config):
  """SigLIP's sigmoid form, locked parameters (LiT) and patch dropout (FLIP)."""
  losses, m = config.loss, config.model
  cm = losses.cross_modal
  _choice('loss.cross_modal.form', cm.form)
  if cm.form == 'sigmoid' and cm.weight > 0:
    _require(m.logit_bias, 'model.logit_bias', m.logit_bias,
             "loss.cross_modal.form='sigmoid' learns a logit bias: set model.logit_bias="
             'True (SigLIP: model.temperature_init=0.1, model.logit_bias_init=-10).')
    refused = (('loss.momentum.queue_size', losses.momentum.queue_size, 0,
                "CODER's momentum queue adds softmax negatives"),
               ('loss.cross_modal.negative_weighting', cm.negative_weighting, 'none',
                'negative weighting re-weights the softmax over negatives'),
               ('loss.hard_negatives.captions', losses.hard_negatives.captions, False,
                'composed hard negatives are extra softmax negatives'),
               ('loss.hard_negatives.images', losses.hard_negatives.images, False,
                'composed hard negatives are extra softmax negatives'),
               ('loss.concept.weight', losses.concept.weight, 0.0,
                "CODER's concept term shares the softmax form's temperature"))
    for key, value, off, why in refused:
      _require(value == off, key, value,
               f"not with loss.cross_modal.form='sigmoid' ({why}, which SigLIP's pairwise "
               f"loss has none of): set {key.split('.', 1)[1]}={off!r} or use "
               "form='softmax'.")
  if m.logit_bias:
    _require(cm.form == 'sigmoid', 'model.logit_bias', m.logit_bias,
             "only loss.cross_modal.form='sigmoid' uses the logit bias; set it to False, "
             "or set loss.cross_modal.form='sigmoid'.")
  pd = m.vision.patch_dropout
  _require(isinstance(pd, (int, float)) and 0.0 <= pd < 1.0, 'model.vision.patch_dropout',
           pd, 'must be in [0, 1): the fraction of patch tokens dropped in training, e.g. '
           '0.5 (FLIP); 0 = off.')
  freeze = config.train.freeze
  _require(isinstance(freeze, (tuple, list)) and all(isinstance(p, str) and p
                                                     for p in freeze),
           'train.freeze', freeze, "must be a tuple of parameter-path patterns, e.g. "
           "('vision',) or ('text/layer/[0-3]',); () = train everything.")
  from cookie_jax.freeze import check_patterns  # pylint: disable=g-import-not-at-top
  check_patterns(freeze)


def _check_video(config):
  v = config.model.video
  _require(v.num_frames >= 0, 'model.video.num_frames', v.num_frames,
           'must be >= 0 (0 = an image-only model).')
  _choice('model.video.temporal', v.temporal)
  if v.num_frames > 0 and v.temporal == 'transformer':
    _require(v.depth >= 1, 'model.video.depth', v.depth,
             "the temporal transformer needs >= 1 block; or use temporal='mean'.")
    _check_transformer('model.video', ml_collections.ConfigDict(
        dict(v.to_dict(), width=config.model.vision.width)))
  builder = config.data.builder
  if builder in VIDEO_BUILDERS:
    _require(v.num_frames > 0, 'model.video.num_frames', v.num_frames,
             f'data.builder={builder!r} gives video clips; set model.video.num_frames to '
             'the frames per clip (e.g. 4), which builds the video path.')
    if v.temporal == 'transformer':
      _require(0 < config.data.num_frames <= v.num_frames, 'data.num_frames',
               config.data.num_frames,
               f'the temporal transformer has {v.num_frames} frame positions '
               '(model.video.num_frames); feed 1 to that many frames per clip, e.g. '
               f'data.num_frames={v.num_frames}.')


def _check_profile_steps(steps):
  ok = (isinstance(steps, (tuple, list)) and len(steps) == 2
        and all(isinstance(s, int) for s in steps))
  _require(ok, 'train.profile_steps', steps, 'must be two step numbers (start, stop), '
           'e.g. (10, 15); (0, 0) = no profile.')
  start, stop = steps
  _require(tuple(steps) == (0, 0) or 1 <= start <= stop, 'train.profile_steps', steps,
           'needs 1 <= start <= stop (steps count from 1, the first update), e.g. '
           '(10, 15); (0, 0) = no profile.')


def _check_eval_data(config):
  if config.eval.data:
    try:
      validate_data_config(eval_data_config(config.data, config.eval.data))
    except ValueError as e:
      message = str(e)
      raise ValueError(message if message.startswith('config.eval.data')
                       else f'config.eval.data: {message}') from None


def _check_vision(m) -> None:
  """The image tower's layout options (models/vit.py) and the image pooling."""
  # The options with their defaults where a hand-built config lacks them.
  v = ml_collections.ConfigDict(dict(vit.options(m.vision), image_size=m.vision.image_size,
                                     patch_size=m.vision.patch_size))
  for key in ('final_norm', 'activation', 'position_interpolation', 'pooler'):
    _choice(f'model.vision.{key}', v[key])
  _require(v.layer_norm_eps > 0, 'model.vision.layer_norm_eps', v.layer_norm_eps,
           'must be positive, e.g. 1e-6.')
  _require(v.layer_scale >= 0, 'model.vision.layer_scale', v.layer_scale,
           "must be >= 0 (LayerScale's initial value; 0 = none).")
  _require(v.registers >= 0, 'model.vision.registers', v.registers, 'must be >= 0.')
  _require(v.position_grid >= 0, 'model.vision.position_grid', v.position_grid,
           'must be >= 0 (0 = image_size // patch_size).')
  if v.pooler in ('tanh', 'cls'):
    _require(v.class_token, 'model.vision.pooler', v.pooler,
             "pools the class token, and class_token=False has none; use pooler='map'.")
  if v.final_norm == 'pooled':
    _require(v.pooler == 'cls', 'model.vision.final_norm', v.final_norm,
             "normalises the pooled class token (CLIP), so it needs pooler='cls'.")
  if v.registers:
    _require(v.class_token, 'model.vision.registers', v.registers,
             'register tokens follow the class token (DINOv2); set class_token=True.')
  _require(vit.transformers_family(v) is not None, 'model.vision', vit.options(v),
           'is a layout no transformers vision tower computes (models/vit.py '
           'FAMILY_LAYOUTS), so it could not be exported; start from the layout of one '
           '(models/presets.py: CLIP_LAYOUT, SIGLIP_LAYOUT, DINOV2_LAYOUT, or the defaults).')
  _choice('model.image_pool', m.image_pool)
  if m.image_pool == 'cls':
    _require(v.class_token, 'model.image_pool', m.image_pool,
             "the image tower has no class token (vision.class_token=False); use 'mean' or "
             "'tower'.")
  if m.image_pool == 'tower':
    _require(m.shared.depth == 0 and m.video.num_frames == 0, 'model.image_pool',
             m.image_pool, "pools with the image tower's own head, which the shared layers "
             "and the video path would skip; use it with shared.depth=0 on images, or use "
             "'cls' / 'mean'.")


def _check_text(text) -> None:
  """The text tower's layout options (models/bert.py)."""
  # The options with their defaults where a hand-built config lacks them.
  t = ml_collections.ConfigDict(dict(bert.options(text), vocab_size=text.vocab_size))
  _choice('model.text.positions', t.positions)
  _choice('model.text.hf_class', t.hf_class)
  want = bert.HF_CLASSES[t.hf_class]
  _require(t.positions == want, 'model.text.positions', t.positions,
           f'{t.hf_class} computes positions={want!r}; set that, or the hf_class of '
           f'{t.positions!r} positions.')
  _require(t.layer_norm_eps > 0, 'model.text.layer_norm_eps', t.layer_norm_eps,
           'must be positive, e.g. 1e-12.')
  _require(0 <= t.pad_token_id < t.vocab_size, 'model.text.pad_token_id', t.pad_token_id,
           f'must be a token id in [0, {t.vocab_size}).')


def _check_model(config) -> None:
  m = config.model
  _check_transformer('model.vision', m.vision)
  _check_transformer('model.text', m.text)
  _check_text(m.text)
  if m.shared.depth > 0:
    _check_transformer('model.shared', m.shared)
  _check_video(config)
  # The patch grid is floor(image_size / patch_size) a side, the trailing pixels dropped,
  # as transformers' patch conv drops them (SigLIP So400m/14 at 384 pixels: 27 x 27).
  _require(m.vision.image_size >= m.vision.patch_size, 'model.vision.patch_size',
           m.vision.patch_size,
           f'must be <= image_size {m.vision.image_size} (at least one patch a side).')
  _check_vision(m)
  # The named image tower of presets.VISION_PRESETS the vision sizes came from ('' = the
  # preset's own); image_init counts its values as defaults.
  _choice('model.vision_preset', m.get('vision_preset', ''))
  _choice('model.text_pool', m.text_pool)
  _choice('model.dtype', m.dtype)
  _choice('model.remat_policy', m.remat_policy)
  _require(m.remat or m.remat_policy == 'full', 'model.remat_policy', m.remat_policy,
           'has no effect without model.remat=True; set both, or leave the policy at '
           "'full'.")
  _require(0 < m.temperature_init < 1e3, 'model.temperature_init', m.temperature_init,
           'must be a positive temperature such as 0.07.')
  _require(m.max_logit_scale >= 1.0 / m.temperature_init, 'model.max_logit_scale',
           m.max_logit_scale, f'must be >= 1/temperature_init = {1.0 / m.temperature_init:.4g}.')


def _check_losses(config) -> None:
  m, losses = config.model, config.loss
  _choice('loss.visual.partner', losses.visual.partner)
  _choice('loss.textual.partner', losses.textual.partner)
  _choice('loss.fuse_views', losses.fuse_views)
  for name in LOSS_NAMES:
    _require(losses[name].weight >= 0, f'loss.{name}.weight', losses[name].weight,
             'must be >= 0 (0 switches the term off).')
  _require(sum(losses[n].weight for n in LOSS_NAMES) > 0,
           'loss.cross_modal.weight', losses.cross_modal.weight,
           'at least one loss weight must be positive.')
  _check_method_options(config)
  _check_cost_levers(config)
  _require(losses.chunk_size >= 0, 'loss.chunk_size', losses.chunk_size,
           'must be >= 0 (0 = unchunked).')
  for name in ('visual', 'textual'):
    _require(losses[name].temperature > 0, f'loss.{name}.temperature',
             losses[name].temperature, 'must be positive.')
  if losses.visual.weight > 0 and losses.visual.partner == 'external':
    _require(m.image_partner_dim > 0, 'model.image_partner_dim', m.image_partner_dim,
             "loss.visual.partner='external' needs the partner embedding width here.")
  if losses.textual.weight > 0 and losses.textual.partner == 'external':
    _require(m.text_partner_dim > 0, 'model.text_partner_dim', m.text_partner_dim,
             "loss.textual.partner='external' needs the partner embedding width here.")
  if losses.textual.weight > 0 and losses.textual.partner == 'dropout':
    _require(m.text.dropout > 0 or m.text.attention_dropout > 0, 'model.text.dropout',
             m.text.dropout,
             "loss.textual.partner='dropout' needs dropout > 0, else both passes are equal.")


def _check_optim_and_train(config) -> None:
  o = config.optim
  _choice('optim.schedule', o.schedule)
  _require(o.lr > 0, 'optim.lr', o.lr, 'must be positive.')
  _require(o.warmup_steps >= 0, 'optim.warmup_steps', o.warmup_steps, 'must be >= 0.')
  _require(o.clip_norm >= 0, 'optim.clip_norm', o.clip_norm, 'must be >= 0 (0 disables).')

  _require(config.train.batch_size > 0, 'train.batch_size', config.train.batch_size,
           'must be positive.')
  _require(config.train.steps > 0, 'train.steps', config.train.steps, 'must be positive.')
  _require(config.train.log_every > 0, 'train.log_every', config.train.log_every,
           'must be positive.')
  _require(config.train.peak_flops >= 0, 'train.peak_flops', config.train.peak_flops,
           'must be >= 0 (0 = look the device up).')
  _check_profile_steps(config.train.profile_steps)
  _require(config.train.accum_steps >= 1, 'train.accum_steps', config.train.accum_steps,
           'must be >= 1 (1 = no accumulation).')
  _require(config.checkpoint.keep >= 1, 'checkpoint.keep', config.checkpoint.keep,
           'must be >= 1.')


def _check_mesh(config, num_devices: int | None) -> None:
  for axis in MESH_AXES:
    size = config.mesh[axis]
    _require(size == -1 or size >= 1, f'mesh.{axis}', size,
             'must be a positive size, or -1 for the devices left over.')
  _require(sum(config.mesh[a] == -1 for a in MESH_AXES) <= 1, 'mesh',
           config.mesh.to_dict(), 'at most one axis may be -1.')
  _require(config.mesh.dcn_data >= 1, 'mesh.dcn_data', config.mesh.dcn_data,
           'must be the number of slices (1 for one slice).')
  if num_devices is None:
    return
  shape = mesh_shape(config.mesh, num_devices)
  batch_shards = math.prod(shape[a] for a in BATCH_AXES)
  for key, parts in (('train.batch_size', batch_shards * config.train.accum_steps),
                     ('eval.batch_size', batch_shards)):
    section, name = key.split('.')
    value = config[section][name]
    what = (f'data*fsdp = {batch_shards} devices' if parts == batch_shards else
            f'data*fsdp = {batch_shards} devices x train.accum_steps = '
            f'{config.train.accum_steps} micro-batches')
    _require(value % parts == 0, key, value,
             f'the batch is split over {what}; use a multiple of {parts} '
             f'(e.g. {max(parts, value // parts * parts)}).')


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Checks keys against the schema and values against each other. Returns `config`."""
  _check_keys(config, default_config())
  _check_model(config)
  _check_losses(config)
  _check_optim_and_train(config)
  try:
    validate_data_config(config.data)
    _check_eval_data(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check_mesh(config, num_devices)
  return config

