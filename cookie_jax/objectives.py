"""From a batch to the inputs of every configured loss term: COOKIE, VLDeformer, CODER.

`loss_inputs` embeds the batch and returns, per term, the embedding pair, the replicated
argument (logit scale or prototypes) and the extra negatives; `compute_losses` (inside
shard_map) turns them into scalars. The switches, all in `config.loss`:

* COOKIE: `cross_modal` (image<->text), `visual` (image<->image view), `textual`
  (text<->text dropout view), over a partly shared model (`model.shared.depth`).
* VLDeformer: the fully shared model (configs `vldeformer`), `hard_negatives` (composed
  negative captions and images appended to the cross-modal negatives,
  cookie_jax/negatives.py), `cross_modal.negative_weighting='topk'` (in-batch hard
  negatives) and a sharp fixed `cross_modal.temperature`.
* CODER: `momentum` (EMA encoder + queues of its keys as extra negatives, kept in
  `TrainState.extras`), `cross_modal.negative_weighting='diversity'`, `cluster` (Sinkhorn
  pseudo-labels, losses/clustering.py) and `concept` (concept graph + GCN, models/concept.py).
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cookie_jax import negatives as negatives_lib
from cookie_jax.losses import NegativeWeighting
from cookie_jax.models import CookieModel, l2_normalize
from cookie_jax.models.layers import split_rng

LOSS_NAMES = ('cross_modal', 'visual', 'textual', 'cluster', 'concept')


def _need(batch, key, why):
  if key not in batch:
    raise ValueError(f"{why} needs batch['{key}'], which the input pipeline did not "
                     f'provide (batch has {sorted(batch)}).')
  return batch[key]


def _extra_rng(rng, i):
  # Keys beyond the four dropout streams, so that switching an option on leaves the
  # dropout masks of the other terms unchanged.
  return jax.random.fold_in(rng, 1000 + i)


def active_terms(loss_cfg) -> list[str]:
  return [name for name in LOSS_NAMES if loss_cfg[name].weight > 0]


def cross_modal_scale(model: CookieModel, loss_cfg) -> jax.Array:
  if loss_cfg.cross_modal.temperature > 0:
    return jnp.float32(1.0 / loss_cfg.cross_modal.temperature)
  return model.logit_scale()


def loss_scales(model: CookieModel, loss_cfg) -> dict[str, jax.Array]:
  """The replicated argument of every active term: a logit scale, or the prototypes."""
  scales = {}
  for name in active_terms(loss_cfg):
    if name == 'cross_modal' and loss_cfg.cross_modal.form == 'sigmoid':
      # SigLIP's (t, c): the logit scale and the learned bias (losses/sigmoid.py).
      scales[name] = (cross_modal_scale(model, loss_cfg), model.logit_bias[...])
    elif name in ('cross_modal', 'concept'):
      scales[name] = cross_modal_scale(model, loss_cfg)
    elif name == 'cluster':
      scales[name] = model.prototypes[...]
    else:
      scales[name] = jnp.float32(1.0 / loss_cfg[name].temperature)
  return scales


def loss_options(loss_cfg) -> dict[str, dict[str, Any]]:
  """Static keyword options of the terms (see `compute_losses`)."""
  cm = loss_cfg.cross_modal
  options = {}
  if cm.form == 'sigmoid':
    options['cross_modal'] = {'form': 'sigmoid'}
  if cm.negative_weighting != 'none':
    weighting = NegativeWeighting(cm.negative_weighting, beta=float(cm.diversity_beta),
                                  topk=int(cm.topk))
    options['cross_modal'] = options['concept'] = {'weighting': weighting}
  if loss_cfg.cluster.weight > 0:
    cl = loss_cfg.cluster
    options['cluster'] = dict(temperature=float(cl.temperature), epsilon=float(cl.epsilon),
                              iterations=int(cl.iterations))
  return options


def needs_constants(loss_cfg) -> bool:
  """Whether the objectives need tables mined from the training data."""
  return bool(loss_cfg.hard_negatives.captions) or loss_cfg.concept.weight > 0


def mine_constants(config: ml_collections.ConfigDict) -> dict[str, np.ndarray] | None:
  """The tables that the options of `needs_constants` mine from the training captions:
  the word-swap tables of composed negative captions and the concept graph. A function
  of the data and config only, so a resumed run mines the same tables."""
  if not needs_constants(config.loss):
    return None
  # Data-room imports (TensorFlow) only when an option needs them.
  from cookie_jax.data import concepts as concepts_lib  # pylint: disable=g-import-not-at-top
  from cookie_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from cookie_jax.models.concept import normalized_adjacency  # pylint: disable=g-import-not-at-top
  loss_cfg = config.loss
  tokenizer = pipeline.load_tokenizer(config.data)
  captions = concepts_lib.training_captions(config.data, limit=loss_cfg.concept.captions)
  vocab = concepts_lib.mine_concepts(captions, tokenizer, loss_cfg.concept.num_concepts)
  constants = {}
  if loss_cfg.concept.weight > 0:
    constants['concept_ids'] = np.asarray(vocab.token_ids, np.int32)
    constants['concept_adjacency'] = np.asarray(
        normalized_adjacency(jnp.asarray(vocab.cooccurrence)), np.float32)
  if loss_cfg.hard_negatives.captions:
    groups = concepts_lib.word_groups(config.data, vocab,
                                      groups_file=loss_cfg.hard_negatives.word_groups)
    token_group, members = concepts_lib.swap_tables(tokenizer, groups)
    if not members.size:
      raise ValueError('loss.hard_negatives.captions: no group of interchangeable '
                       'single-token words was found; give loss.hard_negatives.word_groups '
                       '(a JSON list of word lists) or turn the option off.')
    constants['token_group'] = token_group
    constants['group_members'] = members
  return constants


def loss_inputs(model: CookieModel, batch, rng, loss_cfg,
                constants: Mapping[str, np.ndarray] | None = None):
  """(pairs, negatives): the (a, b) embeddings of every active term, and the extra
  negatives composed from this batch ({term: {'a'|'b': {'batch': (emb, valid)}}})."""
  r_img, r_txt, r_img2, r_txt2 = split_rng(rng, 4)
  image = model.embed_image(batch['image'], rng=r_img)
  text = model.embed_text(batch['input_ids'], batch['attention_mask'], rng=r_txt)
  image_n, text_n = l2_normalize(image), l2_normalize(text)
  pairs = {}
  if loss_cfg.cross_modal.weight > 0:
    pairs['cross_modal'] = (image_n, text_n)
  if loss_cfg.visual.weight > 0:
    if loss_cfg.visual.partner == 'augmented':
      view2 = _need(batch, 'image_view2', "loss.visual.partner='augmented'")
      pairs['visual'] = (image_n, model.encode_image(view2, rng=r_img2))
    else:
      partner = _need(batch, 'image_partner', "loss.visual.partner='external'")
      pairs['visual'] = (model.image_partner(image),
                         l2_normalize(jax.lax.stop_gradient(partner)))
  if loss_cfg.textual.weight > 0:
    if loss_cfg.textual.partner == 'dropout':
      pairs['textual'] = (text_n, model.encode_text(
          batch['input_ids'], batch['attention_mask'], rng=r_txt2))
    else:
      partner = _need(batch, 'text_partner', "loss.textual.partner='external'")
      pairs['textual'] = (model.text_partner(text),
                          l2_normalize(jax.lax.stop_gradient(partner)))
  if loss_cfg.cluster.weight > 0:
    pairs['cluster'] = (image, text)
  if loss_cfg.concept.weight > 0:
    descriptors = model.concept_descriptors(constants['concept_ids'],
                                            constants['concept_adjacency'])
    temp = loss_cfg.concept.temperature
    pairs['concept'] = (model.concept_embedding(image, descriptors, temp),
                        model.concept_embedding(text, descriptors, temp))

  hn = loss_cfg.hard_negatives
  extra = {}
  if hn.images:
    mixed = negatives_lib.compose_negative_images(
        batch['image'], _extra_rng(rng, 0), mode=hn.image_mix,
        patch_size=model.vision_patch_size)
    emb = model.encode_image(mixed, rng=_extra_rng(rng, 1))
    extra['a'] = {'batch': (emb, jnp.ones(emb.shape[:1], bool))}
  if hn.captions:
    ids, valid = negatives_lib.compose_negative_captions(
        batch['input_ids'], batch['attention_mask'], constants['token_group'],
        constants['group_members'], _extra_rng(rng, 2))
    emb = model.encode_text(ids, batch['attention_mask'], rng=_extra_rng(rng, 3))
    extra['b'] = {'batch': (emb, valid)}
  return pairs, ({'cross_modal': extra} if extra else {})


# CODER's momentum encoder and queues -----------------------------------------------------


def init_extras(loss_cfg, params, embed_dim: int) -> dict[str, Any]:
  """The train state's method-specific part: EMA parameters and the two key queues."""
  q = loss_cfg.momentum.queue_size
  if not q:
    return {}
  return {'ema_params': jax.tree.map(jnp.copy, params),
          'image_queue': jnp.zeros((q, embed_dim), jnp.float32),
          'text_queue': jnp.zeros((q, embed_dim), jnp.float32),
          # Keys enqueued so far (capped at the queue size): rows [0, count) are valid.
          'queue_count': jnp.zeros((), jnp.int32),
          # Where the next batch of keys goes (FIFO ring buffer).
          'queue_ptr': jnp.zeros((), jnp.int32)}


