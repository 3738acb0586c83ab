"""An embedding index of your own images, searched by text (`launch/index.py`).

`build_index` encodes every image of a folder (recursively: jpg, jpeg, png, webp) or of a
tfds split with a run's checkpoint or an export (`encoder.py`), sharded over the mesh and
batched, and writes the index folder:

  manifest.json      what was indexed with which model, chunk size, progress and totals;
  keys.json          the images, in order (paths relative to the folder, or
                     NAME/SPLIT/INDEX of a tfds split), listed once at the first build;
  chunks/NNNNN.npz   per chunk of `chunk_size` images: the embeddings of its readable
                     images, their rows in keys.json, the unreadable ones and why;
  embeddings.npy, indexed.json, skipped.json   all chunks together, once every chunk
                     is written; faiss.index too when faiss-cpu is installed.

A chunk is written whole (`files.open_whole`: a temporary file and a rename, or one
upload to a `gs://` index folder), so a crash loses at most the chunk in progress; running
the same build again skips the chunks written and resumes. An
unreadable image is skipped, counted and named (skipped.json), never fatal.

`Index.search` finds the top-k images of query embeddings with faiss (`IndexFlatIP`,
exact inner products) when the index has a faiss file and faiss is importable, else
exactly in JAX over the mesh (`search.sharded_topk`, equal scores in index order).
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import time

from absl import logging
from etils import epath
import jax
import numpy as np

from cookie_jax import files
from cookie_jax.eval import search
from cookie_jax.config import ConfigError
from cookie_jax.data import tokenizer as tok_lib

FORMAT = 'cookie_jax.index/1'
DEFAULT_CHUNK_SIZE = 4096
MANIFEST, KEYS, CHUNKS = 'manifest.json', 'keys.json', 'chunks'
EMBEDDINGS, INDEXED, SKIPPED, FAISS = ('embeddings.npy', 'indexed.json', 'skipped.json',
                                       'faiss.index')
# What must match for a re-run to resume an index rather than mix two.
_RESUME_KEYS = ('format', 'source', 'encoder', 'chunk_size', 'image_size', 'mean', 'std')


def faiss_module():
  """faiss if installed (the `bench` extra: faiss-cpu), else None."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  # faiss logs each CPU build it tries (avx512, avx2, ...) at INFO while importing.
  py_logging.getLogger('faiss.loader').setLevel(py_logging.WARNING)
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return faiss


@dataclasses.dataclass
class Source:
  """What is indexed: `keys` and a way to read rows lo..hi-1 as eval batches."""
  spec: dict  # {'images': ROOT} or {'tfds': NAME, 'split', 'data_dir', 'image_key'}
  keys: list

  def batches(self, lo: int, hi: int, encoder):
    from cookie_jax.data import image_files  # pylint: disable=g-import-not-at-top  # TF here
    view = dict(size=encoder.image_size, mean=encoder.mean, std=encoder.std,
                batch_size=encoder.batch_size)
    if 'images' in self.spec:
      root = pathlib.Path(self.spec['images'])
      return image_files.file_batches([root / k for k in self.keys[lo:hi]], **view)
    s = self.spec
    builder = image_files.tfds_builder(s['tfds'], s['data_dir'])
    return image_files.tfds_batches(builder, s['split'], s['image_key'], lo, hi, **view)

  def picture(self, key: str) -> np.ndarray:
    """uint8 [h, w, 3] of one image as stored (for the result grid)."""
    from cookie_jax.data import image_files  # pylint: disable=g-import-not-at-top
    if 'images' in self.spec:
      return image_files.read_rgb(pathlib.Path(self.spec['images']) / key)
    s = self.spec
    return image_files.tfds_image(image_files.tfds_builder(s['tfds'], s['data_dir']), s['split'],
                             s['image_key'], int(key.rsplit('/', 1)[1]))


def folder_source(root) -> Source:
  from cookie_jax.data import image_files  # pylint: disable=g-import-not-at-top
  keys = image_files.list_images(root)
  if not keys:
    raise FileNotFoundError(f'--images={str(root)!r} holds no .jpg, .jpeg, .png or .webp '
                            'file (searched recursively).')
  return Source({'images': os.path.abspath(os.fspath(root))}, keys)


