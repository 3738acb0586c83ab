"""Every file a run, an evaluation, an index build or an export reads or writes in a
workdir (or an index or export folder), through `etils.epath`, so that `gs://bucket/run`
behaves like a local folder and nothing ever makes a local folder named `gs:`.

epath sends `gs://` to `tf.io.gfile` when TensorFlow is installed, else to fsspec/gcsfs
(`EPATH_USE_TF=false` chooses gcsfs too); local paths go to the `os` module. An object
store differs from a disk in three ways this module deals with:

* no directories: `makedirs` is skipped for remote paths (an object's name is its path);
* no atomic rename, but an upload is all or nothing: `write_bytes` writes a local file
  through a temporary one and a rename, and a remote object in one upload, so a reader
  sees the old content or the new, never half;
* no append: `RunFiles` keeps the files a run appends to (metrics.jsonl, TensorBoard's
  event file) or rewrites every logged step (goodput.json) in a local folder and
  uploads each changed file whole now and then (see its docstring);

and some writers take a local path only (transformers' `save_pretrained`, safetensors,
the profiler): `local_dir` gives them one and copies it to the destination afterwards.
"""

import contextlib
import os
import shutil
import tempfile
import time

from etils import epath

# How often a remote workdir's `RunFiles` uploads what changed, besides the forced syncs.
SYNC_EVERY_S = 60.0
_COPY_CHUNK = 16 << 20


def is_remote(path) -> bool:
  """True for an object store URL (gs://, s3://, ...), False for a local path."""
  return '://' in os.fspath(path)


def join(base, *parts) -> str:
  """`base/part/...` as a string, 'gs://...' kept as a URL."""
  return os.fspath(epath.Path(base).joinpath(*parts))


def absolute(path) -> str:
  """A local path made absolute; a URL as it is (os.path.abspath('gs://b') would be
  '<cwd>/gs:/b')."""
  return os.fspath(path) if is_remote(path) else os.path.abspath(os.fspath(path))


def makedirs(path) -> None:
  """A local folder and its parents; nothing for an object store, which has none."""
  if not is_remote(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path) -> bool:
  return epath.Path(path).exists()


def remove(path) -> None:
  epath.Path(path).unlink()


def read_text(path) -> str:
  return epath.Path(path).read_text(encoding='utf-8')


def read_bytes(path) -> bytes:
  return epath.Path(path).read_bytes()


