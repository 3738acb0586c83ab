"""`img2dataset`: an img2dataset output folder (webdataset tars or parquet) as a tfds
dataset in ArrayRecord, built locally over a pool of processes or on Apache Beam.

Each sample becomes one example: the image made upright (EXIF, or where img2dataset
re-encoded it without EXIF, the orientation its metadata kept), RGB and at most
`max_side` on its longer side, as JPEG; its caption; its key, URL and original size.
Bad samples are skipped and counted in the dataset's metadata, with the first places
(`shard:key`) of each kind (see `webshards.SKIP_REASONS`); a key that an earlier sample
(in shard, then position order) already has is a duplicate and is skipped.

img2dataset output has no splits: everything is 'train', unless `val_fraction` > 0 puts
that fraction of keys, chosen by a hash of the key (so the same on every build, in any
order, on any runner), into 'val'.

Every setting that changes the stored examples is part of the builder config's name, so
changing one builds a new copy beside the old, never over it.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from cookie_jax.data import tf_env  # pylint: disable=unused-import  # hides GPUs before any TF op
from cookie_jax.data.builders import webshards


@dataclasses.dataclass(eq=False)
class Img2datasetConfig(tfds.core.BuilderConfig):
  max_side: int = 384  # longer side of the stored images at most; 0 = as they are
  quality: int = 95  # JPEG quality of re-encoded images
  val_fraction: float = 0.0  # keys hashed into a 'val' split; 0 = 'train' only


DEFAULT = Img2datasetConfig(name='default', description='max_side 384, quality 95')


def corpus_name(manual_dir: str) -> str:
  """A name for the folder: its base name and a hash of its whole (absolute) path."""
  path = str(manual_dir).rstrip('/')
  if '://' not in path:
    path = os.path.abspath(os.path.expanduser(path))
  base = re.sub(r'[^a-z0-9]+', '_', os.path.basename(path).lower()).strip('_') or 'data'
  return f'{base}_{hashlib.sha256(path.encode()).hexdigest()[:8]}'


def img2dataset_config(corpus: str, max_side=384, quality=95,
                       val_fraction=0.0) -> Img2datasetConfig:
  """The builder config for a corpus and settings, named by them: its own folder."""
  corpus = re.sub(r'[^A-Za-z0-9_]+', '_', corpus)
  name = f'{corpus}_side{max_side}_q{quality}'
  if val_fraction:
    name += f'_val{val_fraction:g}'.replace('.', 'p')
  configs = Img2dataset.builder_configs
  if name not in configs:  # registered, so tfds.builder('img2dataset/<name>') finds it
    configs[name] = Img2datasetConfig(name=name, max_side=max_side, quality=quality,
                                      val_fraction=val_fraction,
                                      description=f'{corpus}: img2dataset shards')
  return configs[name]


def _skip_file(data_dir, split) -> str:
  return os.fspath(data_dir / f'skipped-{split}.json')


class Img2dataset(tfds.core.GeneratorBasedBuilder):
  """Image-caption pairs from img2dataset shards."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '1.1.0': "Images that img2dataset re-encoded without EXIF are turned upright by the "
               "orientation in its metadata ('exif'), their original sizes swapped to match.",
  }
  BUILDER_CONFIGS = [DEFAULT]
  MANUAL_DOWNLOAD_INSTRUCTIONS = webshards.LAYOUT
  code_path = None  # see SyntheticShapes: no checksums lookup, nothing is downloaded
  # Worker processes of a local build (0 = one per core); not part of the config, since
  # it never changes what is stored.
  workers = 0

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'captions': tfds.features.Sequence(tfds.features.Text()),  # one per image
            'key': tfds.features.Text(),  # img2dataset's key, unique in the dataset
            'url': tfds.features.Text(),  # '' where the shard does not say
            # Upright, of the image img2dataset downloaded (its metadata), else of the
            # image in the shard; before this builder's resize.
            'original_height': tfds.features.Scalar(dtype=np.int32),
            'original_width': tfds.features.Scalar(dtype=np.int32),
        }),
        # Filled while building: {'skipped': {kind: count}, 'skipped_examples':
        # {kind: ['shard:key', ...]}, 'source': {'format', 'shards'}}.
        metadata=tfds.core.MetadataDict(),
        homepage='https://github.com/rom1504/img2dataset',
    )

  def _download_and_prepare(self, dl_manager, download_config):
    self._beam = bool(download_config.beam_runner or download_config.beam_options)
    self._skips = webshards.SkipLog()
    super()._download_and_prepare(dl_manager, download_config)
    if self._beam:  # each split's pipeline left its skips in a file; merge them
      for split in self.info.splits:
        path = epath.Path(_skip_file(self.data_path, split))
        self._skips.merge(webshards.SkipLog.from_json(json.loads(path.read_text())))
        path.unlink()
    self.info.metadata.update(self._skips.metadata())
    for reason, n in sorted(self._skips.counts.items()):
      logging.warning('%s: skipped %d %s, e.g. %s', self.name, n,
                  webshards.SKIP_REASONS[reason], self.info.metadata['skipped_examples'][reason])

  def _split_generators(self, dl_manager):
    # Not `dl_manager.manual_dir`: it fails with a generic message.
    kind, shards = webshards.list_shards(getattr(dl_manager, '_manual_dir', None))
    if kind == 'parquet':
      for path in shards:  # footers only: every bad file is named before any work
        webshards.parquet_columns(path)
    self.info.metadata['source'] = {'format': kind, 'shards': len(shards)}
    cfg = self.builder_config
    settings = webshards.Settings(cfg.max_side, cfg.quality, cfg.val_fraction)
    splits = ['train'] + (['val'] if cfg.val_fraction > 0 else [])
    make = self._beam_examples if self._beam else self._generate_examples
    return {split: make(kind, shards, settings, split) for split in splits}

  def _generate_examples(self, kind, shards, settings, split):
    """Shards in parallel processes; examples leave in shard order, first key wins."""
    workers = min(self.workers or os.cpu_count() or 1, len(shards))
    seen = set()
    for examples, skips in _map_shards(kind, shards, settings, split, workers):
      self._skips.merge(skips)
      for key, order, example in examples:
        if key in seen:
          self._skips.add('duplicate_key', order, f'{example_shard(shards, order)}:{key}')
          continue
        seen.add(key)
        yield key, example

  def _beam_examples(self, kind, shards, settings, split):
    """The same examples and skips as `_generate_examples`, as a Beam transform."""
    beam = tfds.core.lazy_imports.apache_beam
    skip_path = _skip_file(self.data_path, split)

    def read(item):
      examples, skips = webshards.shard_examples(item[0], kind, item[1], settings, split)
      for key, order, example in examples:
        yield key, (order, example)
      yield beam.pvalue.TaggedOutput('skips', skips)

    def first(item):
      key, found = item
      found = sorted(found, key=lambda f: f[0])
      yield key, found[0][1]
      for order, _ in found[1:]:
        skips = webshards.SkipLog()
        skips.add('duplicate_key', order, f'{example_shard(shards, order)}:{key}')
        yield beam.pvalue.TaggedOutput('skips', skips)

    @beam.ptransform_fn
    def examples(root):
      read_out = (root | 'shards' >> beam.Create(list(enumerate(shards)))
                  | 'spread' >> beam.Reshuffle()
                  | 'read' >> beam.FlatMap(read).with_outputs('skips', main='examples'))
      kept = (read_out.examples | 'by_key' >> beam.GroupByKey()
              | 'first' >> beam.FlatMap(first).with_outputs('skips', main='examples'))
      _ = ((read_out.skips, kept.skips) | 'all_skips' >> beam.Flatten()
           | 'merge' >> beam.CombineGlobally(_merge_skips)
           | 'json' >> beam.Map(lambda s: json.dumps(s.to_json()))
           | 'write' >> beam.io.WriteToText(skip_path, num_shards=1, shard_name_template=''))
      return kept.examples

    return examples()  # pylint: disable=no-value-for-parameter