def tfds_source(name: str, split: str, data_dir: str = '', image_key: str = '') -> Source:
  from cookie_jax.data import image_files  # pylint: disable=g-import-not-at-top
  builder = image_files.tfds_builder(name, data_dir)
  if split not in builder.info.splits:
    raise ConfigError(f'--split={split!r} is not a split of {name}; it has '
                      f'{sorted(builder.info.splits)}.')
  try:
    key = image_files.image_feature(builder, image_key)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  n = builder.info.splits[split].num_examples
  spec = {'tfds': name, 'split': split, 'data_dir': files.absolute(data_dir) if data_dir
          else '', 'image_key': key}
  return Source(spec, [f'{name}/{split}/{i}' for i in range(n)])


def _read_json(path: epath.Path):
  return json.loads(path.read_text(encoding='utf-8'))


def _write_json(path: epath.Path, obj) -> None:
  files.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def _chunk_path(index_dir: epath.Path, c: int) -> epath.Path:
  return index_dir / CHUNKS / f'{c:05d}.npz'


def _write_arrays(path: epath.Path, save, *args, **arrays) -> None:
  """`save(file, ...)` (np.save, np.savez) into `path`, which appears only when whole."""
  with files.open_whole(path) as f:
    save(f, *args, **arrays)


def _load(path: epath.Path):
  """The array of an .npy file, or the arrays of an .npz file as a dict."""
  with path.open('rb') as f:
    data = np.load(f)
    return dict(data) if isinstance(data, np.lib.npyio.NpzFile) else data


def _start(index_dir: epath.Path, source: Source, encoder, chunk_size: int) -> tuple:
  """(manifest, keys): a new index, or the one on disk if it is the same build."""
  manifest = {'format': FORMAT, 'source': source.spec, 'encoder': encoder.source,
              'chunk_size': int(chunk_size), 'image_size': encoder.image_size,
              'mean': list(encoder.mean), 'std': list(encoder.std),
              'embed_dim': int(encoder.config.model.embed_dim)}
  if (index_dir / MANIFEST).is_file():
    saved = _read_json(index_dir / MANIFEST)
    for key in _RESUME_KEYS:
      if saved.get(key) != manifest[key]:
        raise ConfigError(
            f'--index={str(index_dir)!r} was built with {key}={saved.get(key)!r}, not '
            f'{manifest[key]!r}; a re-run resumes only the same build. Give a new --index, '
            'or delete that folder to start over.')
    keys = _read_json(index_dir / KEYS)
    if keys != source.keys:
      logging.warning('%s lists %d images; the source now has %d (%d not indexed). The '
                      'index keeps its own list; build into a new --index for the others.',
                      index_dir / KEYS, len(keys), len(source.keys),
                      len(set(source.keys) - set(keys)))
    return saved, keys
  files.makedirs(index_dir / CHUNKS)
  _write_json(index_dir / KEYS, source.keys)
  manifest.update(num_images=len(source.keys), complete=False)
  _write_json(index_dir / MANIFEST, manifest)
  return manifest, source.keys


def _encode_chunk(encoder, source, lo, hi, bar):
  """(embeddings, rows, skipped rows, errors) of images lo..hi-1."""
  rows, skipped, errors, state = [], [], [], {'row': lo}

  def batches():
    for batch in source.batches(lo, hi, encoder):
      for j, (ok, error) in enumerate(zip(batch['mask'], batch.pop('error'))):
        row = state['row'] + j
        if row >= hi:
          break  # padding
        if ok:
          rows.append(row)
        else:
          skipped.append(row)
          errors.append(error)
      real = min(len(batch['mask']), hi - state['row'])
      state['row'] += real
      if bar is not None:
        bar.update(real)
      yield batch

  emb = encoder.encode_images(batches())
  if len(emb) != len(rows):
    raise ValueError(f'Encoded {len(emb)} images of rows {lo}..{hi - 1} but {len(rows)} '
                     'were readable.')
  if not rows:
    emb = np.zeros((0, encoder.config.model.embed_dim), np.float32)
  return emb, np.asarray(rows, np.int64), np.asarray(skipped, np.int64), errors


