"""`karpathy_captions`: COCO or Flickr30K in the Karpathy split, read from local files.

`manual_dir` holds the Karpathy split file and the images:

    <manual_dir>/dataset_coco.json       and  train2014/, val2014/  (the JSON's `filepath`)
    <manual_dir>/dataset_flickr30k.json  and  flickr30k-images/ (or images/, or the root)

Every caption of an image is kept (COCO has 5-7). Real folders are never perfectly clean,
and one bad file must not cost a day's build, so corrupt, unreadable or missing images,
empty captions and captions that are not valid UTF-8 are skipped, counted in the
dataset's metadata (`skipped`) and reported in one warning per kind with the first few
paths. Grayscale, palette, CMYK, alpha and 16-bit images are converted to 8-bit RGB, and
images with an EXIF orientation are stored upright (TF's JPEG decoder ignores EXIF).
"""

import collections
import concurrent.futures
import dataclasses
import json
import os
import pathlib

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cookie_jax.data import tf_env  # pylint: disable=unused-import  # hides GPUs before any TF op
from cookie_jax.data.builders import upright

JSON_NAMES = {'coco': 'dataset_coco.json', 'flickr30k': 'dataset_flickr30k.json'}
IMAGE_DIRS = {'coco': (), 'flickr30k': ('flickr30k-images', 'images')}
SKIP_REASONS = {
    'missing': 'missing image files',
    'corrupt': 'corrupt or unreadable images',
    'no_caption': 'images without a usable caption',
    'empty_caption': 'empty captions',
    'bad_utf8': 'captions that are not valid UTF-8',
}
_EXAMPLES_KEPT = 5  # paths per kind in the warning and in the metadata
_CHUNK = 256  # images in flight at once while writing, to bound memory

INSTRUCTIONS = """\
Put the Karpathy split file and the images into one folder (config.data.manual_dir):
  COCO:      dataset_coco.json + train2014/ + val2014/ (as named by each image's filepath)
  Flickr30K: dataset_flickr30k.json + flickr30k-images/
The JSON files are in Karpathy's caption_datasets.zip
(cs.stanford.edu/people/karpathy/deepimagesent).
"""



def annotations_path(manual_dir, dataset: str) -> pathlib.Path:
  """The split file, or a FileNotFoundError naming the file and the folder expected."""
  if dataset not in JSON_NAMES:
    raise ValueError(f"config.data.karpathy_dataset={dataset!r}: use 'coco' or 'flickr30k'.")
  root = pathlib.Path(manual_dir).expanduser() if manual_dir else None
  if root is None or not root.is_dir():
    raise FileNotFoundError(
        f'config.data.manual_dir={str(manual_dir)!r}: folder not found. It must contain '
        f'{JSON_NAMES[dataset]} and the images.\n{INSTRUCTIONS}')
  path = root / JSON_NAMES[dataset]
  if not path.is_file():
    raise FileNotFoundError(
        f'{path} not found: the Karpathy split file {JSON_NAMES[dataset]} must be in '
        f'config.data.manual_dir={str(manual_dir)!r}.\n{INSTRUCTIONS}')
  return path


