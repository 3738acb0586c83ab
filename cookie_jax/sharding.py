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
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from cookie_jax.errors import ConfigError
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
  """Resolves -1 in the configured mesh sizes; errors name the key and the fix.

  With `dcn_data` = n > 1 (n slices joined over the data-centre network), the configured
  sizes describe one slice (num_devices / n devices) and `data` is n times its per-slice
  size in the result: the batch is split over the slices too.
  """
  dcn = int(mesh_config.get('dcn_data', 1) or 1)
  if dcn < 1 or num_devices % dcn:
    raise ConfigError(f'config.mesh.dcn_data={dcn}: it must be a positive number of slices '
                     f'that divides the {num_devices} devices; use 1 for one slice.')
  sizes = {a: int(mesh_config[a]) for a in MESH_AXES}
  per_slice = num_devices // dcn
  known = math.prod(s for s in sizes.values() if s != -1)
  free = [a for a, s in sizes.items() if s == -1]
  per = ' per slice' if dcn > 1 else ''
  if len(free) > 1:
    raise ConfigError(f'config.mesh={sizes}: at most one axis may be -1.')
  if free:
    if per_slice % known:
      raise ConfigError(
          f'config.mesh={sizes}: the fixed axes use {known} devices, which does not divide '
          f'the {per_slice} devices available{per}; change the fixed sizes.')
    sizes[free[0]] = per_slice // known
  if math.prod(sizes.values()) != per_slice:
    raise ConfigError(
        f'config.mesh={sizes} needs {math.prod(sizes.values())} devices but {per_slice} are '
        f'available{per}; set one axis to -1 or change the sizes.')
  sizes['data'] *= dcn
  return sizes


def make_mesh(mesh_config: Mapping[str, int] | ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `mesh_config` over `devices` (default: all of them).

  On TPU the devices are placed by their coordinates in the slice's torus
  (`mesh_utils.create_device_mesh`), splitting physical axes only where the shape needs
  it, so a host's devices need not hold one contiguous block of the batch: every input
  path asks `process_rows` which rows are its own. Several slices (`mesh.dcn_data`) are
  joined with `create_hybrid_device_mesh`, the batch split over them on `data`.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = int(mesh_config.get('dcn_data', 1) or 1)
  slices = sorted({getattr(d, 'slice_index', 0) or 0 for d in devices})
  if dcn != len(slices) and (dcn > 1 or len(slices) > 1):
    raise ConfigError(
        f'config.mesh.dcn_data={dcn}: {describe_devices(devices)} '
        f'{"form one slice" if len(slices) == 1 else f"span {len(slices)} slices"}; set '
        f'mesh.dcn_data={len(slices)}.')
  try:
    shape = mesh_shape(mesh_config, len(devices))
  except ConfigError as e:
    raise ConfigError(f'{str(e).rstrip(".")}; {_what_builds(mesh_config, devices)}') from None
  axes = tuple(shape[a] for a in MESH_AXES)
  if dcn > 1:
    per_slice = (shape['data'] // dcn,) + axes[1:]
    build = lambda split: mesh_utils.create_hybrid_device_mesh(
        per_slice, (dcn, 1, 1), devices, allow_split_physical_axes=split)
  else:
    build = lambda split: mesh_utils.create_device_mesh(
        axes, devices, allow_split_physical_axes=split)
  return Mesh(_device_grid(mesh_config, devices, build), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _device_grid(mesh_config, devices, build) -> np.ndarray:
  """`build(allow_split_physical_axes)`: unsplit where the topology allows, else split."""
  errors = []
  for split in (False, True):
    try:
      return build(split)
    except (NotImplementedError, ValueError, AssertionError) as e:
      errors.append(e)
  raise ConfigError(
      f'config.mesh={dict(mesh_config)}: the mesh cannot be laid on these devices '
      f'({str(errors[-1]).splitlines()[0]}); {_what_builds(mesh_config, devices)}')


def _what_builds(mesh_config, devices) -> str:
  fsdp = [f for f in _divisors(len(devices))
          if _builds(dict(mesh_config, data=-1, fsdp=f, tensor=1), devices)]
  return (f'{describe_devices(devices)}; with mesh.data=-1 and mesh.tensor=1, the '
          f'mesh.fsdp sizes that build are {fsdp}.')


def _builds(mesh_config, devices) -> bool:
  try:
    shape = mesh_shape(mesh_config, len(devices))
    mesh_utils.create_device_mesh(tuple(shape[a] for a in MESH_AXES), devices,
                                  allow_split_physical_axes=True)
    return True
  except (NotImplementedError, ValueError, AssertionError):
    return False


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def describe_devices(devices: Sequence[jax.Device]) -> str:
  """'16 TPU v5 devices on 4 hosts (torus 2x2x4)': the topology, for error messages."""
  d0 = devices[0]
  kind = getattr(d0, 'device_kind', d0.platform)
  hosts = len({d.process_index for d in devices})
  coords = [getattr(d, 'coords', None) for d in devices]
  torus = ''
  if all(c is not None for c in coords):
    torus = ' (torus ' + 'x'.join(str(max(c[i] for c in coords) + 1)
                                  for i in range(len(coords[0]))) + ')'
  return f'{len(devices)} {kind} devices on {hosts} host{"s" * (hosts > 1)}{torus}'


# TPU slices by the names users type (the accelerator type of `gcloud compute tpus`) ->
# libtpu's topology: chips per dimension of the torus. v4/v5p names count TensorCores
# (two per chip), v5e/v6e names count chips.
TPU_SLICES = {
    **{f'v4-{2 * x * y * z}': f'v4:{x}x{y}x{z}'
       for x, y, z in ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8))},
    **{f'v5p-{2 * x * y * z}': f'v5p:{x}x{y}x{z}'
       for x, y, z in ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8),
                       (4, 8, 8), (8, 8, 8))},
    **{f'{gen}-{x * y}': f'{gen}:{x}x{y}' for gen in ('v5e', 'v6e')
       for x, y in ((2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))},
}


