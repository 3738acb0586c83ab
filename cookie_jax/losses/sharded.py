"""The loss of a step over the mesh: every configured term inside `jax.shard_map` over the
batch axes (global negatives, local logits), and their weighted total."""

import jax
from jax.sharding import Mesh

from cookie_jax import sharding
from cookie_jax.losses import compute_losses  # defined before __init__ imports this


def _is_queue(path) -> bool:
  return any(getattr(k, 'key', None) == 'queue' for k in path)


def sharded_losses(mesh: Mesh, stacked: bool = False, chunk_size: int = 0,
                   options=None):
  """`compute_losses` inside shard_map over the batch axes: global negatives, local logits.

  `stacked=True` takes embeddings as [micro_batches, B / micro_batches, D] (gradient
  accumulation); each device flattens its rows, which only permutes the global batch.
  InfoNCE is invariant to a permutation applied to both sides, so the value equals the
  loss over the whole batch.
  """
  flat = lambda x: x.reshape(-1, *x.shape[2:])

  def local(pairs, replicated, negatives):
    if stacked:
      pairs = jax.tree.map(flat, pairs)
      negatives = jax.tree_util.tree_map_with_path(
          lambda path, x: x if _is_queue(path) else flat(x), negatives)
    return compute_losses(pairs, replicated, axis_name=sharding.BATCH_AXES,
                          chunk_size=chunk_size, negatives=negatives, options=options)
  spec = sharding.batch_spec(stacked)

  def compute(pairs, replicated, negatives=None):
    negatives = negatives or {}
    # Extra negatives composed from the batch are sharded like it; queues are replicated.
    neg_specs = jax.tree_util.tree_map_with_path(
        lambda path, _: sharding.REPLICATED if _is_queue(path) else spec, negatives)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, sharding.REPLICATED, neg_specs),
                         out_specs=sharding.REPLICATED)(pairs, replicated, negatives)
  return compute


def weighted_total(terms, loss_cfg) -> jax.Array:
  """The loss: each term times its `config.loss.<term>.weight`, summed in term order."""
  return sum(loss_cfg[name].weight * value for name, value in terms.items())
