"""Loss registry: each configured term maps a pair of embeddings and a scale to a scalar.

`compute_losses` runs inside `jax.shard_map` (or on one device with `axis_name=None`).
"""

from typing import Callable, Mapping

import jax

from cookie_jax.losses.contrastive import AxisName, info_nce

# name -> fn(a, b, scale, axis_name) -> global-mean scalar.
LOSSES: dict[str, Callable[..., jax.Array]] = {
    'cross_modal': info_nce,
    'visual': info_nce,
    'textual': info_nce,
}


def compute_losses(pairs: Mapping[str, tuple[jax.Array, jax.Array]],
                   scales: Mapping[str, jax.Array], axis_name: AxisName = None
                   ) -> dict[str, jax.Array]:
  """{term: loss} for every term in `pairs`, each over the global batch."""
  unknown = set(pairs) - set(LOSSES)
  if unknown:
    raise ValueError(f'Unknown loss terms {sorted(unknown)}; registered: {sorted(LOSSES)}.')
  return {name: LOSSES[name](a, b, scales[name], axis_name)
          for name, (a, b) in pairs.items()}
