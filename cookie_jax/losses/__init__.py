"""Loss registry: each configured term maps a pair of embeddings and a scale to a scalar.

`compute_losses` runs inside `jax.shard_map` (or on one device with `axis_name=None`).
"""

import functools
from typing import Callable, Mapping

import jax

from cookie_jax.losses.contrastive import AxisName, info_nce, info_nce_chunked

# name -> fn(a, b, scale, axis_name) -> global-mean scalar.
LOSSES: dict[str, Callable[..., jax.Array]] = {
    'cross_modal': info_nce,
    'visual': info_nce,
    'textual': info_nce,
}


def compute_losses(pairs: Mapping[str, tuple[jax.Array, jax.Array]],
                   scales: Mapping[str, jax.Array], axis_name: AxisName = None,
                   chunk_size: int = 0) -> dict[str, jax.Array]:
  """{term: loss} for every term in `pairs`, each over the global batch.

  `chunk_size > 0` (config `loss.chunk_size`) computes every InfoNCE term in chunks of
  that many negatives: same value and gradients, less memory at large batch.
  """
  unknown = set(pairs) - set(LOSSES)
  if unknown:
    raise ValueError(f'Unknown loss terms {sorted(unknown)}; registered: {sorted(LOSSES)}.')
  def fn(name):
    if chunk_size and LOSSES[name] is info_nce:
      return functools.partial(info_nce_chunked, chunk_size=chunk_size)
    return LOSSES[name]
  return {name: fn(name)(a, b, scales[name], axis_name) for name, (a, b) in pairs.items()}
