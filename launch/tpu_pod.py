r"""Runs COOKIE training on a Cloud TPU VM slice (v4 / v5e / v5p / v6e, one host or a pod).

  python launch/tpu_pod.py create --name=cookie --zone=us-east5-a \
      --accelerator_type=v5p-32 --runtime_version=v2-alpha-tpuv5 [--spot]
  python launch/tpu_pod.py run --name=cookie --zone=us-east5-a \
      --config=configs/base.py:base --workdir=gs://BUCKET/cookie/run1 [-- --config.x=y ...]
  python launch/tpu_pod.py logs   --name=cookie --zone=us-east5-a [--worker=0] [--follow]
  python launch/tpu_pod.py stop   --name=cookie --zone=us-east5-a
  python launch/tpu_pod.py delete --name=cookie --zone=us-east5-a

Every subcommand takes `--dry_run`, which prints the commands (each line `$ ...`) instead
of running them. `run` gets the code onto every worker (a git clone of `--repo`, or else a
tarball of this working tree copied with `tpu-vm scp`), installs the requirements with
`jax[tpu]`, and starts `launch/train.py` on all workers at once under nohup (JAX joins
them through cookie_jax.distributed's TPU auto-detection). `stop` sends SIGTERM, on
which training saves a checkpoint; running `run` again resumes from it.

This file only builds and runs gcloud commands, and imports nothing but the standard
library, so that it works on a workstation that has gcloud but not JAX. Slices are created
as queued resources (the way v5p / v6e capacity, spot included, is handed out) unless
`--no_queued` asks for a plain `tpu-vm create`.
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
  # requirements.txt pins jax; `jax[tpu]` adds the matching libtpu to that pin.
  return _ssh(args, f'cd {REMOTE_DIR} && python3 -m pip install -q -U pip && '
                    'python3 -m pip install -q -r requirements.txt "jax[tpu]" -e .')


def start_command(args) -> list[str]:
  train = shlex.join(['python3', 'launch/train.py', f'--config={args.config}',
                      f'--workdir={args.workdir}', *args.overrides])
  # setsid + nohup + </dev/null: training outlives the ssh session on every worker.
  return _ssh(args, f'cd {REMOTE_DIR} && setsid nohup {train} > {LOG} 2>&1 < /dev/null & '
                    f'echo $! > {PID}')


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
  p = sub.add_parser('run', parents=[common], help='Copy code, install, start training.')
  p.add_argument('--config', required=True, help='e.g. configs/base.py:base')
  p.add_argument('--workdir', required=True, help='gs://BUCKET/PATH shared by all workers.')
  p.add_argument('--repo', default='', help='git URL to clone on the workers; default: '
                 'copy this working tree as a tarball.')
  p.add_argument('--ref', default='main', help='Branch or tag of --repo.')
  p.add_argument('--tarball', default='/tmp/cookie_jax.tar.gz', help='Local tarball path.')
  p.add_argument('--skip_install', action='store_true', help='Requirements are installed.')
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