def write_bytes(path, data: bytes) -> None:
  """`data` as the whole of `path`, never half written (see the module docstring)."""
  p = epath.Path(path)
  if is_remote(path):
    p.write_bytes(data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.with_name(f'{p.name}.tmp')
  tmp.write_bytes(data)
  tmp.replace(p)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


@contextlib.contextmanager
def open_whole(path):
  """A binary file to write that becomes `path` only when the block ends without an
  error, streamed through a local temporary file (a large array never sits in memory
  twice): renamed over a local `path`, uploaded in one go to a remote one."""
  if is_remote(path):
    fd, tmp = tempfile.mkstemp(prefix='cookie_jax-')
  else:
    makedirs(os.path.dirname(os.path.abspath(path)))
    tmp = f'{os.fspath(path)}.tmp'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
  try:
    with os.fdopen(fd, 'wb') as f:
      yield f
    if is_remote(path):
      upload(tmp, path)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def upload(local_file: str, dest) -> None:
  """Copies one local file to `dest` (any path), in chunks."""
  with open(local_file, 'rb') as src, epath.Path(dest).open('wb') as dst:
    shutil.copyfileobj(src, dst, _COPY_CHUNK)


def download(src, local_file: str) -> None:
  """Copies `src` (any path) to a local file, in chunks."""
  with epath.Path(src).open('rb') as f, open(local_file, 'wb') as dst:
    shutil.copyfileobj(f, dst, _COPY_CHUNK)


def copy_tree(local_dir: str, dest) -> None:
  """Every file under the local folder `local_dir` to the same place under `dest`."""
  for root, _, names in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = dest if rel == '.' else join(dest, rel)
    makedirs(target)
    for name in names:
      upload(os.path.join(root, name), join(target, name))


@contextlib.contextmanager
def local_dir(dest):
  """A local folder for writers that write local files only: `dest` itself when it is
  local; else a temporary folder whose files are copied to `dest` when the block ends
  without an error (and which is removed either way)."""
  if not is_remote(dest):
    makedirs(dest)
    yield os.fspath(dest)
    return
  tmp = tempfile.mkdtemp(prefix='cookie_jax-')
  try:
    yield tmp
    copy_tree(tmp, dest)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


class RunFiles:
  """The files a run keeps appending to or rewriting while it trains, as local files.

  For a local workdir `local(name)` is the file in the workdir itself and `sync` does
  nothing: appends and rewrites land in place, as they always did.

  An object store cannot append, and uploading a growing file at every logged step
  would cost the loop a round trip each time and grow quadratically with the run. For a
  remote workdir the files live in a temporary local folder instead: `fetch` first
  copies down the object a resumed run continues, and `sync` uploads each changed file
  whole, replacing its object, at most every `every_s` seconds, and always when forced:
  the loop forces it before every checkpoint save and at the end. So the bucket never
  holds a checkpoint without the records that lead up to it, and a crash loses at most
  the records written since the last sync, all past the latest checkpoint, which the
  resumed run writes again (metric_writer drops the records past the step it restores).
  Only `writer` (process 0) uploads.
  """

  def __init__(self, workdir, *, writer: bool = True, every_s: float = SYNC_EVERY_S):
    self.workdir = os.fspath(workdir)
    self.remote = is_remote(workdir)
    self.writer, self.every_s = writer, every_s
    self.root = tempfile.mkdtemp(prefix='cookie_jax-run-') if self.remote else self.workdir
    if not self.remote and writer:
      makedirs(self.root)
    self._names: list[str] = []
    self._sent: dict[str, tuple] = {}
    self._last = time.monotonic()

  def local(self, name: str) -> str:
    """The local file (or folder) that stands for WORKDIR/name; uploaded by `sync`."""
    if name not in self._names:
      self._names.append(name)
    return os.path.join(self.root, name)

  def open(self, name: str, mode: str = 'a'):
    """`local(name)` opened as text (process 0 appends metrics.jsonl through this)."""
    return open(self.local(name), mode, encoding='utf-8')

  def fetch(self, name: str) -> str:
    """`local(name)`, holding the content WORKDIR/name has now (if it has any)."""
    path = self.local(name)
    if self.remote and exists(join(self.workdir, name)):
      download(join(self.workdir, name), path)
      self._sent[path] = _signature(path)
    return path

  def _changed(self):
    for name in self._names:
      path = os.path.join(self.root, name)
      files = ([os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
               if os.path.isdir(path) else [path] if os.path.isfile(path) else [])
      for f in files:
        if self._sent.get(f) != _signature(f):
          yield f

  def sync(self, force: bool = False) -> bool:
    """Uploads what changed if forced or due; True when the workdir is up to date."""
    if not self.remote:
      return True
    if not self.writer or not (force or time.monotonic() - self._last >= self.every_s):
      return False
    for f in list(self._changed()):
      signature = _signature(f)
      upload(f, join(self.workdir, os.path.relpath(f, self.root)))
      self._sent[f] = signature
    self._last = time.monotonic()
    return True

  def close(self) -> None:
    """A last forced sync, then the local folder of a remote workdir is removed."""
    if self.remote and os.path.isdir(self.root):
      try:
        self.sync(force=True)
      finally:
        shutil.rmtree(self.root, ignore_errors=True)


def _signature(path: str) -> tuple:
  """Changes with every append (size) and every rewrite (a new inode: write_bytes renames)."""
  st = os.stat(path)
  return st.st_ino, st.st_size, st.st_mtime_ns
