"""The pre-flight check: a run's config against the slice it will run on, on this host,
before anything is copied to the workers (`launch/preflight.py`, `launch/tpu_pod.py run`).

It makes the checks `train.train_and_evaluate` makes before it reads any file, in the
same order and with the same one-line errors: the config's keys and values and the batch
over the slice's device count (`config.validate_config`), then the mesh laid on the
slice's real topology (`sharding.make_mesh` on the devices libtpu describes; no TPU
needed) and which rows of each batch every host reads. Paths (data_dir, manual_dir, the
tokenizer, the workdir, init_from) are read only by the workers, may exist only there
(or on gs://), and are not opened here.
"""

import math

import ml_collections

from cookie_jax import sharding
from cookie_jax.config import validate_config
from cookie_jax.errors import ConfigError

# Keys that name files the workers read, listed (not opened) in the report.
_WORKER_PATHS = ('data.data_dir', 'data.manual_dir', 'data.tokenizer', 'train.init_from',
                 'model.text_init', 'model.image_init')


def slice_devices(accelerator_type: str, slices: int = 1) -> tuple[list | None, int, str]:
  """(devices, their number, a note) of `slices` slices of `accelerator_type` ('v5p-32').

  Without libtpu on this host the devices are None and the number comes from the slice's
  name, which checks the batch and the mesh sizes but not their layout on the torus; the
  note says so. An unknown name raises, listing the known ones.
  """
  if slices < 1:
    raise ConfigError(f'--slices={slices}: the number of slices must be >= 1.')
  try:
    devices = sharding.tpu_slice_devices(accelerator_type, slices)
  except ConfigError as e:
    if accelerator_type not in sharding.TPU_SLICES:
      raise
    topology = sharding.TPU_SLICES[accelerator_type].split(':')[1]
    chips = math.prod(int(n) for n in topology.split('x')) * slices
    return None, chips, (f'{e} Checked against its {chips} chips only, not the torus '
                         'layout.')
  return devices, len(devices), ''


def _value(config, key: str):
  for part in key.split('.'):
    config = config[part]
  return config


def check(config: ml_collections.ConfigDict, accelerator_type: str = '', slices: int = 1,
          num_devices: int | None = None) -> list[str]:
  """Raises the run's first ConfigError, or returns lines that say what was checked.

  `accelerator_type` (and `slices`) name the TPU slice; without it, `num_devices` the
  device count of any other cluster (e.g. GPUs: nodes x GPUs per node), which checks
  everything but the layout.
  """
  if accelerator_type:
    devices, count, note = slice_devices(accelerator_type, slices)
    where = (f'{slices} x {accelerator_type}' if slices > 1 else accelerator_type)
  elif num_devices:
    devices, count, note, where = None, num_devices, '', f'{num_devices} devices'
  else:
    raise ConfigError('Name what the run gets: --accelerator_type=SLICE (a TPU slice, e.g. '
                      'v5p-32) or --num_devices=N (e.g. all GPUs of all nodes).')
  lines = []
  if config.model.text_init or config.model.image_init:
    lines.append('note: model.text_init / model.image_init set the tower sizes from their '
                 'checkpoints when the run starts; the sizes checked here are the config\'s.')
  validate_config(config, num_devices=count)
  batch = config.train.batch_size
  if devices is None:
    shape = sharding.mesh_shape(config.mesh, count)
    lines.append(f'{where}: {count} devices; mesh {shape}; train.batch_size {batch} = '
                 f'{batch // count} rows per device.')
  else:
    mesh = sharding.make_mesh(config.mesh, devices)
    hosts = sorted({d.process_index for d in devices})
    rows = {len(sharding.process_rows(mesh, batch, p)) for p in hosts}
    lines.append(f'{where}: {sharding.describe_devices(devices)}; mesh {dict(mesh.shape)}; '
                 f'train.batch_size {batch} = {batch // count} rows per device, '
                 f'{"/".join(map(str, sorted(rows)))} per host.')
    if len(hosts) > 1 and not config.data.data_dir:
      lines.append("note: data.data_dir='' is each worker's own ~/tensorflow_datasets: "
                   'process 0 builds the dataset first, then every other host its own '
                   'copy. A gs:// data_dir is built once and read by all.')
  if note:
    lines.append(f'note: {note}')
  paths = [f'{k}={_value(config, k)!r}' for k in _WORKER_PATHS if _value(config, k)]
  if paths:
    lines.append('not opened here (the workers read them): ' + ', '.join(paths) + '.')
  return lines
