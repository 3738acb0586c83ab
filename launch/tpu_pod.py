r"""Runs COOKIE training on a Cloud TPU VM slice (v4 / v5e / v5p / v6e, one host or a pod).

  python launch/tpu_pod.py create --name=cookie --zone=us-east5-a \
      --accelerator_type=v5p-32 --runtime_version=v2-alpha-tpuv5 [--spot]
  python launch/tpu_pod.py run --name=cookie --zone=us-east5-a --accelerator_type=v5p-32 \
      --config=configs/base.py:base --workdir=gs://BUCKET/cookie/run1 [-- --config.x=y ...]
  python launch/tpu_pod.py logs   --name=cookie --zone=us-east5-a [--worker=0] [--follow]
  python launch/tpu_pod.py stop   --name=cookie --zone=us-east5-a
  python launch/tpu_pod.py delete --name=cookie --zone=us-east5-a

Every subcommand takes `--dry_run`, which prints the commands (each line `$ ...`) instead
of running them. `run` first checks the config here, for the slice `--accelerator_type`
names (launch/preflight.py: the config built with the overrides exactly as
launch/train.py builds it, validated for the slice's devices, its mesh laid on the
slice's topology); a mistake ends there in one line, before anything is copied, also with
`--dry_run`. Then it gets the code onto every worker (a git clone of `--repo`, or else a
tarball of this working tree copied with `tpu-vm scp`), installs it into a virtual
environment of a uv-managed Python (`--python`, independent of the image's own python3)
with the requirements and `jax[tpu]`, and starts `launch/train.py` with it on all
workers at once under nohup (JAX joins them through cookie_jax.distributed's TPU
auto-detection). `stop` sends SIGTERM, on which training saves a checkpoint; running
`run` again resumes from it.

This file only builds and runs commands, and imports nothing but the standard library;
the pre-flight check runs launch/preflight.py with this Python, which needs the project's
requirements (`--skip_preflight` skips it on a workstation without them). Slices are
created as queued resources (the way v5p / v6e capacity, spot included, is handed out)
unless `--no_queued` asks for a plain `tpu-vm create`.
"""

import argparse
import os
import shlex
import subprocess
import sys

REMOTE_DIR = '~/cookie_jax'
REMOTE_TARBALL = '~/cookie_jax.tar.gz'
LOG = '~/cookie_jax_train.log'
PID = '~/cookie_jax_train.pid'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The workers' environment: uv (a static binary, pinned) installs a CPython of its own
# (`--python`), so the pins (jax 0.10.2 needs Python >= 3.11) never depend on the python3
# of the runtime image; the venv holds the project, requirements.txt and jax[tpu].
UV_VERSION = '0.13.8'
UV = '~/.local/bin/uv'
VENV = '~/cookie_jax_venv'
WORKER_PYTHON = '3.11'  # the Python the test suite runs on; setup.py: >= 3.11


def _where(args) -> list[str]:
  flags = [f'--zone={args.zone}']
  if args.project:
    flags.append(f'--project={args.project}')
  return flags


def _ssh(args, command: str, worker: str = 'all') -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name, *_where(args),
          f'--worker={worker}', f'--command={command}']


def create_commands(args) -> list[list[str]]:
  if args.queued:
    cmd = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', args.name,
           f'--node-id={args.name}', *_where(args),
           f'--accelerator-type={args.accelerator_type}',
           f'--runtime-version={args.runtime_version}']
  else:
    cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.name, *_where(args),
           f'--accelerator-type={args.accelerator_type}', f'--version={args.runtime_version}']
  if args.spot:
    cmd.append('--spot')
  return [cmd]


def code_commands(args) -> list[list[str]]:
  """Puts the code at REMOTE_DIR on every worker."""
  if args.repo:
    ref = shlex.quote(args.ref)
    return [_ssh(args, f'rm -rf {REMOTE_DIR} && git clone --depth=1 --branch={ref} '
                       f'{shlex.quote(args.repo)} {REMOTE_DIR}')]
  tarball = args.tarball
  return [
      ['tar', '--exclude=.git', '--exclude=*.egg-info', '--exclude=__pycache__',
       '-czf', tarball, '-C', REPO_ROOT, '.'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball,
       f'{args.name}:{REMOTE_TARBALL}', *_where(args), '--worker=all'],
      _ssh(args, f'rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && '
                 f'tar xzf {REMOTE_TARBALL} -C {REMOTE_DIR}'),
  ]


def install_command(args) -> list[str]:
  """uv, a uv-managed CPython `--python` and a venv of it at VENV holding the project."""
  steps = [
      f'echo "cookie_jax install on $(hostname): uv {UV_VERSION} -> CPython {args.python} '
      f'(uv-managed) -> venv {VENV} <- requirements.txt, jax[tpu], -e {REMOTE_DIR}"',
      f'(test -x {UV} && {UV} --version | grep -q " {UV_VERSION}" || '
      f'curl -LsSf https://astral.sh/uv/{UV_VERSION}/install.sh | '
      'env UV_INSTALL_DIR="$HOME/.local/bin" UV_NO_MODIFY_PATH=1 sh)',
      f'{UV} venv --clear --managed-python --python {shlex.quote(args.python)} {VENV}',
      # requirements.txt pins jax; `jax[tpu]` adds the matching libtpu to that pin.
      f'cd {REMOTE_DIR} && {UV} pip install --python {VENV}/bin/python '
      '-r requirements.txt "jax[tpu]" -e .',
      f'{VENV}/bin/python --version',
  ]
  return _ssh(args, ' && '.join(steps))


