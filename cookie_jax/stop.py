"""SIGTERM (how schedulers preempt) and Ctrl-C (SIGINT) as requests to save and stop.

One process: the run saves at the step it is at when the signal arrives.

Several processes: every process must enter the save at the same step, since a save (and
every step) is a collective; a process that saves alone waits there for the others, and
they wait in their next step for it: the job hangs without a checkpoint. Signals reach
the hosts at different moments (SLURM's `scancel`, a pod's maintenance notice on one
host), so a local flag cannot decide the step. JAX's own preemption protocol does:

* `jax.distributed.initialize` installs a SIGTERM handler and starts a preemption sync
  manager on every process (XLA's `PreemptionSyncManager` over the coordination
  service). A host's SIGTERM is published to all processes; each reports the last
  counter its loop passed to `reached_preemption_sync_point`, and the sync point is the
  largest + 1. While that is being decided, a call to `reached_preemption_sync_point`
  blocks, so no loop can pass the point before it is set;
* every process calls `reached_preemption_sync_point(n)` with n = 1, 2, 3, ... (the
  steps of this launch), so each one returns True at the same n, i.e. the same step:
  all hosts start the launch at the same step (they restore the same checkpoint). n
  counts from the launch's first step rather than being the step itself, so that a
  notice during the restore or the first compile (every counter still 0) stops the run
  after its first step instead of at a step it has passed;
* the call takes a mutex and compares two integers: no host synchronises per step. The
  agreement runs in the background, over the coordination service (not the devices),
  once, when a notice arrives;
* nothing else may call it: orbax asks on every save, from its own thread and with
  older steps (`Checkpointer` answers orbax from this object instead);
* Ctrl-C is turned into a SIGTERM to the own process (JAX's handler is kept: a Python
  SIGTERM handler would replace it), and once the stop is agreed the processes exchange
  whether any of them saw Ctrl-C (one `process_allgather`, at the stop only), so all exit
  with the same code: 130 if any saw Ctrl-C, else 0.

In both cases Python runs a signal handler in the main thread only between bytecodes, so
not while that thread compiles or waits for the devices. A watcher thread, woken by
`signal.set_wakeup_fd` on every delivery, answers Ctrl-C at once instead: it says that
the request is heard, and a second Ctrl-C ends the process there and then (exit 130),
without saving (with several processes, that one: JAX's coordination service ends the
others once it notices that one is gone, unless the same Ctrl-C reached them too, as a
terminal's does for the processes it started). Checkpoints are written to a temporary
folder and renamed when complete, so the latest complete one stays the latest.
"""

import os
import signal
import threading

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np


class StopSignals:
  """Whether, and at which step, a run asked to stop must save and stop."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal = None  # SIGTERM or SIGINT: what asked the run to stop (agreed by all)
    self.stop_step = None  # the step every process saves and stops at, once decided
    self._interrupts = 0
    self._previous = None
    self._start_step = 0
    # 'local' (one process), 'collective' (several, agreeing through JAX), or 'off'
    # (several, and JAX's preemption service turned off: nothing to agree with).
    self._mode = 'local'

  def install(self, directory: str, start_step: int = 0) -> None:
    """Handles the signals from now on; `start_step` is the step the loop starts at."""
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    self._directory, self._start_step = directory, start_step
    if jax.process_count() > 1:
      self._mode = 'collective' if _jax_preemption_sync() else 'off'
    if self._mode == 'off':
      return  # the signals keep their default actions
    # With several processes, SIGTERM stays JAX's (see the module docstring).
    signals = (signal.SIGINT,) if self._mode == 'collective' else self.SIGNALS
    self._previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
      # The handler only keeps Python from raising KeyboardInterrupt mid-step; the
      # watcher counts each delivery once.
      signal.signal(s, self._handle)
    read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._write_fd, False)
    self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
    threading.Thread(target=self._watch, args=(read_fd,), name='stop_signals',
                     daemon=True).start()

  def restore(self) -> None:
    if self._previous is None:
      return
    signal.set_wakeup_fd(self._previous_wakeup)
    os.close(self._write_fd)  # ends the watcher
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = None

  def requested(self, step: int) -> bool:
    """True when the run must save `step` and stop: called after every step, in order."""
    if self.stop_step is not None:
      return step == self.stop_step
    if self._mode != 'collective':
      if self.signal is not None:
        self.stop_step = step
      return self.signal is not None
    if not multihost_utils.reached_preemption_sync_point(step - self._start_step):
      return False
    self.stop_step = step
    # Once, at the stop: Ctrl-C on any process makes all of them exit 130.
    interrupted = multihost_utils.process_allgather(
        np.int32(self.signal == signal.SIGINT))
    self.signal = signal.SIGINT if np.any(interrupted) else signal.SIGTERM
    logging.warning('A stop was requested (%s on at least one of the %d processes): all '
                    'save step %d, then stop.',
                    'Ctrl-C' if self.signal == signal.SIGINT else 'SIGTERM',
                    jax.process_count(), step)
    return True

  def _handle(self, signum, frame):
    del frame
    if self.signal is None:
      self.signal = signum

  def _watch(self, read_fd: int) -> None:
    with os.fdopen(read_fd, 'rb', buffering=0) as pipe:
      while data := pipe.read(64):
        for signum in data:
          self._received(signum)

  def _received(self, signum: int) -> None:
    if signum not in self.SIGNALS:
      return
    if self.signal is None:
      self.signal = signum
    if signum != signal.SIGINT:
      logging.warning('SIGTERM received: saving a checkpoint at the current step, then '
                      'stopping.')
      return
    self._interrupts += 1
    if self._interrupts == 1:
      if self._mode == 'collective':
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler: a notice to all
        _say('Ctrl-C: saving a checkpoint at the step all processes agree on, then '
             'stopping (Ctrl-C again stops this process at once, without saving).')
      else:
        _say('Ctrl-C: saving a checkpoint at the current step, then stopping (Ctrl-C '
             'again stops at once, without saving).')
      return
    _say(f'Ctrl-C again: stopped without saving. Latest complete checkpoint: '
         f'{_latest_on_disk(self._directory)}.')
    os._exit(130)  # pylint: disable=protected-access


def _jax_preemption_sync() -> bool:
  """Whether JAX's preemption sync manager runs (`jax.distributed.initialize` starts it
  unless jax_enable_preemption_service is off); said once when it does not."""
  try:
    multihost_utils.reached_preemption_sync_point(0)  # the counter's initial value
    return True
  except RuntimeError:
    logging.warning('jax_enable_preemption_service is off, so the %d processes cannot '
                    'agree on a step to save at: SIGTERM and Ctrl-C end this run without '
                    'a checkpoint. Leave it on to have them save first.',
                    jax.process_count())
    return False


def _latest_on_disk(directory: str) -> str:
  """DIR/N of the newest finished step (orbax renames a save to its step when done)."""
  try:
    steps = [int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit()]
  except OSError:
    steps = []
  return f'{directory}/{max(steps)}' if steps else 'none'


def _say(message: str) -> None:
  logging.warning('%s', message)
  logging.flush()
