"""The documentation cannot rot: README.md and docs/*.md checked against the code.

- docs/configuration.md is what `python -m cookie_jax.config_doc` writes from the schema.
- Every `python launch/...` and `python benchmarks/...` command in a fenced shell block
  names a script that exists, config keys the schema has (after loading the variant it
  names, as the launchers load it) and flags the script accepts (its absl `--helpfull`
  or argparse `--help`, run once per script). Commands that run in seconds on a CPU
  (`launch/preflight.py`, and `launch/tpu_pod.py run` as its `--dry_run`) are run.
- Every relative link points at a file that exists, and every `#anchor` at a heading.
"""

import ast
import functools
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from cookie_jax import config_doc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))
SHELLS = ('bash', 'sh', 'shell', 'console', '')
SBATCH = 'launch/slurm.sbatch'  # its config and overrides go to launch/train.py
SCRIPT = re.compile(r'^(launch|benchmarks)/[\w-]+\.py$')
# Flags every absl launcher takes from absl itself (`--helpfull` lists them too).
PLACEHOLDER = re.compile(r'^[A-Z][A-Z0-9_]*$')  # --config.KEY=VALUE in a usage line


def _env():
  return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''),
              JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')


def test_configuration_reference_is_up_to_date():
  message = config_doc.stale_message()
  assert message is None, message


def _blocks(text: str):
  """(language, body) of each fenced block."""
  return re.findall(r'^[ \t]*```([\w-]*)[^\n]*\n(.*?)^[ \t]*```', text, flags=re.S | re.M)


def _command_lines(body: str):
  """Each shell line, continuations joined and a leading '$ ' dropped."""
  for line in body.replace('\\\n', ' ').splitlines():
    line = line.strip()
    yield line[2:] if line.startswith('$ ') else line


def _commands():
  """(page, line, script, args) of every documented python launch/ or benchmarks/ call."""
  out = []
  for page in PAGES:
    for lang, body in _blocks(page.read_text(encoding='utf-8')):
      if lang not in SHELLS:
        continue
      for line in _command_lines(body):
        if not re.search(r'\bpython3? (launch|benchmarks)/|launch/slurm\.sbatch ',
                         line.split('#', 1)[0]):
          continue
        tokens = shlex.split(line, comments=True)
        # One command per '&&', ';' or '|' (a '|' inside [--a=x|y] is one token).
        commands, current = [], []
        for token in tokens:
          if token in ('&&', ';', '|', '||'):
            commands.append(current)
            current = []
          else:
            current.append(token)
        commands.append(current)
        for cmd in commands:
          where = page.relative_to(ROOT).as_posix()
          if len(cmd) >= 2 and cmd[0] in ('python', 'python3') and SCRIPT.match(cmd[1]):
            out.append((where, line, cmd[1], cmd[2:]))
          elif cmd[:1] == ['sbatch'] and SBATCH in cmd:  # sbatch ... SBATCH CONFIG WORKDIR ...
            at = cmd.index(SBATCH)
            out.append((where, line, SBATCH, [f'--config={cmd[at + 1]}'] + cmd[at + 3:]))
  return out


COMMANDS = _commands()


def test_the_pages_document_commands():
  scripts = {script for _, _, script, _ in COMMANDS}
  assert {'launch/train.py', 'launch/eval.py', 'launch/index.py', 'launch/export_torch.py',
          'launch/compile.py', 'launch/tpu_pod.py', 'launch/preflight.py'} <= scripts, scripts


