"""`msrvtt`: MSR-VTT video-caption pairs from local files, in the standard retrieval splits.

`manual_dir` is the MSRVTT folder as CLIP4Clip, X-CLIP and most video-retrieval code lay
it out (the annotation files may also sit in the folder itself or in `annotation/`):

    <manual_dir>/msrvtt_data/MSRVTT_data.json         `videos` [{video_id, split, ...}] and
                                                       `sentences` [{video_id, caption, ...}]
    <manual_dir>/msrvtt_data/MSRVTT_JSFUSION_test.csv  the 1k-A test: key,vid_key,video_id,
                                                       sentence (1000 videos, 1 caption each)
    <manual_dir>/msrvtt_data/MSRVTT_train.9k.csv       video_id (optional, see below)
    <manual_dir>/msrvtt_data/MSRVTT_train.7k.csv       video_id (optional)
    <manual_dir>/videos/all/video0.mp4 ... video9999.mp4   (or videos/; .mp4 or .webm)

Splits written:
  train      the training videos of `train_list` with all their captions (20 each):
             '9k' = MSRVTT_train.9k.csv (9,000 videos: every video outside the 1k-A test),
             '7k' = MSRVTT_train.7k.csv (7,010: the official train + validate videos).
             Without the CSV, the same lists are derived from the JSON and the 1k-A CSV.
  val        the official validate videos (497), all captions.
  test       the 1k-A test (JSFusion): 1000 videos, each with its one caption from the CSV.
  test_full  the official test videos (2,990), all captions (20 each). With '9k' training
             1,990 of them were trained on: report test_full with train_list='7k'.

N frames per clip are sampled uniformly at build time (`frames.py`, PyAV), resized and
centre-cropped to `image_size`, and stored as JPEG frames (a tfds Video feature). Missing
and unreadable videos and empty captions are skipped, counted in the metadata
(`skipped`) and reported in one warning per kind with the first few paths.
"""

import concurrent.futures
import csv
import dataclasses
import json
import os
import pathlib
import re

from absl import logging
import tensorflow_datasets as tfds

from cookie_jax.data import tf_env  # pylint: disable=unused-import  # hides GPUs before any TF op
from cookie_jax.data.builders import frames as frames_lib

ANNOTATIONS = 'MSRVTT_data.json'
TEST_1K = 'MSRVTT_JSFUSION_test.csv'
TRAIN_LISTS = {'9k': 'MSRVTT_train.9k.csv', '7k': 'MSRVTT_train.7k.csv'}
ANNOTATION_DIRS = ('msrvtt_data', '', 'annotation', 'annotations')
VIDEO_DIRS = ('videos/all', 'videos', 'all', 'MSRVTT/videos/all')
VIDEO_EXTENSIONS = ('.mp4', '.webm', '.avi', '.mkv')
SKIP_REASONS = {'missing': 'missing video files', 'corrupt': 'unreadable videos',
                'empty_caption': 'empty captions', 'no_caption': 'videos without a caption'}
_EXAMPLES_KEPT = 5
_CHUNK = 64  # videos decoded at once while writing, to bound memory

INSTRUCTIONS = f"""\
Point config.data.manual_dir at the MSRVTT folder holding msrvtt_data/{ANNOTATIONS},
msrvtt_data/{TEST_1K} (and optionally {TRAIN_LISTS['9k']} / {TRAIN_LISTS['7k']}) and
videos/all/video<N>.mp4: the layout of CLIP4Clip's msrvtt_data.zip and MSRVTT videos.
"""



def _find(root: pathlib.Path, subdirs, name: str) -> pathlib.Path | None:
  for sub in subdirs:
    if (root / sub / name).is_file():
      return root / sub / name
  return None


