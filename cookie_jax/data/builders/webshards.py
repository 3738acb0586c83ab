"""img2dataset shards to clean examples: listing, layout checks, reading, per-sample skips.

No TF and no tfds here, so the build's worker processes (and Beam workers) import it
cheaply; `img2dataset.py` wraps it in a tfds builder. Tars are read with the standard
library's `tarfile` in stream mode (one sequential pass, any readable file object,
including gs://), parquet with pyarrow, one row group at a time.

A webdataset sample is a run of consecutive tar members that share a key, the member's
name up to the first dot of its base name (`000000012.jpg`, `000000012.txt`, ...).
"""

import collections
import dataclasses
import hashlib
import json
import tarfile

from etils import epath

from cookie_jax.data.builders import upright
from cookie_jax.errors import ShardLayoutError

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
PARQUET_IMAGE_COLUMNS = ('jpg', 'png', 'webp')  # img2dataset's --encode_format names it
PARQUET_CAPTION_COLUMNS = ('caption', 'txt')  # the input column, or --save_caption's copy

SKIP_REASONS = {
    'corrupt_image': 'undecodable or truncated images',
    'no_caption': 'images without a caption',
    'empty_caption': 'empty captions',
    'bad_utf8': 'captions that are not valid UTF-8',
    'no_image': 'captions without an image (parquet: failed downloads)',
    'duplicate_key': 'samples with the key of an earlier kept sample',
    'truncated_shard': 'shards that end mid-way (the samples before the break are kept)',
}
_EXAMPLES_KEPT = 5  # example places per kind in the metadata and the warning

# img2dataset (default, without --disable_all_reencoding) decodes with OpenCV, which
# ignores EXIF, and re-encodes without it, but keeps the source's EXIF in its metadata:
# `exif`, a JSON string of exifread's tags (`.json` of a webdataset sample, parquet
# column), the orientation as exifread prints tag 0x0112 (exifread/tags/exif.py).
EXIFREAD_ORIENTATIONS = {
    'Horizontal (normal)': 1, 'Mirrored horizontal': 2, 'Rotated 180': 3,
    'Mirrored vertical': 4, 'Mirrored horizontal then rotated 90 CCW': 5,
    'Rotated 90 CW': 6, 'Mirrored horizontal then rotated 90 CW': 7, 'Rotated 90 CCW': 8}