def start_command(args) -> list[str]:
  train = shlex.join(['launch/train.py', f'--config={args.config}',
                      f'--workdir={args.workdir}', *args.overrides])
  # setsid + nohup + </dev/null: training outlives the ssh session on every worker.
  return _ssh(args, f'cd {REMOTE_DIR} && setsid nohup {VENV}/bin/python {train} > {LOG} '
                    f'2>&1 < /dev/null & echo $! > {PID}')


def preflight_command(args) -> list[str]:
  """launch/preflight.py here, with this Python: the config against the slice."""
  return [sys.executable, os.path.join(REPO_ROOT, 'launch', 'preflight.py'),
          f'--config={args.config}', f'--accelerator_type={args.accelerator_type}',
          *args.overrides]


def run_commands(args) -> list[list[str]]:
  if not args.workdir.startswith('gs://'):
    raise ValueError(f'--workdir={args.workdir!r}: every worker writes its checkpoint '
                     'shards there, so it must be a GCS path all workers share, e.g. '
                     'gs://BUCKET/cookie/run1.')
  cmds = code_commands(args)
  if not args.skip_install:
    cmds.append(install_command(args))
  cmds.append(start_command(args))
  return cmds


def logs_commands(args) -> list[list[str]]:
  tail = f'tail -n {args.lines}' + (' -f' if args.follow else '')
  return [_ssh(args, f'{tail} {LOG}', worker=args.worker)]


def stop_commands(args) -> list[list[str]]:
  # SIGTERM, not SIGKILL: the training loop saves a checkpoint before it exits.
  return [_ssh(args, f'test -f {PID} && kill -TERM $(cat {PID}) || true')]


def delete_commands(args) -> list[list[str]]:
  if args.queued:
    return [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', args.name,
             *_where(args), '--force', '--quiet']]
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', args.name, *_where(args),
           '--quiet']]


COMMANDS = {'create': create_commands, 'run': run_commands, 'logs': logs_commands,
            'stop': stop_commands, 'delete': delete_commands}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True, help='TPU VM (and queued resource) name.')
  common.add_argument('--zone', required=True, help='e.g. us-east5-a (v5p), us-east1-d (v6e).')
  common.add_argument('--project', default='', help='GCP project (default: gcloud config).')
  common.add_argument('--no_queued', dest='queued', action='store_false',
                      help='Plain `tpu-vm create/delete` instead of queued resources.')
  common.add_argument('--dry_run', action='store_true',
                      help='Print the commands instead of running them.')
  p = sub.add_parser('create', parents=[common], help='Create the slice.')
  p.add_argument('--accelerator_type', required=True, help='e.g. v5p-32 or v6e-16.')
  p.add_argument('--runtime_version', required=True,
                 help='e.g. v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e).')
  p.add_argument('--spot', action='store_true', help='Spot capacity (preemptible).')
  p = sub.add_parser('run', parents=[common],
                     help='Check the config here, then copy code, install, start training.')
  p.add_argument('--accelerator_type', required=True, help='The slice, e.g. v5p-32: the '
                 'pre-flight check validates the config for its devices and topology.')
  p.add_argument('--config', required=True, help='e.g. configs/base.py:base')
  p.add_argument('--workdir', required=True, help='gs://BUCKET/PATH shared by all workers.')
  p.add_argument('--repo', default='', help='git URL to clone on the workers; default: '
                 'copy this working tree as a tarball.')
  p.add_argument('--ref', default='main', help='Branch or tag of --repo.')
  p.add_argument('--tarball', default='/tmp/cookie_jax.tar.gz', help='Local tarball path.')
  p.add_argument('--skip_install', action='store_true', help='Requirements are installed.')
  p.add_argument('--python', default=WORKER_PYTHON, help='CPython version of the workers\' '
                 'venv, installed by uv (setup.py: >= 3.11).')
  p.add_argument('--skip_preflight', action='store_true', help='Do not check the config '
                 'here first (e.g. on a workstation without the requirements).')
  p.add_argument('overrides', nargs='*', help='After `--`: flags for launch/train.py, '
                 'e.g. --config.train.steps=1000.')
  p = sub.add_parser('logs', parents=[common], help="Show a worker's training log.")
  p.add_argument('--worker', default='0', help="Worker index, or 'all'.")
  p.add_argument('--lines', type=int, default=100)
  p.add_argument('--follow', action='store_true')
  sub.add_parser('stop', parents=[common], help='SIGTERM: checkpoint, then exit.')
  sub.add_parser('delete', parents=[common], help='Delete the slice.')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    commands = COMMANDS[args.command](args)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.command == 'run' and not args.skip_preflight:
    # Relative config paths resolve from the repository root, as on the workers.
    checked = subprocess.run(preflight_command(args), cwd=REPO_ROOT, check=False)
    if checked.returncode:
      return checked.returncode  # its one line is on stderr; nothing was launched
  for cmd in commands:
    print('$ ' + shlex.join(cmd), flush=True)
    if not args.dry_run:
      result = subprocess.run(cmd, check=False)
      if result.returncode:
        print(f'error: the command above exited with {result.returncode}.', file=sys.stderr)
        return result.returncode
  return 0


if __name__ == '__main__':
  sys.exit(main())
