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


class Generated:
  """Mixin for a `tfds.core.GeneratorBasedBuilder` whose examples are generated."""

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