LAYOUT = """\
config.data.manual_dir must be an img2dataset output folder, either
  --output_format webdataset: 00000.tar, 00001.tar, ... each holding {key}.jpg (or .png,
      .webp), {key}.txt (the caption, from --caption_col) and {key}.json per sample
      (img2dataset's .parquet/.json files beside the tars are metadata and are ignored);
  --output_format parquet: 00000.parquet, ... with an image column 'jpg' (bytes) and a
      caption column 'caption' (or 'txt'), plus 'key', 'url', ... as img2dataset writes.
"""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a worker needs to turn a shard into examples (picklable, for Beam too)."""
  max_side: int
  quality: int
  val_fraction: float = 0.0


def split_of(key: str, val_fraction: float) -> str:
  """'val' for a stable `val_fraction` of keys, else 'train'; any process, any order."""
  if val_fraction <= 0:
    return 'train'
  h = int.from_bytes(hashlib.sha256(key.encode('utf-8', 'surrogateescape')).digest()[:8],
                     'big')
  return 'val' if h < val_fraction * 2**64 else 'train'


class SkipLog:
  """Counts and, per kind, the places that come first in (shard, position) order, so
  the same skips give the same metadata however the work was split up."""

  def __init__(self):
    self.counts = collections.Counter()
    self.first = collections.defaultdict(list)  # reason -> sorted [(order, where)]

  def add(self, reason: str, order: tuple, where: str):
    self.counts[reason] += 1
    self._keep(reason, tuple(order), where)

  def _keep(self, reason, order, where):
    kept = self.first[reason]
    if len(kept) < _EXAMPLES_KEPT or order < kept[-1][0]:
      kept.append((order, where))
      kept.sort()
      del kept[_EXAMPLES_KEPT:]

  def merge(self, other: 'SkipLog') -> 'SkipLog':
    self.counts.update(other.counts)
    for reason, items in other.first.items():
      for order, where in items:
        self._keep(reason, order, where)
    return self

  def to_json(self) -> dict:
    return {'counts': dict(self.counts),
            'first': {r: [[list(o), w] for o, w in v] for r, v in self.first.items()}}

  @classmethod
  def from_json(cls, d: dict) -> 'SkipLog':
    log = cls()
    log.counts.update(d['counts'])
    for reason, items in d['first'].items():
      log.first[reason] = [(tuple(o), w) for o, w in items]
    return log

  def metadata(self) -> dict:
    return {'skipped': dict(sorted(self.counts.items())),
            'skipped_examples': {r: [w for _, w in self.first[r]] for r in sorted(self.first)}}


# -- the folder --


def list_shards(manual_dir) -> tuple[str, list[str]]:
  """('tar' | 'parquet', sorted shard paths), or an error naming the folder and layout."""
  if not manual_dir:
    raise FileNotFoundError(f"config.data.manual_dir='': builder='img2dataset' needs the "
                            f'folder that img2dataset wrote.\n{LAYOUT}')
  root = epath.Path(manual_dir)
  if not root.is_dir():
    raise FileNotFoundError(f'config.data.manual_dir={str(manual_dir)!r}: folder not '
                            f'found.\n{LAYOUT}')
  tars = sorted(str(p) for p in root.glob('*.tar'))
  if tars:
    return 'tar', tars
  parquets = sorted(str(p) for p in root.glob('*.parquet'))
  if parquets:
    return 'parquet', parquets
  names = sorted(p.name for p in root.iterdir())[:10]
  raise FileNotFoundError(f'config.data.manual_dir={str(manual_dir)!r} holds no *.tar or '
                          f'*.parquet shards (first entries: {names}).\n{LAYOUT}')


def parquet_columns(path: str) -> tuple[str, str, list[str]]:
  """(image column, caption column, all columns) of a shard, from its footer alone."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  # only for parquet
  with epath.Path(path).open('rb') as f:
    names = pq.ParquetFile(f).schema_arrow.names
  image = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
  caption = next((c for c in PARQUET_CAPTION_COLUMNS if c in names), None)
  if image is None or caption is None:
    missing = ('an image column ' + '/'.join(repr(c) for c in PARQUET_IMAGE_COLUMNS)
               if image is None else
               'a caption column ' + '/'.join(repr(c) for c in PARQUET_CAPTION_COLUMNS))
    raise ShardLayoutError(f'{path}: its columns {names} lack {missing}; it is not an '
                     f'img2dataset --output_format parquet shard (a webdataset output '
                     f"folder's .parquet files hold metadata only: are the .tar shards "
                     f'missing?).\n{LAYOUT}')
  return image, caption, names


def _no_captions(path: str) -> ShardLayoutError:
  return ShardLayoutError(f'{path}: the tar holds images but not one {{key}}.txt caption; run '
                    f'img2dataset with --caption_col (and --save_caption True).\n{LAYOUT}')


# -- reading: raw samples (key, position, image bytes | None, caption | None, meta) --


def _tar_samples(path: str):
  """Raw samples of a tar, and a final ('truncated', position) if it breaks off."""
  key, parts, pos, captions = None, {}, 0, 0
  try:
    with epath.Path(path).open('rb') as f, tarfile.open(fileobj=f, mode='r|') as tar:
      for member in tar:
        if not member.isfile():
          continue
        folder, _, base = member.name.rpartition('/')
        stem, _, ext = base.partition('.')
        name = f'{folder}/{stem}' if folder else stem
        if name != key:
          if key is not None:
            yield key, pos, parts
            pos += 1
          key, parts = name, {}
        ext = ext.lower()
        if ext in IMAGE_EXTS and 'image' not in parts:
          parts['image'] = tar.extractfile(member).read()
        elif ext in ('txt', 'json') and ext not in parts:
          parts[ext] = tar.extractfile(member).read()
          captions += ext == 'txt'
  except (tarfile.ReadError, EOFError):  # a network error (OSError) is not hidden
    if key is not None:
      yield key, pos, parts
    yield None, pos + 1, 'truncated'
    return
  if key is not None:
    yield key, pos, parts
    if not captions:
      raise _no_captions(path)


def _tar_raw(path, wanted):
  for key, pos, parts in _tar_samples(path):
    if key is None:
      yield None, pos, None, None, None
      continue
    if not wanted(key):
      continue
    meta = {}
    if 'json' in parts:
      try:
        meta = json.loads(parts['json'])
      except ValueError:
        meta = {}
    yield key, pos, parts.get('image'), parts.get('txt'), meta if isinstance(meta, dict) else {}


