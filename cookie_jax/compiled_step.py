"""A train step compiled ahead of time, saved beside what identifies it, and loaded back
(`train.compiled`) only where it is that program on that kind of machine.

`launch/compile.py --save=PATH` writes the executable of the step it compiled for a TPU
slice to PATH (`jax.experimental.serialize_executable`, as MaxText's train_compile.py
does) and a metadata record to PATH.json; a run on that slice with
`--config.train.compiled=PATH` then starts without compiling. Loading refuses, in one
line naming what differs, an executable of another jax, jaxlib or libtpu, another device
kind or count, another mesh, or another program.

The program is identified by a SHA-256 of the step's lowered StableHLO text (before the
compiler), not of the config. The text holds everything the executable computes with:
shapes, dtypes and shardings of the state and the batch, the mesh, the model, the loss,
the optimiser and its schedule, and jax settings such as the matmul precision; it leaves
out what no step depends on (log_every, paths, the data pipeline), so those may change
freely, and it catches a change of code that the config would not show. The config
itself is kept in the record only to name the keys that differ when the programs do.

Lowering needs no compile (seconds for `tiny`), so checking costs far less than the
compile it saves. An executable runs arbitrary code when loaded (it is a pickle): load
only files you wrote.
"""

import hashlib
import importlib.metadata
import json
import pickle
import time

from absl import logging
import jax
from jax.experimental import serialize_executable
import jaxlib
import ml_collections

from cookie_jax import comm_audit, files, objectives, step as step_lib
from cookie_jax.data.defaults import VIDEO_BUILDERS
from cookie_jax.errors import ConfigError

FORMAT = 1
_REDO = ("compile it again for this run (python launch/compile.py ... --save=PATH), or "
         "set train.compiled=''")


def meta_path(path: str) -> str:
  """Where the metadata record of the executable at `path` lives."""
  return f'{path}.json'


def lower_train_step(config: ml_collections.ConfigDict, mesh):
  """The train step of `config` over `mesh`, lowered from abstract inputs (no parameters
  are allocated): what `tpu_compile` compiles, and what a loaded executable must be."""
  state, batch, setup = comm_audit.abstract_inputs(config, mesh)
  return step_lib.make_train_step(config, setup).lower(state, batch)


def fingerprint(lowered) -> str:
  """SHA-256 of the lowered StableHLO text: the program, before any compiler."""
  return hashlib.sha256(lowered.as_text().encode('utf-8')).hexdigest()


def _libtpu_version() -> str | None:
  try:
    return importlib.metadata.version('libtpu')
  except importlib.metadata.PackageNotFoundError:
    return None


def _config_values(config) -> dict:
  """The config as plain JSON values, `train.compiled` (where the file is) left out."""
  values = json.loads(json.dumps(config.to_dict(), default=str))
  values.get('train', {}).pop('compiled', None)
  return values


def _machine(mesh) -> dict:
  """What an executable needs of the machine that runs it: versions, devices, mesh."""
  device = mesh.devices.flat[0]
  return {
      'format': FORMAT, 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
      'libtpu': _libtpu_version(), 'platform': device.platform,
      'device_kind': device.device_kind, 'devices': int(mesh.devices.size),
      'processes': len({d.process_index for d in mesh.devices.flat}),
      'mesh': {'axes': list(mesh.axis_names), 'shape': list(mesh.devices.shape),
               'device_ids': mesh.device_ids.ravel().tolist()},
  }


def metadata(lowered, mesh, config: ml_collections.ConfigDict,
             compiler_options: dict | None = None) -> dict:
  """The record saved beside an executable: what `load_train_step` compares."""
  return {**_machine(mesh), 'program': fingerprint(lowered),
          'batch_size': int(config.train.batch_size),
          'compiler_options': dict(compiler_options or {}),
          'config': _config_values(config)}


def save_compiled(compiled, path: str, meta: dict) -> int:
  """Writes the executable `compiled` to `path` and `meta` to `meta_path(path)` (local or
  gs://); returns the executable's size in bytes."""
  try:
    data, _, _ = serialize_executable.serialize(compiled)
  except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError) as e:
    raise ConfigError(f'--save={path!r}: this jax cannot serialise the compiled step '
                      f'({type(e).__name__}: {str(e).splitlines()[0]}).') from None
  # The record names the executable's own hash, so a record left from an earlier save
  # (a write that failed half way) never vouches for another executable.
  meta = {**meta, 'executable_sha256': hashlib.sha256(data).hexdigest()}
  files.write_bytes(path, data)
  files.write_text(meta_path(path), json.dumps(meta, indent=1))
  return len(data)


