"""Names of pytree paths: `('vision', 'layer', 0, 'kernel')` -> 'vision/layer/0/kernel'.

One spelling for every place that names a parameter (checkpoint mismatches, sharding
logs, the weight-decay mask): dict keys, sequence indices and attribute names alike.
"""

from typing import Any, Iterable


def key_name(key: Any) -> str:
  """One path entry (a jax DictKey, SequenceKey, GetAttrKey, or a plain key) as text."""
  return str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))


def path_name(path: Iterable[Any], sep: str = '/') -> str:
  return sep.join(key_name(k) for k in path)
