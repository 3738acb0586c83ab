"""Defaults of the `config.data` section. Pure Python: importing this never imports TF."""

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # 'synthetic' (embedded, generated), 'karpathy' (COCO/Flickr30K from local files) or
      # 'tfds' (any tfds dataset with an image and a text feature).
      builder='synthetic',
      # Where tfds datasets are written and read; '' = tfds' default (~/tensorflow_datasets).
      data_dir='',
      # Token length after truncation / padding.
      max_len=32,
  ))
