"""Turns user mistakes into one clear line and a non-zero exit, for the launch scripts."""

import sys

from absl import logging

from cookie_jax.checkpoint import CheckpointMismatchError
from cookie_jax.config import ConfigError
from cookie_jax.data.builders.webshards import ShardLayoutError

# Errors that describe a mistake in the command, the config or the files, with the fix in
# the message; a traceback would only hide that line.
USER_ERRORS = (ConfigError, CheckpointMismatchError, FileNotFoundError, NotADirectoryError,
               PermissionError, ShardLayoutError)


def run_or_exit(fn):
  from cookie_jax.train import NonFiniteError, PreemptedError  # pylint: disable=g-import-not-at-top
  try:
    return fn()
  except PreemptedError as e:
    logging.warning('%s', e)
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(0)
  except (NonFiniteError, *USER_ERRORS) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def parse_flags_or_exit(argv):
  """absl flag parsing (config file and `--config.*` overrides) with one-line errors."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # absl and ml_collections raise many types here (KeyError for an unknown override,
    # the config file's own ValueError, flags.Error); all are a mistake in the command.
    message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    if 'Traceback (most recent call last)' in message:
      # The config file raised: its own last line is the message.
      message = [l for l in message.splitlines() if l.strip()][-1]
    message = ' '.join(message.split())
    print(f'error: bad command-line flags: {message}', file=sys.stderr)
    sys.exit(2)


class _LibraryInfoFilter:
  """Drops INFO lines from orbax and tensorstore internals (dozens per save)."""

  def filter(self, record) -> bool:
    import logging as py_logging  # pylint: disable=g-import-not-at-top
    return record.levelno > py_logging.INFO or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
