"""launch/slurm.sbatch: its start-up check, and (slow) a real single-node SLURM cluster
started here, whose two tasks get SIGTERM 1 s and a step apart: both save one step and
the job ends COMPLETED; the resubmitted job resumes there, exactly."""

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import two_processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
SBATCH = ROOT / 'launch' / 'slurm.sbatch'
SBIN = os.pathsep.join([os.environ.get('PATH', ''), '/usr/sbin', '/sbin'])
DAEMONS = ('munged', 'slurmctld', 'slurmd')
CLIENTS = ('sbatch', 'scontrol', 'sinfo', 'scancel')
# A CPU-only node with 2 cores: the overrides docs/scaling.md gives for such a node.
CPU_NODE = ('--gpus-per-node=0', '--cpus-per-task=1', '--nodes=1', '--ntasks-per-node=2')
EXTRA = {'checkpoint.every': 0}
STOP_S = 60


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


class _Cluster:
  """munged, slurmctld and slurmd of a one-node cluster, in a folder of their own."""

  def __init__(self, root: pathlib.Path):
    self.root, self.daemons = root, []
    self.node = socket.gethostname().split('.')[0]
    self.conf = root / 'slurm.conf'
    self.env = dict(os.environ, SLURM_CONF=str(self.conf))

  def start(self) -> None:
    key = self.root / 'munge.key'
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    socket_path = self.root / 'munge.sock'
    self._daemon('munged', '--foreground', '--force', f'--socket={socket_path}',
                 f'--key-file={key}', f'--pid-file={self.root}/munged.pid',
                 f'--seed-file={self.root}/munged.seed',
                 f'--log-file={self.root}/munged.log')
    for _ in range(100):
      if socket_path.exists():
        break
      time.sleep(0.1)
    for d in ('state', 'spool'):
      (self.root / d).mkdir()
    r = self.root
    self.conf.write_text('\n'.join([
        'ClusterName=cookietest', f'SlurmctldHost={self.node}(127.0.0.1)',
        f'SlurmctldPort={two_processes.free_port()}',
        f'SlurmdPort={two_processes.free_port()}',
        'SlurmUser=root', 'SlurmdUser=root', 'AuthType=auth/munge',
        f'AuthInfo=socket={socket_path}', 'CredType=cred/munge',
        f'StateSaveLocation={r}/state', f'SlurmdSpoolDir={r}/spool',
        f'SlurmctldPidFile={r}/slurmctld.pid', f'SlurmdPidFile={r}/slurmd.pid',
        f'SlurmctldLogFile={r}/slurmctld.log', f'SlurmdLogFile={r}/slurmd.log',
        'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none',
        'JobAcctGatherType=jobacct_gather/none', 'JobCompType=jobcomp/none',
        'AccountingStorageType=accounting_storage/none', 'MpiDefault=none',
        'SchedulerType=sched/builtin', 'SelectType=select/cons_tres',
        'SelectTypeParameters=CR_CPU', 'ReturnToService=2',
        f'NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN',
        'PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP', '']))
    self._daemon('slurmctld', '-D', '-f', str(self.conf))
    self._daemon('slurmd', '-D', '-f', str(self.conf))
    deadline = time.monotonic() + 60
    while self._run('sinfo', '-h', '-o', '%T').stdout.strip() != 'idle':
      if time.monotonic() > deadline:
        pytest.fail('the node is not idle after 60 s: ' + self.logs())
      time.sleep(0.5)

  def _daemon(self, name, *args):
    log = open(self.root / f'{name}.out', 'w', encoding='utf-8')
    self.daemons.append(subprocess.Popen([shutil.which(name, path=SBIN), *args],
                                         stdout=log, stderr=subprocess.STDOUT))

  def _run(self, *args, env=None, cwd=None):
    return subprocess.run(args, env=env or self.env, cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)

  def logs(self) -> str:
    files = sorted(self.root.glob('*.out')) + sorted(self.root.glob('*.log'))
    return '\n'.join(f'--- {p.name} ---\n' + p.read_text()[-2000:] for p in files)

  def stop(self) -> None:
    self._run('scancel', f'--user={os.getuid()}')
    time.sleep(2)
    for p in reversed(self.daemons):
      p.terminate()
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()

  def sbatch(self, *args, env) -> str:
    out = self._run('sbatch', '--parsable', *args, env=dict(env, SLURM_CONF=str(self.conf)),
                    cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(';')[0]

  def state(self, job: str) -> tuple[str, str]:
    """(JobState, ExitCode) of `job`."""
    shown = self._run('scontrol', '-o', 'show', 'job', job).stdout
    state, code = re.search(r'JobState=(\S+)', shown), re.search(r'ExitCode=(\S+)', shown)
    return (state[1] if state else 'UNKNOWN'), (code[1] if code else '')

  def wait(self, job: str, timeout: float) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while (state := self.state(job))[0] in ('PENDING', 'CONFIGURING', 'RUNNING',
                                            'COMPLETING'):
      if time.monotonic() > deadline:
        break
      time.sleep(0.5)
    return state

  def task_pids(self, job: str) -> dict[int, int]:
    """{task id: pid} of the job's first srun step."""
    rows = [l.split() for l in self._run('scontrol', 'listpids', job).stdout.splitlines()]
    return {int(r[3]): int(r[0]) for r in rows[1:] if len(r) == 5 and r[2] == '0'
            and r[3].isdigit()}


@pytest.fixture
def cluster():
  missing = [b for b in DAEMONS + CLIENTS if not shutil.which(b, path=SBIN)]
  if missing:
    pytest.skip(f'SLURM or munge is not installed ({", ".join(missing)} missing): '
                'apt-get install -y slurm-wlm munge')
  if (os.cpu_count() or 1) < 2:
    pytest.skip('the job runs 2 tasks of 1 CPU each; this machine has 1 CPU')
  # A short path of its own: munge's socket path must fit in 108 bytes.
  root = pathlib.Path(tempfile.mkdtemp(prefix='cookie_slurm_'))
  c = _Cluster(root)
  try:
    c.start()
    yield c
  finally:
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


def _submit(cluster, tmp_path, data_dir, workdir, steps, cache):
  config = two_processes.config_file(tmp_path, data_dir, steps, EXTRA)
  env = dict(two_processes.child_env(cache),
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  job = cluster.sbatch(*CPU_NODE, f'--output={tmp_path}/%x-%j.out', str(SBATCH), config,
                       workdir, env=env)
  return job, tmp_path / f'cookie-{job}.out'


@pytest.mark.slow
def test_sigterm_to_the_slurm_tasks_1s_apart_saves_one_step_and_the_resubmission_resumes(
    cluster, tmp_path, tmp_path_factory):
  data_dir = two_processes.build_data(str(tmp_path / 'tfds'))
  workdir, cache = str(tmp_path / 'run'), str(tmp_path / 'xla_cache')
  job, output = _submit(cluster, tmp_path, data_dir, workdir, 100_000, cache)
  deadline = time.monotonic() + 900
  while two_processes.last_step(workdir) < 2:
    state = cluster.state(job)
    assert state[0] in ('PENDING', 'RUNNING', 'CONFIGURING'), (
        state, output.read_text()[-3000:] if output.exists() else cluster.logs())
    assert time.monotonic() < deadline, output.read_text()[-3000:]
    time.sleep(0.2)
  pids = cluster.task_pids(job)
  assert sorted(pids) == [0, 1], pids
  os.kill(pids[0], signal.SIGTERM)
  time.sleep(1)
  seen = two_processes.last_step(workdir)  # and a step later: the loops are at other steps
  while two_processes.last_step(workdir) == seen and cluster.state(job)[0] == 'RUNNING':
    time.sleep(0.05)
  os.kill(pids[1], signal.SIGTERM)
  signalled = time.monotonic()
  assert cluster.wait(job, STOP_S) == ('COMPLETED', '0:0'), output.read_text()[-3000:]
  stopped_in = time.monotonic() - signalled
  saved = re.findall(r'^Preempted at step (\d+); checkpoint saved in ', output.read_text(),
                     re.M)
  assert len(saved) == 2 and saved[0] == saved[1], output.read_text()[-3000:]
  step = int(saved[0])
  print(f'both tasks saved step {step}; the job ended {stopped_in:.1f} s after the second '
        'SIGTERM')

  # The same command again, to 2 steps more: it resumes at the saved step.
  job, output = _submit(cluster, tmp_path, data_dir, workdir, step + 2, cache)
  assert cluster.wait(job, 900) == ('COMPLETED', '0:0'), output.read_text()[-3000:]
  assert f'resuming from {workdir}/checkpoints/{step}' in output.read_text()
  two_processes.assert_same_as_uninterrupted(tmp_path_factory, data_dir, workdir, step + 2,
                                             EXTRA)
