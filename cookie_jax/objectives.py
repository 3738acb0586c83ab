"""From a batch to the inputs of every configured loss term: COOKIE, VLDeformer, CODER.

`loss_inputs` embeds the batch and returns, per term, the embedding pair and the extra
negatives, and `replicated_args` the replicated argument (logit scale or prototypes);
`losses.sharded_losses` (shard_map over the batch axes) turns them into scalars and
`losses.weighted_total` into the loss. The switches, all in `config.loss`:

* COOKIE: `cross_modal` (image<->text), `visual` (image<->image view), `textual`
  (text<->text dropout view), over a partly shared model (`model.shared.depth`).
* VLDeformer: the fully shared model (configs `vldeformer`), `hard_negatives` (composed
  negative captions and images appended to the cross-modal negatives,
  cookie_jax/negatives.py), `cross_modal.negative_weighting='topk'` (in-batch hard
  negatives) and a sharp fixed `cross_modal.temperature`.
* CODER: `momentum` (EMA encoder + queues of its keys as extra negatives, kept in
  `TrainState.extras`; cookie_jax/momentum.py), `cross_modal.negative_weighting='diversity'`, `cluster` (Sinkhorn
  pseudo-labels, losses/clustering.py) and `concept` (concept graph + GCN, models/concept.py).
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cookie_jax import negatives as negatives_lib
from cookie_jax.losses import LOSS_NAMES, NegativeWeighting
from cookie_jax.models import CookieModel, l2_normalize
from cookie_jax.models.concept import normalized_adjacency
from cookie_jax.models.layers import run_views, split_rng

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


def replicated_args(model: CookieModel, loss_cfg) -> dict[str, jax.Array]:
  """The replicated argument of every active term: its logit scale, or for `cluster`
  the prototypes."""
  replicated = {}
  for name in active_terms(loss_cfg):
    if name == 'cross_modal' and loss_cfg.cross_modal.form == 'sigmoid':
      # SigLIP's (t, c): the logit scale and the learned bias (losses/sigmoid.py).
      replicated[name] = (cross_modal_scale(model, loss_cfg), model.logit_bias[...])
    elif name in ('cross_modal', 'concept'):
      replicated[name] = cross_modal_scale(model, loss_cfg)
    elif name == 'cluster':
      replicated[name] = model.prototypes[...]
    else:
      replicated[name] = jnp.float32(1.0 / loss_cfg[name].temperature)
  return replicated


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


def loss_constants(loss_cfg, mined: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The constant tables of the objectives from what `data.concepts.mine_tables` mined
  from the training captions: the concept token ids and their normalised co-occurrence
  graph, and the word-swap tables of composed negative captions."""
  constants = {}
  if loss_cfg.concept.weight > 0:
    constants['concept_ids'] = np.asarray(mined['concept_ids'], np.int32)
    constants['concept_adjacency'] = np.asarray(
        normalized_adjacency(jnp.asarray(mined['concept_cooccurrence'])), np.float32)
  if loss_cfg.hard_negatives.captions:
    constants['token_group'] = mined['token_group']
    constants['group_members'] = mined['group_members']
  return constants


def fuse_views(loss_cfg, num_devices: int) -> bool:
  """Whether `loss_inputs` runs the views of a tower as one batch (`loss.fuse_views`)."""
  return {'on': True, 'off': False}.get(loss_cfg.fuse_views, num_devices > 1)


def _embed_views(embed, views, keys, fuse: bool):
  if fuse:
    return run_views(embed, views, keys)
  return [embed(*view, rng=key) for view, key in zip(views, keys)]


def loss_inputs(model: CookieModel, batch, rng, loss_cfg,
                constants: Mapping[str, np.ndarray] | None = None, *, fuse: bool = True):
  """(pairs, negatives): the (a, b) embeddings of every active term, and the extra
  negatives composed from this batch ({term: {'a'|'b': {'batch': (emb, valid)}}}).

  With `fuse` (see `fuse_views`), every image view of the step (the batch, the augmented
  second view, the composed negative images) goes through the image tower in one pass,
  and every text view (the batch, the second dropout pass, the composed negative
  captions) through the text tower in one, each view with its own dropout keys
  (`layers.run_views`); clips, and every view without `fuse`, run one pass per view."""
  r_img, r_txt, r_img2, r_txt2 = split_rng(rng, 4)
  images, image_keys = {'batch': batch['image']}, {'batch': r_img}
  texts, text_keys = {'batch': batch['input_ids']}, {'batch': r_txt}
  if loss_cfg.visual.weight > 0 and loss_cfg.visual.partner == 'augmented':
    images['view2'] = _need(batch, 'image_view2', "loss.visual.partner='augmented'")
    image_keys['view2'] = r_img2
  if loss_cfg.textual.weight > 0 and loss_cfg.textual.partner == 'dropout':
    texts['view2'], text_keys['view2'] = batch['input_ids'], r_txt2
  hn = loss_cfg.hard_negatives
  if hn.images:
    images['negative'] = negatives_lib.compose_negative_images(
        batch['image'], _extra_rng(rng, 0), mode=hn.image_mix,
        patch_size=model.vision_patch_size)
    image_keys['negative'] = _extra_rng(rng, 1)
  if hn.captions:
    texts['negative'], caption_valid = negatives_lib.compose_negative_captions(
        batch['input_ids'], batch['attention_mask'], constants['token_group'],
        constants['group_members'], _extra_rng(rng, 2))
    text_keys['negative'] = _extra_rng(rng, 3)

  clips = batch['image'].ndim == 5  # one pass per view (see CookieModel.embed_image)
  image_emb = dict(zip(images, _embed_views(
      model.embed_image, [(v,) for v in images.values()], list(image_keys.values()),
      fuse and not clips)))
  mask = batch['attention_mask']
  text_emb = dict(zip(texts, _embed_views(
      model.embed_text, [(v, mask) for v in texts.values()], list(text_keys.values()), fuse)))

  image, text = image_emb['batch'], text_emb['batch']
  image_n, text_n = l2_normalize(image), l2_normalize(text)
  pairs = {}
  if loss_cfg.cross_modal.weight > 0:
    pairs['cross_modal'] = (image_n, text_n)
  if loss_cfg.visual.weight > 0:
    if loss_cfg.visual.partner == 'augmented':
      pairs['visual'] = (image_n, l2_normalize(image_emb['view2']))
    else:
      partner = _need(batch, 'image_partner', "loss.visual.partner='external'")
      pairs['visual'] = (model.image_partner(image),
                         l2_normalize(jax.lax.stop_gradient(partner)))
  if loss_cfg.textual.weight > 0:
    if loss_cfg.textual.partner == 'dropout':
      pairs['textual'] = (text_n, l2_normalize(text_emb['view2']))
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

  extra = {}
  if hn.images:
    emb = l2_normalize(image_emb['negative'])
    extra['a'] = {'batch': (emb, jnp.ones(emb.shape[:1], bool))}
  if hn.captions:
    extra['b'] = {'batch': (l2_normalize(text_emb['negative']), caption_valid)}
  return pairs, ({'cross_modal': extra} if extra else {})


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