def build_index(encoder, source: Source, index_dir, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                progress: bool = True, on_chunk=None) -> dict:
  """Builds (or resumes) the index of `source` in `index_dir`; returns the manifest.

  `on_chunk(c)` is called after chunk c is on disk (tests use it to stop a build).
  """
  if jax.process_count() > 1:
    raise ConfigError(f'launch/index.py runs in one process (it shards over that '
                      f'process\'s devices); this run has {jax.process_count()}.')
  if chunk_size < 1:
    raise ConfigError(f'--chunk_size={chunk_size} must be >= 1.')
  index_dir = epath.Path(index_dir)
  manifest, keys = _start(index_dir, source, encoder, chunk_size)
  source = dataclasses.replace(source, keys=keys)
  chunk_size = manifest['chunk_size']
  num_chunks = math.ceil(len(keys) / chunk_size)
  todo = [c for c in range(num_chunks) if not _chunk_path(index_dir, c).is_file()]
  if not todo and manifest.get('complete'):
    logging.info('%s is complete; nothing to do.', index_dir)
    return manifest
  manifest['complete'] = False  # until the consolidated files are written again
  _write_json(index_dir / MANIFEST, manifest)
  done = len(keys) - sum(min(len(keys), (c + 1) * chunk_size) - c * chunk_size for c in todo)
  if done:
    logging.info('Resuming %s: %d of %d chunks are on disk.', index_dir,
                 num_chunks - len(todo), num_chunks)
  bar = None
  if progress:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=len(keys), initial=done, desc='index images', unit='img')
  start, encoded = time.perf_counter(), 0
  try:
    for c in todo:
      lo, hi = c * chunk_size, min(len(keys), (c + 1) * chunk_size)
      emb, rows, skipped, errors = _encode_chunk(encoder, source, lo, hi, bar)
      _write_arrays(_chunk_path(index_dir, c), np.savez, embeddings=emb, rows=rows,
                    skipped=skipped, errors=np.asarray(errors, dtype=str))
      encoded += hi - lo
      if on_chunk is not None:
        on_chunk(c)
  finally:
    if bar is not None:
      bar.close()
  seconds = time.perf_counter() - start
  manifest.update(_consolidate(index_dir, keys, num_chunks))
  if encoded:
    manifest.update(last_build_images=encoded, last_build_seconds=round(seconds, 3),
                    last_build_images_per_s=round(encoded / seconds, 2))
  _write_json(index_dir / MANIFEST, manifest)
  return manifest


def _consolidate(index_dir: epath.Path, keys, num_chunks: int) -> dict:
  """All chunks as one embedding matrix (+ faiss), written once every chunk exists."""
  parts = [_load(_chunk_path(index_dir, c)) for c in range(num_chunks)]
  emb = np.concatenate([p['embeddings'] for p in parts]).astype(np.float32)
  rows = np.concatenate([p['rows'] for p in parts])
  skipped = [{'path': keys[int(r)], 'error': str(e)} for p in parts
             for r, e in zip(p['skipped'], p['errors'])]
  _write_arrays(index_dir / EMBEDDINGS, np.save, emb)
  _write_json(index_dir / INDEXED, [keys[int(r)] for r in rows])
  _write_json(index_dir / SKIPPED, skipped)
  faiss = faiss_module()
  if faiss is not None and len(emb):
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    files.write_bytes(index_dir / FAISS, faiss.serialize_index(index).tobytes())
  if skipped:
    logging.warning('Skipped %d unreadable images (listed in %s), e.g. %s: %s',
                    len(skipped), index_dir / SKIPPED, skipped[0]['path'], skipped[0]['error'])
  return {'complete': True, 'num_indexed': int(len(emb)), 'num_skipped': len(skipped),
          'faiss': faiss is not None and bool(len(emb))}


@dataclasses.dataclass
class Index:
  """A complete index: unit embeddings [M, D] and the key of each row."""
  directory: epath.Path
  manifest: dict
  embeddings: np.ndarray
  keys: list

  @classmethod
  def load(cls, index_dir) -> 'Index':
    d = epath.Path(index_dir)
    if not (d / MANIFEST).is_file():
      raise FileNotFoundError(f'--index={str(index_dir)!r} holds no {MANIFEST}; build it '
                              'first with `launch/index.py build --index=...`.')
    manifest = _read_json(d / MANIFEST)
    if not manifest.get('complete'):
      raise FileNotFoundError(f'--index={str(index_dir)!r} is not complete (a build was '
                              'interrupted); run the same build command again to finish it.')
    keys = _read_json(d / INDEXED)
    emb = _load(d / EMBEDDINGS)
    if not len(keys):
      raise ValueError(f'{index_dir} indexes no image: every file was unreadable '
                       f'(see {d / SKIPPED}).')
    return cls(d, manifest, emb, keys)

  def search(self, queries, k: int, *, backend: str = 'auto', mesh=None):
    """(scores [N, k], rows [N, k]) of the top-k images of each query embedding."""
    if backend not in ('auto', 'faiss', 'jax'):
      raise ConfigError(f"--search={backend!r}: use 'auto', 'faiss' or 'jax'.")
    k = min(int(k), len(self.keys))
    faiss = faiss_module() if backend != 'jax' else None
    if backend == 'faiss' and (faiss is None or not (self.directory / FAISS).is_file()):
      raise ConfigError('--search=faiss: faiss is not installed (pip install faiss-cpu) or '
                        'the index was built without it; rebuild, or use --search=jax.')
    q = search.as_embeddings(queries, 'query embeddings')
    if faiss is not None and (self.directory / FAISS).is_file():
      stored = np.frombuffer((self.directory / FAISS).read_bytes(), np.uint8)
      scores, rows = faiss.deserialize_index(stored).search(np.ascontiguousarray(q), k)
      return scores, rows
    return search.sharded_topk(q, self.embeddings, k, mesh=mesh)


