"""Locked parameters (`train.freeze`): LiT's locked towers (Zhai et al. 2022) and partial
locking, e.g. ('vision',) or ('text/layer/[0-3]',).

A pattern is a regular expression over a parameter's '/'-joined path in the model's pure
dict ('vision/layer/0/attention/query/kernel', 'text/word_embeddings/embedding', ...) and
matches whole leading path components: 'text/layer/1' locks layer 1, not layer 10
('text/layer/1.*' would lock both). Frozen means frozen everywhere:

* no gradient is computed for it: the step applies `jax.lax.stop_gradient` to the frozen
  leaves before the model is run (`stop_frozen`), so autodiff never builds their weight
  gradients, and a locked tower at the bottom of the graph has no backward pass at all;
* no optimiser state: `locked_optimizer` routes frozen leaves to `optax.set_to_zero()`
  in an `optax.multi_transform`, so AdamW keeps no moments for them (`MaskedNode`s) and
  their update is exactly zero: the values stay bit-identical;
* no weight decay, which lives inside the AdamW of the trained leaves only.

A checkpoint is the state as it is, so resume, restore onto another mesh, `init_from`
and export need nothing special: the parameters are all there, only the optimiser state
has no moments for the frozen ones.
"""

import re
from typing import Sequence

import jax
import optax

from cookie_jax.config import ConfigError

FROZEN, TRAINED = 'frozen', 'trained'


def check_patterns(patterns: Sequence[str]) -> None:
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f'config.train.freeze: pattern {pattern!r} is not a regular '
                        f'expression ({e}); e.g. "vision" or "text/layer/[0-3]".') from None


def path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                  for k in path)


def _matches(pattern: str, name: str) -> bool:
  return re.fullmatch(f'(?:{pattern})(?:/.*)?', name) is not None


def frozen_mask(params, patterns: Sequence[str]):
  """A pytree of bools like `params`: True where a pattern of `patterns` locks the leaf.

  Raises ConfigError for a pattern that matches no parameter, or when every parameter
  would be frozen.
  """
  check_patterns(patterns)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  names = [path_name(path) for path, _ in leaves]
  for pattern in patterns:
    if not any(_matches(pattern, n) for n in names):
      tops = sorted({n.split('/', 1)[0] for n in names})
      raise ConfigError(
          f'config.train.freeze: pattern {pattern!r} matches no parameter. Patterns match '
          f"whole leading components of paths such as {names[0]!r}; top-level names: "
          f'{tops}. Fix the pattern (e.g. "vision", "text/layer/[0-3]") or drop it.')
  frozen = [any(_matches(p, n) for p in patterns) for n in names]
  if frozen and all(frozen):
    raise ConfigError(f'config.train.freeze={tuple(patterns)!r} freezes every parameter: '
                      'nothing would train. Lock fewer (e.g. only "vision").')
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), frozen)


def stop_frozen(params, patterns: Sequence[str]):
  """`params` with `stop_gradient` on the frozen leaves (identity for no patterns)."""
  if not patterns:
    return params
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                      frozen_mask(params, patterns))


def locked_optimizer(tx: optax.GradientTransformation, patterns: Sequence[str]
                     ) -> optax.GradientTransformation:
  """`tx` on the trained leaves only; frozen leaves get a zero update and no state."""
  if not patterns:
    return tx

  def labels(tree):
    return jax.tree.map(lambda f: FROZEN if f else TRAINED, frozen_mask(tree, patterns))
  return optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, labels)


def summary(params, patterns: Sequence[str]) -> str:
  """'frozen N of M parameters (K leaves)' for the log."""
  mask = jax.tree.leaves(frozen_mask(params, patterns))
  sizes = [x.size for x in jax.tree.leaves(params)]
  frozen = sum(s for s, f in zip(sizes, mask) if f)
  return (f'train.freeze={tuple(patterns)!r}: {frozen:,} of {sum(sizes):,} parameters '
          f'frozen ({sum(mask)} leaves)')
