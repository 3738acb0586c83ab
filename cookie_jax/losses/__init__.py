"""The losses: each configured term maps a pair of embeddings (and a replicated argument:
a logit scale, or the prototypes) to a scalar over the global batch.

  contrastive  InfoNCE (local logits, global negatives; chunked; negative weighting)
  clustering   CODER's Sinkhorn codes and swapped prediction
  (here)       the registry of terms and `compute_losses`, for one device's shard inside
               `jax.shard_map` (or on one device with `axis_name=None`)
  sharded      `sharded_losses`: every term inside shard_map over the batch axes, and
               `weighted_total`, the loss of a step
"""

import functools
from typing import Any, Callable, Mapping

import jax

from cookie_jax.losses.clustering import sinkhorn, swapped_prediction
from cookie_jax.losses.contrastive import (AxisName, NegativeWeighting, info_nce,
                                           info_nce_chunked)
from cookie_jax.losses.sigmoid import sigmoid_loss, sigmoid_loss_all_gather

# name -> fn(a, b, replicated, axis_name, **options) -> global-mean scalar. `replicated`
# is the logit scale for the InfoNCE terms and the prototypes for 'cluster'.
LOSSES: dict[str, Callable[..., jax.Array]] = {
    'cross_modal': info_nce,
    'visual': info_nce,
    'textual': info_nce,
    # CODER's online-clustering pseudo-label prediction.
    'cluster': swapped_prediction,
    # CODER's concept branch: concept-level image and text embeddings, aligned like
    # the cross-modal pair.
    'concept': info_nce,
}
# The one list of loss terms (config.loss.<name>), in the order they are computed and
# summed.
LOSS_NAMES = tuple(LOSSES)


def compute_losses(pairs: Mapping[str, tuple[jax.Array, jax.Array]],
                   replicated: Mapping[str, jax.Array], axis_name: AxisName = None,
                   chunk_size: int = 0, negatives: Mapping[str, Any] | None = None,
                   options: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> dict[str, jax.Array]:
  """{term: loss} for every term in `pairs`, each over the global batch. `replicated[term]`
  is the term's replicated argument: its logit scale, or for `cluster` the prototypes.

  `chunk_size > 0` (config `loss.chunk_size`) computes every plain InfoNCE term in chunks
  of that many negatives: same value and gradients, less memory at large batch.
  `negatives[term]` are extra negatives of an InfoNCE term and `options[term]` its keyword
  options (see `info_nce`, `swapped_prediction`); `{'form': 'sigmoid'}` makes the term
  SigLIP's sigmoid loss (`sigmoid_loss`, a ring over devices, chunked by `chunk_size`
  too), whose replicated argument is (scale, bias).
  """
  unknown = set(pairs) - set(LOSSES)
  if unknown:
    raise ValueError(f'Unknown loss terms {sorted(unknown)}; registered: {sorted(LOSSES)}.')
  negatives, options = negatives or {}, options or {}

  def fn(name):
    kwargs = dict(options.get(name, {}))
    if kwargs.pop('form', 'softmax') == 'sigmoid':
      # SigLIP's pairwise loss (losses/sigmoid.py); `replicated` is (scale, bias).
      if name in negatives or kwargs:
        raise ValueError(f'The sigmoid form of {name!r} takes no extra negatives and no '
                         f'negative weighting (options {sorted(kwargs)}, extra negatives: '
                         f'{name in negatives}).')
      return functools.partial(sigmoid_loss, chunk_size=chunk_size)
    if name in negatives:
      kwargs['negatives'] = negatives[name]
    if chunk_size and LOSSES[name] is info_nce and not kwargs:
      return functools.partial(info_nce_chunked, chunk_size=chunk_size)
    return functools.partial(LOSSES[name], **kwargs)
  return {name: fn(name)(a, b, replicated[name], axis_name)
          for name, (a, b) in pairs.items()}


# After compute_losses, which the shard_map'd form calls.
from cookie_jax.losses.sharded import sharded_losses, weighted_total  # pylint: disable=g-import-not-at-top,wrong-import-position

__all__ = ['LOSSES', 'LOSS_NAMES', 'NegativeWeighting', 'compute_losses', 'info_nce',
           'info_nce_chunked', 'sharded_losses', 'sigmoid_loss', 'sigmoid_loss_all_gather',
           'sinkhorn', 'swapped_prediction', 'weighted_total']
