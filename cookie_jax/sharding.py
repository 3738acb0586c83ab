"""The device mesh and the rules that place logical axes on it.

This is the one module that knows device topology. Model parameters carry logical axis
names (`embed`, `mlp`, `heads`, `vocab`, ...) as Variable metadata; the rules below map
them onto the mesh axes `data`, `fsdp` and `tensor`:

* the batch is split over `data` x `fsdp` (FSDP is data parallel with sharded state);
* `embed` (the model width) is split over `fsdp`, so parameters and optimiser state of an
  FSDP run take 1/fsdp of the memory per device;
* `heads`, `mlp` and `vocab` are split over `tensor` (Megatron-style tensor parallelism).

Every logical name a model uses is listed in the rules (None: replicated on purpose); a
name that is not, such as a misspelt one, raises. A dimension that its mesh axes do not
divide evenly stays replicated, with one logged line naming the array.

The PartitionSpecs of the batch, the micro-batches, the gallery of a search and the
replicated arguments of shard_map'd functions are made here too (`batch_spec`,
`gallery_spec`, `REPLICATED`), so that this is the one module that knows the layout.
"""

import contextlib
import math
from typing import Any, Mapping, Sequence

from absl import logging
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from cookie_jax.tree_paths import path_name

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Replicated: the spec of a shard_map argument or result that every device holds whole.
REPLICATED = P()

# Parameters: (logical axis, mesh axes); None = replicated. A name not listed raises.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('patch', None),
    ('length', None),
)


# Activations: the batch over data x fsdp and the model width never over fsdp (an FSDP
# parameter's `embed` is sharded only to be gathered), heads and MLP over tensor.
ACTIVATION_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('embed', None),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
)

# (array name, logical axis, dimension, mesh axes) of each fallback already logged.
_LOGGED_FALLBACKS: set = set()


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves -1 in the configured mesh sizes; errors name the key and the fix."""
  sizes = {a: int(mesh_config[a]) for a in MESH_AXES}
  known = math.prod(s for s in sizes.values() if s != -1)
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh={sizes}: at most one axis may be -1.')
  if free:
    if num_devices % known:
      raise ValueError(
          f'config.mesh={sizes}: the fixed axes use {known} devices, which does not divide '
          f'the {num_devices} devices available; change the fixed sizes.')
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
        f'config.mesh={sizes} needs {math.prod(sizes.values())} devices but '
        f'{num_devices} are available; set one axis to -1 or change the sizes.')
  return sizes


def make_mesh(mesh_config: Mapping[str, int] | ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _fallback(what: str, name: str, dim: int, axes: tuple[str, ...], why: str) -> None:
  key = (what, name, dim, axes)
  if key not in _LOGGED_FALLBACKS:
    _LOGGED_FALLBACKS.add(key)
    logging.info('%s: logical axis %r (size %d) stays replicated, not split over %s: %s.',
                 what, name, dim, axes, why)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: Mesh, rules=LOGICAL_RULES, what: str = 'an array') -> P:
  """A PartitionSpec for one array (`what` names it in errors and the log); each mesh
  axis is used at most once."""
  if not logical_axes:
    return P()
  if len(logical_axes) != len(shape):
    raise ValueError(f'Logical axes {logical_axes} do not match shape {tuple(shape)}.')
  rule_map = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    if name is not None and name not in rule_map:
      raise ValueError(f'{what}: unknown logical axis {name!r}; the rules know '
                       f'{sorted(rule_map)}. Fix the name in the model, or add a rule in '
                       'cookie_jax/sharding.py.')
    target = rule_map.get(name) if name is not None else None
    wanted = tuple(a for a in ((target,) if isinstance(target, str) else (target or ()))
                   if mesh.shape[a] > 1)
    axes = tuple(a for a in wanted if a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      if wanted:
        _fallback(what, name, dim, wanted,
                  f'{size} does not divide {dim}' if axes else 'a mesh axis already used')
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def batch_spec(stacked: bool = False) -> P:
  """The batch dimension over data x fsdp: the leading one, or with `stacked` the second
  ([micro_batches, B / micro_batches, ...], gradient accumulation)."""
  return P(None, BATCH_AXES) if stacked else P(BATCH_AXES)


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  """The batch dimension over data x fsdp (see `batch_spec`), the rest replicated."""
  return NamedSharding(mesh, batch_spec(stacked))


def gallery_spec(mesh: Mesh) -> P:
  """The rows of a search gallery, split over every device of `mesh` (all its axes)."""
  return P(mesh.axis_names)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def opt_state_shardings(tx, opt_state_shapes, param_shardings, mesh: Mesh):
  """Optimiser-state leaves shaped like a parameter take that parameter's sharding."""
  import optax  # pylint: disable=g-import-not-at-top
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  if any(is_masked(x) for x in jax.tree.leaves(opt_state_shapes, is_leaf=is_masked)):
    # Locked parameters (train.freeze): the moments exist for the trained leaves only.
    return _by_param_path(opt_state_shapes, param_shardings, mesh)
  return optax.tree_map_params(
      tx, lambda _, s: s, opt_state_shapes, param_shardings,
      transform_non_params=lambda _: replicated(mesh))


def _by_param_path(opt_state_shapes, param_shardings, mesh: Mesh):
  """Each state leaf whose path ends with a parameter's full path (AdamW's mu and nu of
  it) takes that parameter's sharding; every other leaf (counts) is replicated."""
  params = dict(jax.tree_util.tree_leaves_with_path(param_shardings))
  lengths = sorted({len(p) for p in params}, reverse=True)

  def pick(path, unused_leaf):
    for n in lengths:
      if n <= len(path) and tuple(path[-n:]) in params:
        return params[tuple(path[-n:])]
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(pick, opt_state_shapes)


def describe(shardings) -> dict[str, str]:
  """`{'path/to/param': 'P(...)'}` for logging and tests."""
  out = {}
  for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    out[path_name(path)] = str(s.spec)
  return out


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """[start, stop): the rows of a global batch that this process's devices hold, which
  `to_global` expects its local batch to be (one contiguous block per process)."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = sorted({r for idx in index_map.values()
                 for r in range(*idx[0].indices(global_batch))})
  if not rows or rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f'This process holds rows {rows[:4]}... of the global batch, not one '
                     'contiguous block; order the mesh devices by process.')
  return rows[0], rows[-1] + 1


def to_global(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def param_shardings(abstract_state, mesh: Mesh):
  """NamedShardings (as a pure dict) for an `nnx.State` whose Variables carry the
  `logical_axes` metadata set by the model's layers."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  out: dict = {}
  for path, var in nnx.to_flat_state(abstract_state):
    axes = var.get_metadata().get('logical_axes')
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = NamedSharding(mesh, logical_to_spec(
        axes, var.shape, mesh, what=path_name(path)))
  return out


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
  """While tracing a step: `models.layers.constrain` pins activations by ACTIVATION_RULES
  on `mesh`. Constraints only fix layouts; values are unchanged."""
  from cookie_jax.models import layers  # pylint: disable=g-import-not-at-top

  def constrain(x, logical_axes):
    spec = logical_to_spec(logical_axes, x.shape, mesh, ACTIVATION_RULES, what='activation')
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  token = layers.ACTIVATION_SHARDING.set(constrain)
  try:
    yield
  finally:
    layers.ACTIVATION_SHARDING.reset(token)
