"""What the builders that generate their data (no input, no download) say while building.

tfds prints 'Downloading and preparing dataset Unknown size (download: Unknown size, ...)'
and a progress bar per split and per shuffle; for a generated set none of that is true
or useful (the examples are made before any bar starts). One line before the build and
one after it, with its time, say what happens instead.
"""

import dataclasses
import time

from absl import logging
import tensorflow_datasets as tfds

from cookie_jax.data.tokenizer import train_wordpiece


class Generated:
  """Mixin for a `tfds.core.GeneratorBasedBuilder` whose examples are generated, with a
  WordPiece vocabulary trained on the training captions (`generate(cfg, split, count)`
  gives a split's rows, captions third; `_counts(cfg)` the train and eval sizes)."""

  # The release history the generated image and video sets share.
  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '1.1.0': 'Written as ArrayRecord, for random access by the training input; a '
               'deterministic WordPiece vocabulary (the same on every build). The '
               'examples are unchanged.',
      '1.2.0': 'Stored in index order (no tfds shuffle on write): example i is record i, '
               'so the twins of a scene or clip (2k, 2k+1) are adjacent records, which '
               'config.data.group_size=2 draws into one batch. The examples are '
               'unchanged.',
  }
  # tfds looks for a checksums file beside the code via `importlib_resources`, a package it
  # does not declare on Python >= 3.9; these builders download nothing, so skip the lookup.
  code_path = None

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: everything is generated
    cfg = self.builder_config
    train, evals = self._counts(cfg)
    data = {'train': self.generate(cfg, 'train', train),
            'val': self.generate(cfg, 'val', evals),
            'test': self.generate(cfg, 'test', evals)}
    self.info.metadata['vocab'] = train_wordpiece(
        (c for row in data['train'] for c in row[2]), cfg.vocab_size)
    return {split: self._generate_examples(rows) for split, rows in data.items()}

  def _log_download_bytes(self) -> None:
    self._build_start = time.perf_counter()
    logging.info('Generating %s/%s (nothing to download) in %s...', self.name,
                 self.builder_config.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info('Generated %s/%s in %.1f s; later runs reuse it.', self.name,
                 self.builder_config.name, time.perf_counter() - self._build_start)

  def _download_and_prepare(self, *args, **kwargs):
    tfds.display_progress_bar(False)
    try:
      return super()._download_and_prepare(*args, **kwargs)
    finally:
      tfds.display_progress_bar(True)


def sized_config(builder, default, name_of, **sizes):
  """The builder config of `builder` with these sizes (the others from `default`),
  named by `name_of(config)` so that each size set lives in its own folder.

  Registered with the class, so tfds treats it as a known config (no "custom data
  configuration" warning on every open) and `tfds.builder('<name>/<config>')` finds it
  in this process.
  """
  if all(getattr(default, k) == v for k, v in sizes.items()):
    return default
  sized = dataclasses.replace(default, **sizes)
  name = name_of(sized)
  configs = builder.builder_configs
  if name not in configs:
    configs[name] = dataclasses.replace(sized, name=name, description='custom sizes')
  return configs[name]
