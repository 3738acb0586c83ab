"""Process start-up for multi-host runs: TPU pods, SLURM clusters or explicit settings.

One process per host drives that host's devices (JAX's multi-controller model). On one
host with no cluster around, nothing is initialised.
"""

import os

from absl import logging
import jax


def _on_tpu_pod() -> bool:
  return bool(os.environ.get('TPU_WORKER_HOSTNAMES', '').count(','))


def _on_slurm() -> bool:
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str | None = None) -> None:
  """Joins the job's processes; explicit arguments override auto-detection.

  `cpu_collectives='gloo'` lets several CPU processes run collectives (used in tests).
  """
  coordinator_address = coordinator_address or os.environ.get('COOKIE_COORDINATOR')
  if num_processes is None and 'COOKIE_NUM_PROCESSES' in os.environ:
    num_processes = int(os.environ['COOKIE_NUM_PROCESSES'])
  if process_id is None and 'COOKIE_PROCESS_ID' in os.environ:
    process_id = int(os.environ['COOKIE_PROCESS_ID'])
  if cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _on_tpu_pod() or _on_slurm():
    jax.distributed.initialize()  # JAX reads the TPU / SLURM environment itself.
  else:
    return
  logging.info('Process %d of %d; %d local of %d devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
