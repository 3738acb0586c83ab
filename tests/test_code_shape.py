"""The shape of the code itself: short functions, and rooms that import only what they may
(DESIGN.md: checkpoint I/O in checkpoint.py, evaluation and export without the train
step, objectives without the data room)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'cookie_jax'
MAX_FUNCTION_LINES = 80


def _modules():
  for path in sorted(ROOT.rglob('*.py')):
    yield path.relative_to(ROOT.parent).as_posix(), ast.parse(path.read_text('utf-8'))


def _imports(tree) -> set[str]:
  """Every module a file imports, at the top or inside a function."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f'{node.module}.{a.name}' for a in node.names)
  return out


def test_no_function_is_longer_than_80_lines():
  long = [f'{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)'
          for name, tree in _modules() for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, long


def test_orbax_is_imported_in_checkpoint_py_only():
  users = sorted(name for name, tree in _modules()
                 if any(m.split('.')[0] == 'orbax' for m in _imports(tree)))
  assert users == ['cookie_jax/checkpoint.py'], users


def test_evaluation_and_export_do_not_import_the_train_step():
  users = sorted(name for name, tree in _modules()
                 if name.startswith(('cookie_jax/eval/', 'cookie_jax/interop/'))
                 and 'cookie_jax.step' in _imports(tree))
  assert not users, users


def test_objectives_and_losses_do_not_import_the_data_room():
  users = sorted(name for name, tree in _modules()
                 if (name == 'cookie_jax/objectives.py' or
                     name.startswith(('cookie_jax/losses/', 'cookie_jax/models/')))
                 and any(m == 'cookie_jax.data' or m.startswith('cookie_jax.data.')
                         for m in _imports(tree)))
  assert not users, users


# Local file calls that would make a local folder named `gs:` for a gs:// workdir; every
# file a run, an evaluation, an index build or an export writes goes through
# cookie_jax/files.py instead (DESIGN: Files).
_LOCAL_FILE_CALLS = {'open', 'os.makedirs', 'os.mkdir', 'os.replace', 'os.rename',
                     'os.remove', 'os.listdir', 'os.walk', 'os.path.exists', 'os.path.isdir',
                     'os.path.isfile', 'shutil.copy', 'shutil.copyfile', 'shutil.move',
                     'shutil.rmtree'}
# The modules that touch local files only, and why.
_LOCAL_ONLY = {
    'cookie_jax/files.py': 'the one path API itself',
    'cookie_jax/comm_audit.py': "XLA's HLO dumps, in a local temporary folder",
    'cookie_jax/distributed.py': '/dev/accel0',
    'cookie_jax/data/image_files.py': 'a local folder of images (launch/index.py --images)',
    'cookie_jax/data/builders/karpathy.py': "the raw dataset's local manual_dir",
    'cookie_jax/data/builders/msrvtt.py': "the raw dataset's local manual_dir",
    'cookie_jax/interop/hf_export.py': 'writes inside the local folder files.local_dir gives',
    'cookie_jax/interop/hf_import.py': 'a local Hugging Face folder',
    'cookie_jax/interop/torch_model.py': 'the PyTorch-only loader of a local export',
    'cookie_jax/interop/clip_benchmark_cookie.py': 'the PyTorch-only loader of a local export',
    'cookie_jax/interop/hf_automodel.py': 'writes inside the local folder files.local_dir gives',
    'cookie_jax/cli.py': 'the --config file, a local Python file ml_collections imports',
}


def _call_name(node) -> str:
  parts, f = [], node.func
  while isinstance(f, ast.Attribute):
    parts.append(f.attr)
    f = f.value
  parts.append(f.id if isinstance(f, ast.Name) else '<expr>')  # epath.Path(p).open: fine
  return '.'.join(reversed(parts))


def test_files_of_a_run_go_through_cookie_jax_files():
  found = sorted(f'{name}:{node.lineno} {_call_name(node)}'
                 for name, tree in _modules() if name not in _LOCAL_ONLY
                 for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and _call_name(node) in _LOCAL_FILE_CALLS)
  assert not found, found