def _parquet_raw(path, wanted):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  # only for parquet
  image_col, caption_col, names = parquet_columns(path)
  extra = [c for c in ('key', 'url', 'original_width', 'original_height', 'exif')
           if c in names]
  stem = epath.Path(path).stem
  pos = 0
  with epath.Path(path).open('rb') as f:
    pf = pq.ParquetFile(f)
    for group in range(pf.num_row_groups):
      table = pf.read_row_group(group, columns=[caption_col] + extra)
      cols = table.to_pydict()
      keys = [str(k) if k is not None else None for k in cols.get('key', [None] * len(table))]
      keys = [k or f'{stem}_{pos + i:09d}' for i, k in enumerate(keys)]
      rows = [i for i, k in enumerate(keys) if wanted(k)]
      if not rows:
        pos += len(table)
        continue
      imgs = pf.read_row_group(group, columns=[image_col]).column(0).take(rows).to_pylist()
      for i, img in zip(rows, imgs):
        meta = {c: cols[c][i] for c in extra if c != 'key'}
        yield keys[i], pos + i, img, cols[caption_col][i], meta
      pos += len(table)


def raw_samples(kind: str, path: str, wanted=lambda key: True):
  """(key, position, image bytes | None, caption bytes/str | None, meta) per sample, with
  key None once for a tar that breaks off. `wanted(key)` filters before images are read."""
  return _tar_raw(path, wanted) if kind == 'tar' else _parquet_raw(path, wanted)


# -- cleaning --


def clean_caption(raw) -> tuple[str | None, str | None]:
  """(caption, None) or (None, skip reason)."""
  if raw is None:
    return None, 'no_caption'
  if isinstance(raw, bytes):
    try:
      raw = raw.decode('utf-8')
    except UnicodeDecodeError:
      return None, 'bad_utf8'
  text = ' '.join(str(raw).split())
  return (text, None) if text else (None, 'empty_caption')


def _size(meta, key, fallback) -> int:
  value = meta.get(key)
  return int(value) if isinstance(value, (int, float)) and value > 0 else fallback


def metadata_orientation(meta: dict) -> int:
  """The EXIF orientation (1-8) that img2dataset's metadata `exif` names; 1 where it
  names none (no `exif`, run with --extract_exif False, or unreadable)."""
  exif = meta.get('exif')
  if isinstance(exif, (str, bytes)):
    try:
      exif = json.loads(exif)
    except ValueError:
      return 1
  if not isinstance(exif, dict):
    return 1
  value = str(exif.get('Image Orientation', '')).strip()
  if value.isdigit():  # exifread prints a value outside its table as the number
    return int(value) if 1 <= int(value) <= 8 else 1
  return EXIFREAD_ORIENTATIONS.get(value, 1)


def shard_examples(shard_index: int, kind: str, path: str, settings: Settings, split: str):
  """The clean examples of one shard for `split`, and what was skipped.

  Returns ([(key, order, example)], SkipLog); order = (shard_index, position) decides
  which of two samples with one key is kept (the first) and which skips are listed.
  """
  skips, out = SkipLog(), []
  shard = epath.Path(path).name
  wanted = lambda key: split_of(key, settings.val_fraction) == split
  for key, pos, image, caption, meta in raw_samples(kind, path, wanted):
    order = (shard_index, pos)
    if key is None:
      skips.add('truncated_shard', order, f'{shard} after {pos} samples')
      continue
    where = f'{shard}:{key}'
    if not image:
      skips.add('no_image', order, where)
      continue
    text, reason = clean_caption(caption)
    if reason:
      skips.add(reason, order, where)
      continue
    try:
      up = upright.upright_jpeg(image, settings.max_side, settings.quality,
                                fallback_orientation=metadata_orientation(meta))
    except Exception:  # pylint: disable=broad-except  # any unreadable image is skipped
      skips.add('corrupt_image', order, where)
      continue
    # img2dataset measures the stored pixel grid (OpenCV, orientation ignored): upright,
    # its sides swap where the orientation turns by 90 degrees.
    size_keys = ('original_height', 'original_width')
    if up.orientation in upright.SWAPS_SIDES:
      size_keys = size_keys[::-1]
    out.append((key, order, {
        'image': up.jpeg, 'captions': [text], 'key': key, 'url': str(meta.get('url') or ''),
        'original_height': _size(meta, size_keys[0], up.height),
        'original_width': _size(meta, size_keys[1], up.width)}))
  return out, skips