def locate(manual_dir, train_list: str = '9k') -> dict:
  """{'annotations', 'test_1k', 'train_list' (or None), 'videos'}; a FileNotFoundError
  names what is missing and where it was looked for."""
  root = pathlib.Path(manual_dir).expanduser() if manual_dir else None
  if root is None or not root.is_dir():
    raise FileNotFoundError(f'config.data.manual_dir={str(manual_dir)!r}: folder not '
                            f'found.\n{INSTRUCTIONS}')
  found = {}
  for key, name in (('annotations', ANNOTATIONS), ('test_1k', TEST_1K)):
    found[key] = _find(root, ANNOTATION_DIRS, name)
    if found[key] is None:
      where = [str(root / d / name) for d in ANNOTATION_DIRS]
      raise FileNotFoundError(f'{name} not found in config.data.manual_dir; looked for '
                              f'{where}.\n{INSTRUCTIONS}')
  found['train_list'] = _find(root, ANNOTATION_DIRS, TRAIN_LISTS[train_list])
  videos = [root / d for d in VIDEO_DIRS if (root / d).is_dir()]
  if not videos:
    raise FileNotFoundError(f'No video folder in config.data.manual_dir={str(root)!r}; '
                            f'looked for {list(VIDEO_DIRS)}.\n{INSTRUCTIONS}')
  found['videos'] = videos[0]
  return found


def _read_csv(path: pathlib.Path, columns: tuple[str, ...]) -> list[dict]:
  with open(path, newline='', encoding='utf-8-sig') as f:
    rows = list(csv.DictReader(f))
  have = set(rows[0]) if rows else set()
  missing = [c for c in columns if c not in have]
  if missing:
    raise ValueError(f'{path}: expected the columns {list(columns)}, but {missing} are '
                     f'missing (it has {sorted(have)}).')
  return rows


def _numeric_id(video_id: str, fallback: int) -> int:
  digits = re.findall(r'\d+', video_id)
  return int(digits[-1]) if digits else fallback


def read_annotations(path: pathlib.Path):
  """({video_id: official split}, {video_id: [captions]}, [(reason, where)] skipped)."""
  data = json.loads(path.read_text(encoding='utf-8'))
  if not (isinstance(data, dict) and isinstance(data.get('videos'), list)
          and isinstance(data.get('sentences'), list)):
    raise ValueError(f"{path}: expected MSRVTT's format, an object with 'videos' and "
                     "'sentences' lists.")
  splits = {str(v['video_id']): str(v.get('split', 'train')) for v in data['videos']}
  captions, skipped = {vid: [] for vid in splits}, []
  sentences = sorted(data['sentences'], key=lambda s: (str(s.get('video_id')),
                                                       s.get('sen_id', 0)))
  for s in sentences:
    vid, caption = str(s.get('video_id')), ' '.join(str(s.get('caption', '')).split())
    if not caption:
      skipped.append(('empty_caption', f'{vid} (sen_id {s.get("sen_id")})'))
    elif vid in captions:
      captions[vid].append(caption)
  return splits, captions, skipped


def split_lists(files: dict, train_list: str):
  """{split: [(video_id, [captions])]} and the skipped (reason, where) pairs."""
  splits, captions, skipped = read_annotations(files['annotations'])
  test_rows = _read_csv(files['test_1k'], ('video_id', 'sentence'))
  test_1k = [(r['video_id'], ' '.join(r['sentence'].split())) for r in test_rows]
  if files['train_list'] is not None:
    train_ids = [r['video_id'] for r in _read_csv(files['train_list'], ('video_id',))]
  else:
    held_out = {vid for vid, _ in test_1k}
    train_ids = sorted((vid for vid, s in splits.items()
                        if (s in ('train', 'validate') if train_list == '7k'
                            else vid not in held_out)),
                       key=lambda v: _numeric_id(v, 0))
    logging.info('msrvtt: %s not found; train_list=%r derived from the annotations: %d '
             'videos.', TRAIN_LISTS[train_list], train_list, len(train_ids))
  by_split = lambda name: sorted((v for v, s in splits.items() if s == name),
                                 key=lambda v: _numeric_id(v, 0))
  out = {'train': [(v, captions.get(v, [])) for v in train_ids],
         'val': [(v, captions[v]) for v in by_split('validate')],
         'test': [(v, [c] if c else []) for v, c in test_1k],
         'test_full': [(v, captions[v]) for v in by_split('test')]}
  for name, rows in out.items():
    for vid, caps in rows:
      if not caps:
        skipped.append(('no_caption', f'{name}: {vid}'))
    out[name] = [(vid, caps) for vid, caps in rows if caps]
  return out, skipped


def video_path(videos_dir: pathlib.Path, video_id: str) -> pathlib.Path | None:
  for ext in VIDEO_EXTENSIONS:
    p = videos_dir / f'{video_id}{ext}'
    if p.is_file():
      return p
  return None