def tpu_slice_devices(name: str, slices: int = 1) -> list:
  """The devices of `slices` TPU slices of type `name` ('v5p-32'), as `libtpu` describes
  them on any host (no TPU needed): real coordinates and process (host) indices."""
  if name not in TPU_SLICES:
    raise ConfigError(f'Unknown TPU slice {name!r}; known: {", ".join(TPU_SLICES)}.')
  # libtpu takes /tmp/libtpu_lockfile when it loads, so that two processes never drive
  # one TPU; a topology description drives none, and tests, pre-flight checks and
  # compiles may describe slices in several processes at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    desc = topologies.get_topology_desc(topology_name=TPU_SLICES[name], platform='tpu',
                                        **({'num_slices': slices} if slices > 1 else {}))
  except (RuntimeError, ValueError, ImportError) as e:
    raise ConfigError(
        f'The TPU topology {name} cannot be described here ({str(e).splitlines()[0]}); it '
        f'needs libtpu of the version jax[tpu]=={jax.__version__} pins: '
        'pip install -e ".[tpu]".') from None
  return list(desc.devices)


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


def process_rows(mesh: Mesh, global_batch: int,
                 process_index: int | None = None) -> np.ndarray:
  """The rows of a global batch that the devices of process `process_index` (default:
  this one) hold, ascending: the one answer to "which rows are mine".

  On a TPU slice they need not be contiguous (the mesh follows the torus, not the
  hosts). Every input path reads exactly these rows of each global batch, in this order,
  which is the order `to_global` places a process's local batch in.
  """
  shards = batch_shards(mesh)
  if global_batch < 1 or global_batch % shards:
    raise ConfigError(f'A global batch of {global_batch} rows cannot be split over the '
                     f'{shards} batch shards of mesh {dict(mesh.shape)}; use a multiple '
                     f'of {shards}.')
  pi = jax.process_index() if process_index is None else process_index
  index_map = batch_sharding(mesh).devices_indices_map((global_batch,))
  rows = {r for d, idx in index_map.items() if d.process_index == pi
          for r in range(*idx[0].indices(global_batch))}
  return np.array(sorted(rows), np.int64)


def local_rows(mesh: Mesh | None, global_batch: int, process_index: int,
               process_count: int) -> np.ndarray:
  """`process_rows` of the run's mesh; without a mesh (host-only use, tests), or for a
  process count other than the run's, process p's contiguous block [p*b, (p+1)*b)."""
  if mesh is not None and process_count == jax.process_count():
    return process_rows(mesh, global_batch, process_index)
  b = global_batch // process_count
  return np.arange(process_index * b, (process_index + 1) * b, dtype=np.int64)


def to_global(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Per-process numpy batch (this process's `process_rows`, in order) -> global
  jax.Arrays sharded over the batch axes."""
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
  on `mesh`, `models.layers.PER_SHARD` runs a kernel on each device's block, and
  `models.layers.target_platform` is the platform of `mesh`'s devices. Constraints only
  fix layouts; values are unchanged."""
  from cookie_jax.models import layers  # pylint: disable=g-import-not-at-top

  def spec(x, logical_axes):
    return logical_to_spec(logical_axes, x.shape, mesh, ACTIVATION_RULES, what='activation')

  def constrain(x, logical_axes):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(x, logical_axes)))

  def per_shard(fn, args, arg_axes):
    """fn over each device's block of `args` (shard_map), each laid out by its logical
    axes, the result like args[0]: for a custom kernel, which XLA cannot split."""
    in_specs = tuple(spec(x, axes) for x, axes in zip(args, arg_axes))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=in_specs[0],
                         check_vma=False)(*args)

  def shards(x, logical_axes) -> tuple[int, ...]:
    """How many blocks each dimension of x is split into under `logical_axes`."""
    return tuple(math.prod(mesh.shape[a] for a in ((d,) if isinstance(d, str) else d or ()))
                 for d in spec(x, logical_axes))
  per_shard.shards = shards
  token = layers.ACTIVATION_SHARDING.set(constrain)
  local = layers.PER_SHARD.set(per_shard)
  platform = layers.TARGET_PLATFORM.set(mesh.devices.flat[0].platform)
  try:
    yield
  finally:
    layers.TARGET_PLATFORM.reset(platform)
    layers.PER_SHARD.reset(local)
    layers.ACTIVATION_SHARDING.reset(token)