def encoder_of(manifest: dict, *, workdir: str = '', step: int | None = None,
               export: str = '', batch_size: int | None = None):
  """The model that built an index (or the one given, checked to have its width)."""
  from cookie_jax.eval import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  saved = manifest['encoder']
  if export or ('export' in saved and not workdir):
    enc = encoder_lib.from_export(export or saved['export'],
                                  batch_size=batch_size or encoder_lib.DEFAULT_BATCH_SIZE)
  else:
    enc = encoder_lib.from_run(workdir or saved['workdir'],
                               step=step if step is not None else (
                                   None if workdir else saved['step']),
                               batch_size=batch_size)
  if enc.config.model.embed_dim != manifest['embed_dim']:
    raise ConfigError(f"The index holds {manifest['embed_dim']}-d embeddings but this model "
                      f'makes {enc.config.model.embed_dim}-d ones; query with the model that '
                      f"built it ({saved}).")
  if enc.source != saved:
    logging.warning('Querying an index built by %s with %s.', saved, enc.source)
  return enc


def query_index(index_dir, queries, *, k: int = 5, backend: str = 'auto', picture: str = '',
                workdir: str = '', step: int | None = None, export: str = '') -> list[dict]:
  """[{'query', 'results': [(key, score), ...]}] for each text query; with `picture`,
  also a PNG grid of the results."""
  queries = [q for q in (str(q).strip() for q in queries) if q]
  if not queries:
    raise ConfigError('No query: give texts after `query`, or --queries_file=FILE with one '
                      'per line.')
  index = Index.load(index_dir)
  enc = encoder_of(index.manifest, workdir=workdir, step=step, export=export)
  for q in queries:
    unknown = tok_lib.unknown_words(enc.tokenizer, q)
    if unknown:
      logging.warning('Query %r: the model\'s vocabulary does not know %s (tokenised into '
                      'characters or [UNK]), so its results follow the spelling, not the '
                      'meaning.', q, ', '.join(repr(w) for w in unknown))
  scores, rows = index.search(enc.encode_texts(queries), k, backend=backend, mesh=enc.mesh)
  out = [{'query': q, 'results': [(index.keys[int(r)], float(s)) for r, s in zip(rr, ss)]}
         for q, rr, ss in zip(queries, rows, scores)]
  if picture:
    draw_results(picture, index, out)
  return out


def picture_path(index_dir, queries, *, max_chars: int = 60) -> str:
  """Where `launch/index.py query` draws its grid by default: INDEX/query-<first query,
  slugified>[-and-N-more].png, so that queries do not overwrite each other's picture."""
  queries = [q for q in (str(q).strip() for q in queries) if q] or ['']
  words = re.findall(r'[a-z0-9]+', queries[0].lower())
  slug = '-'.join(words)[:max_chars].strip('-') or 'query'
  more = f'-and-{len(queries) - 1}-more' if len(queries) > 1 else ''
  return files.join(str(index_dir), f'query-{slug}{more}.png')


THUMBNAIL = 256  # pixels, the longer side of a result in the grid


def draw_results(path: str, index: Index, results: list[dict]) -> None:
  """A PNG grid: one row per query, its top-k images (thumbnails) with scores and keys."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from cookie_jax.eval import pictures  # pylint: disable=g-import-not-at-top
  source = Source(index.manifest['source'], [])

  def thumb(key):
    try:
      img = Image.fromarray(source.picture(key))
    except Exception as e:  # pylint: disable=broad-except  # moved or deleted since the build
      logging.warning('Cannot show %s (%s); drawn grey.', key, e)
      img = Image.new('RGB', (THUMBNAIL, THUMBNAIL), (128, 128, 128))
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    return pictures.to_uint8(np.asarray(img) / 255.0, 0.0, 1.0)

  rows = [pictures.SearchResult(r['query'], [(thumb(key), key, score)
                                             for key, score in r['results']])
          for r in results]
  pictures.draw_search(path, rows, title=f"{index.manifest['num_indexed']} images of "
                       f"{index.directory}")
