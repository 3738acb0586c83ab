"""Turns user mistakes into one clear line and a non-zero exit, for the launch scripts."""

import atexit
import os
import re
import sys

from absl import logging

from cookie_jax.errors import USER_ERRORS, NonFiniteError, PreemptedError


def run_or_exit(fn):
  """`fn()`, or one line on stderr and the exit a launcher owes for how it ended."""
  try:
    return fn()
  except PreemptedError as e:  # SIGTERM, a preemption notice or Ctrl-C: saved
    print(e, file=sys.stderr)
    exit_now(e.exit_code)
  except KeyboardInterrupt:  # Ctrl-C where nothing could be saved yet
    print('Interrupted (Ctrl-C); nothing to save yet.', file=sys.stderr)
    exit_now(130)
  except (NonFiniteError, *USER_ERRORS) as e:
    print(f'error: {e}', file=sys.stderr)
    exit_now(1)


def exit_now(code: int):
  """Ends the process without the interpreter's teardown.

  After JAX, TensorFlow and orbax that teardown (a last garbage collection over half a
  million objects, then the native libraries' destructors) took seconds to most of a
  minute on the 2-core VM, printing nothing. By the time a launcher ends, everything it
  writes is written: checkpoints waited for, metric files closed. The atexit handlers
  (JAX's own clean-up, the distributed client's shutdown) still run.
  """
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  os._exit(code)  # pylint: disable=protected-access


def run(main) -> None:
  """absl's `app.run(main)` with one-line flag errors, exiting as soon as `main` is done."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    app.run(main, flags_parser=parse_flags_or_exit)
    code = 0
  except SystemExit as e:
    code = e.code
  if code is not None and not isinstance(code, int):
    print(code, file=sys.stderr)  # what sys.exit('message') does
    code = 1
  exit_now(code or 0)


def parse_flags_or_exit(argv):
  """absl flag parsing (config file and `--config.*` overrides) with one-line errors."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  missing = missing_config_file(argv)
  if missing:
    # ml_collections defers this error to the first use of the config: a traceback.
    print(f'error: {missing}', file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # absl and ml_collections raise many types here (KeyError for an unknown override,
    # the config file's own ValueError, flags.Error); all are a mistake in the command.
    print(f'error: {flag_error(e, argv, has_config="config" in flags.FLAGS)}',
          file=sys.stderr)
    sys.exit(2)


def missing_config_file(argv) -> str | None:
  """One line for a `--config=FILE[:VARIANT]` whose FILE does not exist, naming the
  nearest file of that folder."""
  import difflib  # pylint: disable=g-import-not-at-top
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == '--config' and i + 1 < len(args):  # `--config FILE`
      arg = f'--config={args[i + 1]}'
    if not arg.startswith('--config='):
      continue
    path = arg[len('--config='):].split(':', 1)[0]
    if os.path.isfile(path):
      return None
    folder = os.path.dirname(path) or '.'
    files = sorted(f for f in os.listdir(folder) if f.endswith('.py')) if os.path.isdir(
        folder) else []
    near = difflib.get_close_matches(os.path.basename(path), files, n=1)
    hint = (f' Did you mean {os.path.join(os.path.dirname(path), near[0])}?' if near else
            f' Config files in {folder}: {files}.' if files else '')
    return f'{arg}: no such config file {path!r}.{hint}'
  return None


def _overrides(argv):
  """(key, the argument) of each `--config.KEY=VALUE` / `--[no]config.KEY` in argv."""
  for arg in argv[1:]:
    name = arg.split('=', 1)[0]
    for prefix in ('--config.', '--noconfig.'):
      if name.startswith(prefix):
        yield name[len(prefix):], arg


def flag_error(error: Exception, argv, has_config: bool = True) -> str:
  """One line for a bad command line, naming the full key and the nearest valid one."""
  from cookie_jax.config import default_config  # pylint: disable=g-import-not-at-top
  schema = default_config()
  found = _override_error(argv, has_config, schema)
  if found:
    return found
  message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
  if 'Traceback (most recent call last)' in message:
    # The config file raised: its own last line is the message.
    message = [l for l in message.splitlines() if l.strip()][-1]
  message = ' '.join(message.split())
  for key, arg in _overrides(argv):
    if message.startswith(f'flag {arg}:'):  # a value of the wrong type
      default = _value(schema, key)
      kind = _KINDS.get(type(default), type(default).__name__)
      return (f"{message[len('flag '):]}; config.{key} takes {kind}, e.g. "
              f'--config.{key}={default!r}.')
  unknown = re.fullmatch(r"Unknown command line flag '([^']+)'(?:\. Did you mean: ([^ ,]+).*)?",
                         message)
  if unknown:
    name, near = unknown.groups()
    return f'Unknown flag --{name}.' + (f' Did you mean --{near}?' if near else '')
  if message.startswith('flag --'):  # absl's own flags: '--step=abc: invalid literal ...'
    return message[len('flag '):]
  return f'bad command-line flags: {message}'


def _override_error(argv, has_config: bool, schema) -> str | None:
  """The first override that cannot apply: unknown key, or no config to apply it to."""
  from cookie_jax.config import nearest_key  # pylint: disable=g-import-not-at-top
  given_config = any(a.split('=', 1)[0] == '--config' for a in argv[1:])
  for key, arg in _overrides(argv):
    if not has_config:
      return (f'{arg}: this launcher takes no --config, so there is nothing to override; '
              "it uses the run's saved config.")
    try:
      _value(schema, key)
    except (KeyError, AttributeError, TypeError):
      near, section, where = nearest_key(key, schema), schema, []
      for part in key.split('.')[:-1]:  # the deepest section the key names
        if not hasattr(section.get(part), 'keys'):
          break
        section, where = section[part], where + [part]
      hint = (f" Did you mean '{near}'?" if near else
              f" Keys of {'.'.join(where) or 'the config'}: {sorted(section.keys())}.")
      return f"Unknown config key '{key}' ({arg}).{hint}"
    if not given_config:
      return (f'{arg}: --config.* overrides apply to a config file; add --config=FILE '
              '(e.g. configs/base.py:demo).')
  return None


_KINDS = {int: 'an integer', float: 'a number', str: 'a string', bool: 'True or False',
          tuple: 'a tuple such as "(1, 2)"'}


def _value(schema, key: str):
  for part in key.split('.'):
    schema = schema[part]
  return schema


class _LibraryInfoFilter:
  """Drops library chatter from the console: INFO lines of orbax and tensorstore (dozens
  per save) and of tfds (every open of a dataset), and JAX's note that there is no TPU
  library on a machine without a TPU."""

  def filter(self, record) -> bool:
    import logging as py_logging  # pylint: disable=g-import-not-at-top
    if record.levelno > py_logging.INFO:
      return True
    if '/orbax/' in record.pathname or '/tensorflow_datasets/' in record.pathname:
      return False
    message = str(record.msg)
    return not (message.startswith('Unable to initialize backend') and
                'libtpu.so' in record.getMessage())


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
