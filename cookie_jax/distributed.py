"""Process start-up for multi-host runs: TPU pods, SLURM clusters or explicit settings.

One process per host drives that host's devices (JAX's multi-controller model). Every
process runs the same program; what differs between them is handled elsewhere:

* data: each process reads its own disjoint part of the split (data/pipeline.py) and
  contributes its rows of every global batch (`jax.make_array_from_process_local_data`);
* metrics and result files: written by process 0 only (metric_writer.py);
* checkpoints: orbax writes each array's shards from the process that holds them and
  process 0 writes the metadata and finalises the step (checkpoint.py); every process
  must call save and restore.

How the processes find each other, in order of precedence:

1. explicit arguments, or the COOKIE_COORDINATOR / COOKIE_NUM_PROCESSES /
   COOKIE_PROCESS_ID environment variables (e.g. several CPU processes in tests, with
   COOKIE_CPU_COLLECTIVES=gloo);
2. a Cloud TPU VM (single host or pod slice): JAX reads the worker list itself;
3. a SLURM job step with more than one task: JAX reads SLURM_* itself; one task per node
   (all the node's GPUs) or one task per GPU;
4. otherwise one process, and nothing is initialised.

COOKIE_DISTRIBUTED=0 skips 2 and 3, e.g. to debug on one worker of a pod.
"""

import os

from absl import logging
import jax

# Set by the TPU VM runtime on every worker; any one of them means "this is a TPU VM".
_TPU_ENV = ('TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE', 'TPU_WORKER_ID',
            'CLOUD_TPU_TASK_ID', 'MEGASCALE_COORDINATOR_ADDRESS')


def on_tpu_vm() -> bool:
  return any(k in os.environ for k in _TPU_ENV) or os.path.exists('/dev/accel0')


def on_slurm() -> bool:
  """Inside an `srun` job step with several tasks: what JAX's SLURM detection reads."""
  needed = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
            'SLURM_LOCALID')
  return all(k in os.environ for k in needed) and int(os.environ['SLURM_NTASKS']) > 1


def slurm_local_device_ids() -> list[int] | None:
  """All of the node's GPUs when SLURM runs one task per node, else None.

  JAX's SLURM detection assumes one task per GPU and gives each process only GPU
  SLURM_LOCALID; with one task per node that would leave all but one GPU idle.
  """
  nodes = int(os.environ.get('SLURM_STEP_NUM_NODES', os.environ.get('SLURM_NNODES', '0')))
  if not nodes or int(os.environ['SLURM_NTASKS']) != nodes:
    return None
  visible = os.environ.get('CUDA_VISIBLE_DEVICES', '')
  count = len(visible.split(',')) if visible else int(
      os.environ.get('SLURM_GPUS_ON_NODE', '0') or 0)
  return list(range(count)) if count else None


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} must be an integer.') from None


def is_main_process() -> bool:
  return jax.process_index() == 0


# How long the other processes wait for process 0's `first_process_runs`: a day, so that
# building a large dataset inside a run still works; a real hang ends sooner, when the
# coordination service sees process 0 gone.
FIRST_PROCESS_TIMEOUT_S = 24 * 3600


def first_process_runs(what: str, fn, timeout_s: float = FIRST_PROCESS_TIMEOUT_S) -> None:
  """`fn()` on process 0 alone; every other process waits until it has finished.

  For work on storage all processes share that must happen once, such as building a
  dataset into a shared data_dir (every process building it at once would race). `what`
  names the work (the same on every process) in logs and errors. Where `fn` fails on
  process 0, the others raise an error of the same kind with its message, so every
  process ends with the same one line.
  """
  if jax.process_count() == 1:
    fn()
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  # The coordination service's key-value store (what orbax's barriers use too): process 0
  # posts how `fn` ended; the others block on the key instead of on a collective, which
  # the CPU backend would give up on after 30 s.
  client = jax_distributed.global_state.client
  key = f'cookie_jax/first_process_runs/{what}'
  if is_main_process():
    try:
      fn()
    except BaseException as e:
      client.key_value_set(key, f'{type(e).__name__}:{e}', allow_overwrite=True)
      raise
    client.key_value_set(key, 'done', allow_overwrite=True)
    return
  logging.info('Waiting for process 0 to %s.', what)
  outcome = client.blocking_key_value_get(key, int(timeout_s * 1000))
  if outcome != 'done':
    kind, message = outcome.split(':', 1)
    raise _error_class(kind)(f'process 0 could not {what}: {message}')


def _error_class(name: str) -> type:
  """The class of a user error by name, so that all processes report it alike."""
  from cookie_jax.errors import USER_ERRORS  # pylint: disable=g-import-not-at-top
  return next((c for c in USER_ERRORS if c.__name__ == name), RuntimeError)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str | None = None) -> str:
  """Joins the job's processes; explicit arguments override the environment.

  `cpu_collectives='gloo'` lets several CPU processes run collectives (used in tests).
  Returns how the job was set up: 'explicit', 'tpu', 'slurm' or 'single'.
  """
  coordinator_address = coordinator_address or os.environ.get('COOKIE_COORDINATOR')
  num_processes = num_processes if num_processes is not None else _env_int(
      'COOKIE_NUM_PROCESSES')
  process_id = process_id if process_id is not None else _env_int('COOKIE_PROCESS_ID')
  cpu_collectives = cpu_collectives or os.environ.get('COOKIE_CPU_COLLECTIVES')
  if cpu_collectives:
    # Must precede the first use of the CPU backend.
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  auto = os.environ.get('COOKIE_DISTRIBUTED', '1') != '0'
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError(
          f'COOKIE_COORDINATOR={coordinator_address!r} also needs the number of processes '
          f'and this process id (COOKIE_NUM_PROCESSES, COOKIE_PROCESS_ID); got '
          f'{num_processes} and {process_id}.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'COOKIE_PROCESS_ID={process_id} is outside [0, {num_processes}).')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    how = 'explicit'
  elif auto and on_tpu_vm():
    jax.distributed.initialize()  # JAX reads the TPU worker list itself.
    how = 'tpu'
  elif auto and on_slurm():
    # JAX's SlurmCluster reads the coordinator, process count and id from SLURM_*.
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids())
    how = 'slurm'
  else:
    return 'single'
  if not is_main_process():
    # One voice in the logs: the other processes report only warnings and errors.
    logging.set_verbosity(logging.WARNING)
  logging.info('Process %d of %d (%s); %d local of %d devices.', jax.process_index(),
               jax.process_count(), how, jax.local_device_count(), jax.device_count())
  return how