def momentum_keys(model: CookieModel, batch) -> tuple[jax.Array, jax.Array]:
  """The momentum encoder's normalised image and text keys of a batch (no dropout)."""
  image = model.encode_image(batch['image'])
  text = model.encode_text(batch['input_ids'], batch['attention_mask'])
  return jax.lax.stop_gradient(image), jax.lax.stop_gradient(text)


def queue_negatives(extras) -> dict[str, Any]:
  """The queues as replicated extra negatives of the cross-modal term."""
  q = extras['image_queue'].shape[0]
  valid = jnp.arange(q) < extras['queue_count']
  return {'cross_modal': {'a': {'queue': (extras['image_queue'], valid)},
                          'b': {'queue': (extras['text_queue'], valid)}}}


def update_extras(extras, params, keys, momentum: float):
  """EMA step on the new parameters, then the batch's keys enqueued (oldest overwritten)."""
  image_keys, text_keys = keys
  n, q = image_keys.shape[0], extras['image_queue'].shape[0]
  ptr = extras['queue_ptr']
  ema = jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p,
                     extras['ema_params'], params)
  return {'ema_params': ema,
          'image_queue': jax.lax.dynamic_update_slice(extras['image_queue'], image_keys,
                                                      (ptr, 0)),
          'text_queue': jax.lax.dynamic_update_slice(extras['text_queue'], text_keys,
                                                     (ptr, 0)),
          'queue_count': jnp.minimum(extras['queue_count'] + n, q),
          'queue_ptr': (ptr + n) % q}


def merge_negatives(*groups):
  """Deep-merges {term: {side: {kind: (emb, valid)}}} dicts."""
  out: dict = {}
  for group in groups:
    for term, sides in group.items():
      for side, kinds in sides.items():
        out.setdefault(term, {}).setdefault(side, {}).update(kinds)
  return out


def config_summary(loss_cfg: ml_collections.ConfigDict) -> str:
  """One line naming the active objectives (for the log)."""
  parts = [f'{n}={loss_cfg[n].weight:g}' for n in active_terms(loss_cfg)]
  hn = loss_cfg.hard_negatives
  if hn.captions or hn.images:
    parts.append(f'hard_negatives(captions={hn.captions}, images={hn.images})')
  if loss_cfg.momentum.queue_size:
    parts.append(f'queue={loss_cfg.momentum.queue_size}@{loss_cfg.momentum.momentum:g}')
  if loss_cfg.cross_modal.form != 'softmax':
    parts.append(f'cross_modal.form={loss_cfg.cross_modal.form}')
  if loss_cfg.cross_modal.negative_weighting != 'none':
    parts.append(f'weighting={loss_cfg.cross_modal.negative_weighting}')
  return ', '.join(parts)