class SkipLog:
  """Counts and first examples of everything skipped, per kind; a file counts once."""

  def __init__(self):
    self.seen, self.counts, self.examples = set(), {}, {}

  def add(self, reason: str, where: str):
    if (reason, where) in self.seen:
      return
    self.seen.add((reason, where))
    self.counts[reason] = self.counts.get(reason, 0) + 1
    kept = self.examples.setdefault(reason, [])
    if len(kept) < _EXAMPLES_KEPT:
      kept.append(where)

  def warn(self, name: str, reasons=None):
    for reason in sorted(reasons or self.counts):
      if self.counts.get(reason):
        logging.warning('%s: skipped %d %s, e.g. %s', name, self.counts[reason],
                    SKIP_REASONS[reason], self.examples[reason])


@dataclasses.dataclass(eq=False)
class MsrvttConfig(tfds.core.BuilderConfig):
  train_list: str = '9k'
  frames: int = 12
  image_size: int = 224


DEFAULT = MsrvttConfig(name='9k_f12_px224', description='MSRVTT 9k train, 12 frames, 224 px.')


def msrvtt_config(train_list='9k', frames=12, image_size=224) -> MsrvttConfig:
  """The builder config for these settings, named by them so each has its own folder."""
  name = f'{train_list}_f{frames}_px{image_size}'
  configs = Msrvtt.builder_configs
  if name not in configs:
    configs[name] = MsrvttConfig(name=name, description='custom', train_list=train_list,
                                 frames=frames, image_size=image_size)
  return configs[name]


class Msrvtt(tfds.core.GeneratorBasedBuilder):
  """MSR-VTT: 10k web video clips with 20 captions each (train/val/1k-A test/full test)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'First release.',
                   '1.1.0': 'Written as ArrayRecord, for random access by the training input.'}
  BUILDER_CONFIGS = [DEFAULT]
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
  code_path = None  # see SyntheticShapes: no checksums lookup, nothing is downloaded

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        # image_id: N of 'videoN'.
        features=frames_lib.clip_features(cfg.frames, cfg.image_size, 'jpeg',
                                          video_id=tfds.features.Text()),
        # Filled while building: {'skipped': {kind: count}, 'skipped_examples': {...}}.
        metadata=tfds.core.MetadataDict(),
        homepage='https://www.microsoft.com/en-us/research/publication/msr-vtt-a-large-'
                 'video-description-dataset-for-bridging-video-and-language/',
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    # Not `dl_manager.manual_dir`: see KarpathyCaptions.
    files = locate(getattr(dl_manager, '_manual_dir', None), cfg.train_list)
    lists, skipped = split_lists(files, cfg.train_list)
    self._skips = SkipLog()
    for reason, where in skipped:
      self._skips.add(reason, where)
    rows = {}
    for name, split_rows in lists.items():
      rows[name] = []
      for vid, caps in split_rows:
        path = video_path(files['videos'], vid)
        if path is None:
          self._skips.add('missing', str(files['videos'] / f'{vid}.mp4'))
        else:
          rows[name].append((vid, str(path), caps))
    self._skips.warn('msrvtt', ('missing', 'empty_caption', 'no_caption'))
    self._sync_metadata()
    # tfds refuses empty splits; the warnings above say why one is empty.
    return {name: self._generate_examples(name, r) for name, r in rows.items() if r}

  def _sync_metadata(self):
    self.info.metadata['skipped'] = dict(self._skips.counts)
    self.info.metadata['skipped_examples'] = dict(self._skips.examples)

  def _generate_examples(self, split, rows):
    cfg = self.builder_config

    def load(row):
      try:
        return frames_lib.sample_frames(row[1], cfg.frames, cfg.image_size)
      except frames_lib.UnreadableVideo:
        return None

    corrupt_before = self._skips.counts.get('corrupt', 0)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        for (vid, path, caps), clip in zip(chunk, pool.map(load, chunk)):
          if clip is None:
            self._skips.add('corrupt', path)
            continue
          yield vid, {'frames': clip, 'captions': caps, 'video_id': vid,
                      'image_id': _numeric_id(vid, start)}
    self._sync_metadata()
    if self._skips.counts.get('corrupt', 0) > corrupt_before:
      self._skips.warn(f'msrvtt/{split}', ('corrupt',))
