"""The errors cookie_jax raises for a user's mistake or a run's end, in one place.

Each is raised where the bad value enters, with the value, what was expected and the fix;
`cli.run_or_exit` turns them into one line and an exit code. They are also importable
from the module that raises them (`config.ConfigError`, `train.NonFiniteError`, ...).
"""


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names key, value and fix."""


class CheckpointMismatchError(ValueError):
  """A checkpoint whose parameters do not fit the configured model."""


class TokenizerMismatchError(ValueError):
  """The dataset's tokenizer is not the one a run was trained with."""


class ShardLayoutError(ValueError):
  """A shard that is not laid out as img2dataset writes it; the message names it."""


class NonFiniteError(RuntimeError):
  """Training produced a NaN or Inf loss or gradient."""


class PreemptedError(RuntimeError):
  """Not an error of the run: it was asked to stop (SIGTERM, Ctrl-C) and saved its state.

  `exit_code` is what the launcher exits with: 0 for SIGTERM or a preemption notice (the
  scheduler's request, done), 130 for Ctrl-C (the shell's code for an interrupt).
  """

  def __init__(self, message: str, exit_code: int = 0):
    super().__init__(message)
    self.exit_code = exit_code


# Errors that describe a mistake in the command, the config or the files, with the fix in
# the message: the launchers print them as one line.
USER_ERRORS = (ConfigError, CheckpointMismatchError, TokenizerMismatchError,
               FileNotFoundError, NotADirectoryError, PermissionError, ShardLayoutError)