def _flat(values: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in values.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_differences(saved: dict, config, limit: int = 4) -> str:
  """'key saved -> now, ...' for the config keys that differ (the first `limit`)."""
  old, new = _flat(saved), _flat(_config_values(config))
  keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  shown = ', '.join(f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in keys[:limit])
  return shown + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


def _mesh_text(mesh: dict) -> str:
  return ', '.join(f'{a}={s}' for a, s in zip(mesh['axes'], mesh['shape']))


def _machine_difference(saved: dict, now: dict) -> str | None:
  """How the machine an executable was compiled for differs from this one, or None."""
  pairs = [
      ('jax', f"jax {saved['jax']} / jaxlib {saved['jaxlib']}",
       f"jax {now['jax']} / jaxlib {now['jaxlib']}"),
      ('libtpu', f"libtpu {saved['libtpu']}", f"libtpu {now['libtpu']}"),
      ('devices', f"{saved['devices']} x {saved['device_kind']}",
       f"{now['devices']} x {now['device_kind']}"),
      ('mesh', f"mesh {_mesh_text(saved['mesh'])}", f"mesh {_mesh_text(now['mesh'])}"),
  ]
  for what, old, new in pairs:
    if what == 'libtpu' and now['platform'] != 'tpu':
      continue  # libtpu does not run a CPU or GPU executable
    if old != new:
      return f'was compiled for {old}; this run has {new}'
  if saved['mesh']['device_ids'] != now['mesh']['device_ids']:
    return ('was compiled for the same mesh shape over the devices in another order; '
            'this run places them differently')
  return None


def _program_difference(saved: dict, program: str, config) -> str | None:
  """How the saved program differs from this run's, in words, or None."""
  if saved['program'] == program:
    return None
  keys = config_differences(saved['config'], config)
  why = (f'config keys that differ: {keys}' if keys else
         'with the same config, so the code or a jax setting changed since')
  return (f"is another program (StableHLO sha256 {saved['program'][:12]}, this run's "
          f'{program[:12]}): {why}')


def _read_meta(path: str) -> dict:
  for p in (path, meta_path(path)):
    if not files.exists(p):
      raise ConfigError(f'config.train.compiled={path!r}: {p} does not exist; write it '
                        'with python launch/compile.py ... --save=PATH.')
  try:
    meta = json.loads(files.read_text(meta_path(path)))
  except json.JSONDecodeError as e:
    raise ConfigError(f'config.train.compiled={path!r} has a record {meta_path(path)} that '
                      f'is not JSON ({e}); {_REDO}.') from None
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    meta = meta if isinstance(meta, dict) else {}
    raise ConfigError(f'config.train.compiled={path!r}: {meta_path(path)} is format '
                      f"{meta.get('format')!r}, this version reads {FORMAT}; {_REDO}.")
  return meta


def check_compiled(path: str, config: ml_collections.ConfigDict, mesh):
  """(the lowered train step of `config` over `mesh`, the executable's record), once the
  executable at `path` is known to be its program for this machine; else one ConfigError
  line naming what differs."""
  if config.data.builder in VIDEO_BUILDERS:
    raise ConfigError(f'config.train.compiled={path!r} cannot serve a video recipe (its '
                      'ahead-of-time batch has no frames axis); video recipes are not '
                      f'compiled ahead of time; {_REDO}.')
  if objectives.needs_constants(config.loss):
    raise ConfigError(f'config.train.compiled={path!r}: these objectives need tables mined '
                      'from the training captions, which an ahead-of-time compile does '
                      "not have; set train.compiled=''.")
  saved = _read_meta(path)
  why = _machine_difference(saved, _machine(mesh))
  if not why:  # only then lower (seconds): the program is compared last
    lowered = lower_train_step(config, mesh)
    why = _program_difference(saved, fingerprint(lowered), config)
  if why:
    raise ConfigError(f'config.train.compiled={path!r} {why}; {_REDO}.')
  return lowered, saved


def load_train_step(path: str, config: ml_collections.ConfigDict, mesh):
  """The train step saved at `path`, as a `jax.stages.Compiled` called like
  `step.make_train_step`'s jit: `(state, batch) -> (state, metrics)`, state donated."""
  start = time.perf_counter()
  lowered, saved = check_compiled(path, config, mesh)
  data = files.read_bytes(path)
  if saved.get('executable_sha256') != hashlib.sha256(data).hexdigest():
    raise ConfigError(f'config.train.compiled={path!r} is not the executable its record '
                      f'{meta_path(path)} describes (sha256 differs; a save that did not '
                      f'finish?); {_REDO}.')
  if saved.get('compiler_options'):
    logging.warning('The saved train step was compiled with %s (launch/compile.py\'s options '
                    'for the cost model), not with this run\'s compiler flags.',
                    saved['compiler_options'])
  try:
    compiled = serialize_executable.deserialize_and_load(
        data, lowered.in_tree, lowered.out_tree)
  except (pickle.UnpicklingError, EOFError, ValueError, RuntimeError) as e:
    raise ConfigError(f'config.train.compiled={path!r} cannot be loaded '
                      f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                      f'{_REDO}.') from None
  logging.info('loaded the compiled train step from %s in %.1f s (no compile)', path,
               time.perf_counter() - start)
  return compiled