def inspect_image(path: str) -> str:
  """'jpeg' (usable as is), 'convert' (readable; not an upright 8-bit RGB JPEG),
  'missing', 'corrupt'."""
  if not os.path.isfile(path):
    return 'missing'
  try:
    with Image.open(path) as img:
      fmt, mode, turn = img.format, img.mode, upright.orientation(img)
      if fmt == 'JPEG':
        # DCT-domain downscaling: every byte is still entropy-decoded, so truncation and
        # corruption are still caught, at a fraction of the cost of a full decode.
        img.draft('RGB', (max(1, img.width // 8), max(1, img.height // 8)))
      img.load()
  except Exception:  # pylint: disable=broad-except  # any unreadable file is skipped
    return 'corrupt'
  return 'jpeg' if fmt == 'JPEG' and mode == 'RGB' and turn == 1 else 'convert'


def load_image(path: str, status: str) -> bytes:
  data = pathlib.Path(path).read_bytes()
  # EXIF rotation applied (TF's decoder ignores it), RGB, full size, JPEG quality 95.
  return data if status == 'jpeg' else upright.upright_jpeg(data, 0, 95)[0]


def clean_caption(sentence: dict) -> tuple[str | None, str | None]:
  """(caption, None) or (None, skip reason)."""
  if not isinstance(sentence, dict):
    return None, 'empty_caption'
  raw = sentence.get('raw')
  if raw is None:
    raw = ' '.join(sentence.get('tokens', []))
  raw = ' '.join(str(raw).split())
  if not raw:
    return None, 'empty_caption'
  try:
    raw.encode('utf-8')
  except UnicodeEncodeError:  # lone surrogates: undecodable bytes in the file
    return None, 'bad_utf8'
  return raw, None


def _image_root(root: pathlib.Path, dataset: str) -> pathlib.Path:
  for sub in IMAGE_DIRS[dataset]:
    if (root / sub).is_dir():
      return root / sub
  return root


class SkipLog:
  """Counts and first paths of everything skipped, per kind."""

  def __init__(self):
    self.counts = collections.Counter()
    self.examples = collections.defaultdict(list)

  def add(self, reason: str, where: str):
    self.counts[reason] += 1
    if len(self.examples[reason]) < _EXAMPLES_KEPT:
      self.examples[reason].append(where)

  def warn(self, name: str):
    for reason, n in sorted(self.counts.items()):
      logging.warning('%s: skipped %d %s, e.g. %s', name, n, SKIP_REASONS[reason],
                  self.examples[reason])


@dataclasses.dataclass(eq=False)
class KarpathyConfig(tfds.core.BuilderConfig):
  dataset: str = 'coco'


class KarpathyCaptions(tfds.core.GeneratorBasedBuilder):
  """COCO / Flickr30K image-caption pairs in Karpathy's train/val/test(/restval) split."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '1.1.0': 'Written as ArrayRecord, for random access by the training input. Images '
               'with an EXIF orientation other than 1 are stored upright (were stored as '
               'their pixels lie, e.g. sideways for orientation 6).',
  }
  BUILDER_CONFIGS = [KarpathyConfig(name='coco', dataset='coco'),
                     KarpathyConfig(name='flickr30k', dataset='flickr30k')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  code_path = None  # see SyntheticShapes: no checksums lookup, nothing is downloaded

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'captions': tfds.features.Sequence(tfds.features.Text()),
            'image_id': tfds.features.Scalar(dtype=np.int64),  # Karpathy `imgid`
            'filename': tfds.features.Text(),
        }),
        # Filled while building: {'skipped': {kind: count}, 'skipped_examples': {...}}.
        metadata=tfds.core.MetadataDict(),
        homepage='https://cs.stanford.edu/people/karpathy/deepimagesent/',
    )

  def _split_generators(self, dl_manager):
    dataset = self.builder_config.dataset
    # Not `dl_manager.manual_dir`: it fails with a generic message before we could name
    # the file and folder we expect.
    path = annotations_path(getattr(dl_manager, '_manual_dir', None), dataset)
    root = path.parent
    # Undecodable bytes become lone surrogates instead of failing the whole file; each
    # caption that holds one is then skipped on its own.
    data = json.loads(path.read_bytes().decode('utf-8', errors='surrogateescape'))
    if not isinstance(data, dict) or not isinstance(data.get('images'), list):
      raise ValueError(f"{path}: expected Karpathy's format, an object with an 'images' "
                       f'list; got {type(data).__name__}.')
    images_dir = _image_root(root, dataset)
    skips = SkipLog()
    rows = collections.defaultdict(list)
    for i, entry in enumerate(data['images']):
      if not isinstance(entry, dict):
        skips.add('no_caption', f'{path} (entry {i})')
        continue
      sub = entry.get('filepath', '') if dataset == 'coco' else ''
      file = str(images_dir / sub / entry.get('filename', ''))
      caps = []
      for j, sentence in enumerate(entry.get('sentences') or []):
        cap, reason = clean_caption(sentence)
        if reason:
          skips.add(reason, f'{file} (sentence {j})')
        else:
          caps.append(cap)
      if not caps:
        skips.add('no_caption', file)
        continue
      rows[entry.get('split', 'train')].append((int(entry.get('imgid', i)), file, caps))

    all_rows = [r for split_rows in rows.values() for r in split_rows]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      status = dict(zip([r[1] for r in all_rows],
                        pool.map(inspect_image, [r[1] for r in all_rows])))
    for _, file, _ in all_rows:
      if status[file] in ('missing', 'corrupt'):
        skips.add(status[file], file)
    self.info.metadata['skipped'] = dict(skips.counts)
    self.info.metadata['skipped_examples'] = dict(skips.examples)
    skips.warn(f'karpathy_captions/{dataset}')

    generators = {}
    for split, split_rows in sorted(rows.items()):
      good = [(r, status[r[1]]) for r in split_rows if status[r[1]] in ('jpeg', 'convert')]
      if good:  # tfds refuses empty splits; the warning above already says why
        generators[split] = self._generate_examples(good, root)
    return generators

  def _generate_examples(self, rows, root: pathlib.Path):
    def load(row):
      try:
        return load_image(row[0][1], row[1])
      except Exception:  # pylint: disable=broad-except  # changed since it was inspected
        return None

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        for ((image_id, file, caps), _), image in zip(chunk, pool.map(load, chunk)):
          if image is None:
            skipped = self.info.metadata['skipped']
            skipped['corrupt'] = skipped.get('corrupt', 0) + 1
            logging.warning('%s became unreadable while building; skipped.', file)
            continue
          yield f'{image_id}:{file}', {'image': image, 'captions': caps,
                                       'image_id': image_id,
                                       'filename': os.path.relpath(file, root)}
