"""`train.profile_steps = (start, stop)`: a `jax.profiler` trace of steps start..stop.

The trace goes to `WORKDIR/profile/` (`plugins/profile/<session>/*.xplane.pb`), which
XProf reads, standalone or as TensorBoard's profile plugin (`pip install xprof`, then
`xprof --logdir=WORKDIR/profile --port=6006`, or `tensorboard --logdir=WORKDIR/profile`
and the Profile tab). Steps are
counted like the logged ones (1 = the first update). The trace starts before step
`start` is dispatched and stops once step `stop` has finished on the devices: the one
wait for the devices it adds, and only when profiling. With (0, 0) it does nothing.
For a `gs://` workdir the trace is written to a local folder first and copied to
WORKDIR/profile when it stops (`files.local_dir`).
"""

import contextlib

from absl import logging
import jax

from cookie_jax import files


class StepProfiler:
  """Starts and stops one trace around a range of steps."""

  def __init__(self, steps, workdir: str):
    self.start, self.stop = (int(s) for s in steps)
    self.directory = files.join(workdir, 'profile')
    self.active = False
    self._local = contextlib.ExitStack()

  def before(self, step: int) -> None:
    """Call before dispatching the update that produces `step`."""
    if self.start and step == self.start and not self.active:
      jax.profiler.start_trace(self._local.enter_context(files.local_dir(self.directory)))
      self.active = True
      logging.info('Profiling steps %d to %d into %s.', self.start, self.stop,
                   self.directory)

  def after(self, step: int, state) -> None:
    """Call after dispatching the update that produced `step`."""
    if self.active and step >= self.stop:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self._local.close()  # copies a remote workdir's trace there
      self.active = False
      logging.info('Profile written to %s; open it with `xprof --logdir=%s` (pip install '
                   'xprof) or TensorBoard with the profile plugin.', self.directory,
                   self.directory)