def example_shard(shards, order) -> str:
  return os.path.basename(shards[order[0]])


def _merge_skips(logs) -> webshards.SkipLog:
  out = webshards.SkipLog()
  for one in logs:
    out.merge(one)
  return out


def _map_shards(kind, shards, settings, split, workers):
  """(examples, skips) per shard, in shard order; at most 2 x workers shards in flight.

  Processes, not threads: decoding and resizing hold the GIL for part of their time.
  They are spawned, not forked: the parent may run TF and JAX threads.
  """
  jobs = [(i, kind, path, settings, split) for i, path in enumerate(shards)]
  if workers <= 1:
    for job in jobs:
      yield webshards.shard_examples(*job)
    return
  ctx = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    pending = [pool.submit(webshards.shard_examples, *job) for job in jobs[:2 * workers]]
    for nxt in range(2 * workers, len(jobs) + 2 * workers):
      done = pending.pop(0)
      if nxt < len(jobs):
        pending.append(pool.submit(webshards.shard_examples, *jobs[nxt]))
      yield done.result()


def make_builder(data_cfg, data_dir=None) -> Img2dataset:
  """The builder for `config.data`, built or not: named by img2dataset.name (or else by
  manual_dir) and the settings, so a built copy opens without its shards."""
  w = data_cfg.img2dataset
  cfg = img2dataset_config(w.name or corpus_name(data_cfg.manual_dir), w.max_side,
                           w.quality, w.val_fraction)
  builder = Img2dataset(data_dir=data_dir, config=cfg)
  builder.workers = w.workers
  return builder


def build(builder: Img2dataset, data_cfg, beam_options=None) -> None:
  """Builds it from the shards in manual_dir (on Beam where `beam_options`, a
  `PipelineOptions`, is given; else locally)."""
  webshards.list_shards(data_cfg.manual_dir)  # named errors before tfds makes any folder
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=data_cfg.manual_dir, beam_options=beam_options))


def prepare(data_cfg, data_dir=None, beam_options=None) -> Img2dataset:
  """The builder for `config.data`, built first where it is not yet."""
  builder = make_builder(data_cfg, data_dir)
  if not builder.is_prepared():
    build(builder, data_cfg, beam_options)
  return builder