@functools.lru_cache(maxsize=None)
def _accepted_flags(script: str) -> frozenset:
  """The flags `script` accepts: an argparse script's `add_argument('--name', ...)` options
  (read from its source: its --help would import all it imports), or what an absl
  launcher's `--helpfull` lists (booleans also as --noNAME; launchers import lazily)."""
  source = (ROOT / script).read_text(encoding='utf-8')
  if 'argparse' in source:
    return frozenset(
        arg.value[2:] for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'add_argument'
        for arg in node.args
        if isinstance(arg, ast.Constant) and str(arg.value).startswith('--'))
  done = subprocess.run([sys.executable, str(ROOT / script), '--helpfull'],
                        capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
  text = done.stdout + done.stderr
  names = set()
  for no, name in re.findall(r'^\s+(?:-\S+,)?--(\[no\])?([\w.-]+):', text, flags=re.M):
    names.update([name, 'no' + name] if no else [name])
  assert names, f'{script} --helpfull listed no flags:\n{text[-2000:]}'
  return frozenset(names)


@functools.lru_cache(maxsize=None)
def _config(spec: str):
  """The config `--config=FILE[:VARIANT]` loads, as the launchers' config_flags load it."""
  path, _, variant = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(f'docs_config_{len(spec)}', ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(None if variant.startswith('<') else (variant or None))


def _has_key(config, key: str) -> bool:
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return False
    node = node[part]
    if hasattr(node, 'keys') and not hasattr(node, 'to_dict'):  # a plain dict (eval.data)
      return True
  return True


def _problems(script: str, args: list[str]) -> list[str]:
  problems, config_args = [], []
  if not (ROOT / script).is_file():
    return [f'{script} does not exist']
  accepted = _accepted_flags('launch/train.py' if script == SBATCH else script)
  if script == 'launch/tpu_pod.py' and '--' in args:  # what follows goes to launch/train.py
    cut = args.index('--')
    args, config_args = args[:cut], args[cut + 1:]
  for token in args + config_args:
    flag = token.strip('[]')
    if not flag.startswith('--') or flag == '--':
      continue
    name, _, value = flag[2:].partition('=')
    if name.startswith('config.'):
      continue  # below, against the config the command loads
    if name not in accepted and not (token in config_args and name == 'config'):
      problems.append(f'{script} has no flag --{name}')
  spec = next((t.split('=', 1)[1] for t in args + config_args
               if t.strip('[]').startswith('--config=')), 'configs/base.py')
  keys = [t.strip('[]')[len('--config.'):].split('=', 1)[0] for t in args + config_args
          if t.strip('[]').startswith('--config.')]
  if keys and 'config' not in accepted:
    problems.append(f'{script} takes no --config overrides: {keys}')
  if keys or '--config=' in ' '.join(args):
    try:
      config = _config(spec)
    except Exception as e:  # pylint: disable=broad-except
      return problems + [f'--config={spec} does not load: {e}']
    for key in keys:
      if not PLACEHOLDER.match(key) and not _has_key(config, key):
        problems.append(f'--config.{key} is not a key of {spec}')
  return problems


@pytest.mark.parametrize('page, line, script, args', COMMANDS,
                         ids=[f'{p}:{s}:{i}' for i, (p, _, s, _) in enumerate(COMMANDS)])
def test_documented_command_names_a_script_its_flags_and_config_keys(page, line, script,
                                                                     args):
  problems = _problems(script, args)
  assert not problems, f'{page}: `{line}`: ' + '; '.join(problems)


def _runnable():
  """The documented commands that run in seconds here: the pre-flight check, and a TPU
  launch as its dry run (which is that check plus the commands it would send)."""
  out = []
  for page, line, script, args in COMMANDS:
    if script == 'launch/preflight.py' or (script == 'launch/tpu_pod.py' and args[:1] == ['run']):
      if script == 'launch/tpu_pod.py':
        cut = args.index('--') if '--' in args else len(args)
        args = args[:cut] + ['--dry_run'] + args[cut:]
      out.append((page, line, script, args))
  return out


@pytest.mark.parametrize('page, line, script, args', _runnable())
def test_documented_dry_runs_succeed(page, line, script, args):
  done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                        timeout=300, env=_env(), cwd=ROOT)
  assert done.returncode == 0, f'{page}: `{line}` exited {done.returncode}:\n' + (
      done.stdout + done.stderr)[-3000:]
  assert 'pre-flight:' in done.stdout + done.stderr


def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as '-'."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def _anchors(page: pathlib.Path) -> set:
  text = re.sub(r'^```.*?^```', '', page.read_text(encoding='utf-8'), flags=re.S | re.M)
  return {_anchor(h) for h in re.findall(r'^#+ (.*)$', text, flags=re.M)}


def test_links_point_at_files_and_headings_that_exist():
  broken = []
  for page in PAGES:
    text = re.sub(r'^```.*?^```', '', page.read_text(encoding='utf-8'), flags=re.S | re.M)
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
      if re.match(r'[a-z]+:', target):
        continue  # https:, mailto:
      path, _, anchor = target.partition('#')
      dest = (page.parent / path).resolve() if path else page
      if not dest.exists():
        broken.append(f'{page.name}: ({target}): no such file')
      elif anchor and dest.suffix == '.md' and anchor not in _anchors(dest):
        broken.append(f'{page.name}: ({target}): no such heading')
  assert not broken, '\n'.join(broken)


def test_ci_runs_the_readmes_test_command_verbatim():
  """README's two set-up commands are the first two bash blocks under "## Set-up"; CI
  (.ci/run) runs the second, the test command, as it is written there."""
  text = (ROOT / 'README.md').read_text(encoding='utf-8')
  setup = text.split('\n## Set-up\n', 1)[1].split('\n## ', 1)[0]
  demo, tests = [body.strip() for _, body in re.findall(r'^```(bash)\n(.*?)^```', setup,
                                                         flags=re.S | re.M)][:2]
  assert demo.startswith('pip install -r requirements.txt -e . && python launch/train.py ')
  ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8').splitlines()
  assert tests in ci, f'.ci/run does not run the README\'s test command {tests!r}'
