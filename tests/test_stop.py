"""A stop decided by all processes together (cookie_jax/stop.py), on 2 processes x 4 CPU
devices (gloo): SIGTERM to one of them, SIGTERM to both 1 s and a step apart (slow),
Ctrl-C to one (slow); each time both save the same step and exit with the same code within
seconds, and the run, stopped and resumed, equals an uninterrupted one."""

import os
import re
import signal
import time

import pytest

from cookie_jax import train
import two_processes

EXTRA = {'checkpoint.every': 0}  # saves only at the end and when asked to stop
NEVER = 100_000  # train.steps of the runs that a signal stops
STOP_S = 60  # a stop that takes longer than this has hung (it takes 15-20 s on 2 busy cores)
AFTER_A_STEP = 'after a step'  # a signal's delay: >= 1 s and a logged step later

_LAST_LINE = {
    0: r'Preempted at step (\d+); checkpoint saved in (\S+)\. Re-run the same command to '
       r'resume\.',
    130: r'Interrupted \(Ctrl-C\) at step (\d+); saved (\S+)/\d+\. Re-run the same command '
         r'to resume\.',
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return two_processes.build_data(str(tmp_path_factory.mktemp('tfds')))


def _wait_for_step(job, workdir, step, timeout=600) -> None:
  deadline = time.monotonic() + timeout
  while two_processes.last_step(workdir) < step:
    if any(p.poll() is not None for p in job.procs):
      pytest.fail(f'a process ended before step {step}:\n' + job.tails())
    if time.monotonic() > deadline:
      pytest.fail(f'no step {step} in {timeout} s:\n' + job.tails())
    time.sleep(0.1)


def _stop(workdir, log_dir, cache_dir, data_dir, signals) -> tuple[list[int], int, float]:
  """A 2-process run of `workdir`, sent `signals` ((process, signal, delay)) once it has
  trained 2 steps; (exit codes, the step both saved, seconds from the last signal to
  both exits)."""
  start = two_processes.last_step(workdir)
  job = two_processes.TwoProcesses(
      two_processes.config_file(log_dir, data_dir, NEVER, EXTRA), workdir, log_dir,
      cache_dir)
  try:
    _wait_for_step(job, workdir, start + 2)
    for process, sig, delay in signals:
      if delay == AFTER_A_STEP:
        # At least 1 s, and past a step boundary: the processes' loops, which on a busy
        # 2-core machine take over a second a step, are at different steps.
        time.sleep(1)
        seen = two_processes.last_step(workdir)
        while (two_processes.last_step(workdir) == seen and
               all(p.poll() is None for p in job.procs)):
          time.sleep(0.05)
      job.procs[process].send_signal(sig)
    codes, waited = job.wait(timeout=STOP_S)
  finally:
    job.wait(timeout=0)  # kills what still runs
  assert None not in codes, (f'still running {STOP_S} s after the last signal (exit codes '
                             f'{codes}):\n' + job.tails())
  saved = []
  for code, log in zip(codes, job.logs()):
    found = re.fullmatch(_LAST_LINE.get(code, '$^'), log.strip().splitlines()[-1])
    assert found, f'exit codes {codes}:\n' + job.tails()
    saved.append(int(found[1]))
  assert saved[0] == saved[1] > start, (saved, start)
  steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints'))
                 if p.isdigit())
  assert steps[-1] == saved[0], steps
  return codes, saved[0], waited


def test_a_signal_to_one_process_stops_both_at_one_agreed_step(tmp_path, tmp_path_factory,
                                                                data_dir):
  workdir, cache = str(tmp_path / 'run'), str(tmp_path / 'xla_cache')
  # SIGTERM to process 1 only: process 0 never sees a signal.
  codes, first, waited = _stop(workdir, tmp_path, cache, data_dir,
                               [(1, signal.SIGTERM, 0)])
  assert codes == [0, 0] and waited < 45, (codes, waited)
  # Every step, and the state both saved, as in an uninterrupted run (1 process x 8).
  two_processes.assert_same_as_uninterrupted(tmp_path_factory, data_dir, workdir, first,
                                             EXTRA)


@pytest.mark.slow  # CI time: the stop above, then a resumed job stopped again: 4-5 min on
# 2 busy cores
def test_both_processes_stop_at_one_agreed_step_and_resume_exactly(tmp_path,
                                                                   tmp_path_factory,
                                                                   data_dir):
  workdir, cache = str(tmp_path / 'run'), str(tmp_path / 'xla_cache')
  # SIGTERM to process 1 only: process 0 never sees a signal.
  codes, first, waited = _stop(workdir, tmp_path, cache, data_dir,
                               [(1, signal.SIGTERM, 0)])
  assert codes == [0, 0] and waited < 45, (codes, waited)
  # Resumed on 2 processes; SIGTERM to both, 1 s and a step apart.
  codes, second, waited = _stop(workdir, tmp_path, cache, data_dir,
                                [(0, signal.SIGTERM, 0), (1, signal.SIGTERM, AFTER_A_STEP)])
  assert codes == [0, 0] and waited < 45, (codes, waited)
  print(f'stopped at steps {first} and {second}')
  # Every step, those resumed included, as in an uninterrupted run (1 process x 8).
  two_processes.assert_same_as_uninterrupted(tmp_path_factory, data_dir, workdir, second,
                                             EXTRA)


@pytest.mark.slow
def test_ctrl_c_on_one_process_stops_both_at_one_step_with_exit_130(tmp_path, data_dir):
  codes, _, _ = _stop(str(tmp_path / 'run'), tmp_path, None, data_dir,
                      [(0, signal.SIGINT, 0)])
  assert codes == [130, 130]
