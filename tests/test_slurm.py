"""launch/slurm.sbatch: its start-up check."""

import os
import pathlib
import socket
import subprocess


ROOT = pathlib.Path(__file__).resolve().parents[1]
SBATCH = ROOT / 'launch' / 'slurm.sbatch'


def _startup_check(**slurm_env):
  env = dict(os.environ, SLURM_SUBMIT_DIR=str(ROOT), PATH='/usr/bin:/bin', **slurm_env)
  return subprocess.run(['bash', str(SBATCH), 'configs/base.py:tiny', '/tmp/unused'],
                        env=env, capture_output=True, text=True, timeout=60, check=False)


def test_startup_check_names_the_sbatch_setting_and_the_node():
  out = _startup_check(SLURM_GPUS_PER_NODE='gpu:1000', SLURM_CPUS_PER_TASK='1',
                       SLURM_NTASKS_PER_NODE='1')
  assert out.returncode == 1 and out.stdout == '', out
  host = socket.gethostname()
  assert out.stderr == (
      f'error: #SBATCH --gpus-per-node=1000, but node {host} has 0 GPUs (nvidia-smi -L); '
      'override it on the sbatch line, e.g. on a CPU-only node: --gpus-per-node=0 '
      '--cpus-per-task=1 --nodes=1 --ntasks-per-node=2\n')
  out = _startup_check(SLURM_GPUS_PER_NODE='0', SLURM_CPUS_PER_TASK='4096',
                       SLURM_TASKS_PER_NODE='2(x3)')
  assert out.returncode == 1, out
  assert out.stderr == (
      f'error: #SBATCH --cpus-per-task=4096 x --ntasks-per-node=2 is 8192 CPUs, but node '
      f'{host} has {os.cpu_count()} (nproc --all); override them on the sbatch line, '
      'e.g. on a small node: --gpus-per-node=0 --cpus-per-task=1 --nodes=1 '
      '--ntasks-per-node=2\n')
