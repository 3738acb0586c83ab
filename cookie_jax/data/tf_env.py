"""The one import of TensorFlow, which must never claim an accelerator.

JAX owns the GPUs/TPUs; if TF initialised them first it would reserve most of their memory
for nothing, since tf.data only runs on the host. Every module of `cookie_jax.data` that
needs TF imports it from here, so the devices are hidden before any TF op runs.

TF's native libraries print two notes while they load, whatever TF_CPP_MIN_LOG_LEVEL says
('All log messages before absl::InitializeLog() ...' and 'oneDNN custom operations are
on ...'), twice each; they are dropped, and anything else they print still shows.
"""

import contextlib
import os
import sys
import tempfile

_NOISE = ('All log messages before absl::InitializeLog() is called',
          'oneDNN custom operations are on')


@contextlib.contextmanager
def _native_stderr_without_noise():
  """Native writes to fd 2 go to a file while the body runs, then all but _NOISE back."""
  try:
    saved = os.dup(2)
  except OSError:  # no stderr at all
    yield
    return
  with tempfile.TemporaryFile(mode='w+b') as captured:
    sys.stderr.flush()
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode('utf-8', 'replace').splitlines(keepends=True):
        if not any(n in line for n in _NOISE):
          sys.stderr.write(line)
      sys.stderr.flush()


with _native_stderr_without_noise():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  # Raised only when TF already initialised its devices (someone imported and used TF
  # first); then it is too late to hide them, and failing here would not help.
  pass

__all__ = ['tf']
