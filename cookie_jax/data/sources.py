"""From `config.data` to a prepared tfds builder, and from a split to raw records.

Every builder writes ArrayRecord files, which tfds reads by index (`as_data_source`):
training reads any record at any position in O(1), and evaluation reads a split in
order through the same files. Records leave here with the image still encoded (`image`:
bytes) and all captions of the image (`captions`: 1-D strings), so the pipeline can
decode only what it uses (a JPEG crop window) and choose a caption per visit. For the
video builders `image` is a clip: its frames, each encoded ([T] strings).
"""

from absl import logging
import numpy as np

from cookie_jax import distributed
from cookie_jax.data.tf_env import tf  # pylint: disable=g-bad-import-order  # GPUs first
import tensorflow_datasets as tfds

from cookie_jax.config import ConfigError
from cookie_jax.data import defaults
from cookie_jax.data.builders import img2dataset, karpathy, msrvtt, synthetic, synthetic_video
from cookie_jax.data.builders import zeroshot_shapes
from cookie_jax.data.builders.frames import segment_centres

# The file format every builder here writes: random access, for the training order.
FILE_FORMAT = 'array_record'
# Records fetched per call when a split is read in order.
_CHUNK = 256


def _data_dir(data_cfg):
  return data_cfg.data_dir or None


def _needs_manual_dir(builder, data_cfg, what: str) -> None:
  """Raises where the dataset is not built and manual_dir names nothing to build from."""
  if not data_cfg.manual_dir:
    raise FileNotFoundError(
        f"config.data.manual_dir='': {builder.info.full_name} is not built in "
        f"config.data.data_dir={data_cfg.data_dir!r}, and building it needs {what}. Set "
        'config.data.manual_dir to build it (once, e.g. launch/build_data.py), or '
        'config.data.data_dir to where it is built.')


def _make(data_cfg):
  """(the builder `config.data` names, built or not; a function that builds it).

  A built copy opens from data_dir alone: manual_dir (the raw files) is read only to
  build it.
  """
  kind, data_dir = data_cfg.builder, _data_dir(data_cfg)
  if kind == 'synthetic':
    builder = synthetic.SyntheticShapes(
        data_dir=data_dir, config=synthetic.synthetic_config(**data_cfg.synthetic.to_dict()))
    return builder, lambda: builder.download_and_prepare(file_format=FILE_FORMAT)
  if kind == 'karpathy':
    if data_cfg.karpathy_dataset not in karpathy.JSON_NAMES:  # before tfds's own error
      raise ValueError(f'config.data.karpathy_dataset={data_cfg.karpathy_dataset!r}: use '
                       "'coco' or 'flickr30k'.")
    builder = karpathy.KarpathyCaptions(data_dir=data_dir, config=data_cfg.karpathy_dataset)

    def build_karpathy():
      _needs_manual_dir(builder, data_cfg, 'the folder with '
                        f'{karpathy.JSON_NAMES[data_cfg.karpathy_dataset]} and the images')
      # Checked here too, so that a missing folder is reported before tfds makes any.
      karpathy.annotations_path(data_cfg.manual_dir, data_cfg.karpathy_dataset)
      builder.download_and_prepare(
          file_format=FILE_FORMAT,
          download_config=tfds.download.DownloadConfig(manual_dir=data_cfg.manual_dir))
    return builder, build_karpathy
  if kind == 'synthetic_zeroshot':
    # Zero-shot classification of a synthetic run (cookie_jax/eval/zeroshot_run.py); its
    # images are drawn like the run's own (`synthetic.image_size`, `synthetic.seed`).
    builder = zeroshot_shapes.SyntheticZeroshot(
        data_dir=data_dir, config=zeroshot_shapes.zeroshot_config(
            image_size=data_cfg.synthetic.image_size, seed=data_cfg.synthetic.seed))
    return builder, lambda: builder.download_and_prepare(file_format=FILE_FORMAT)
  if kind == 'synthetic_video':
    builder = synthetic_video.SyntheticVideo(
        data_dir=data_dir,
        config=synthetic_video.synthetic_video_config(**data_cfg.synthetic_video.to_dict()))
    return builder, lambda: builder.download_and_prepare(file_format=FILE_FORMAT)
  if kind == 'msrvtt':
    m = data_cfg.msrvtt
    builder = msrvtt.Msrvtt(data_dir=data_dir, config=msrvtt.msrvtt_config(
        train_list=m.train_list, frames=m.frames, image_size=m.image_size))

    def build_msrvtt():
      _needs_manual_dir(builder, data_cfg, 'the MSRVTT folder (annotations and videos)')
      msrvtt.locate(data_cfg.manual_dir, m.train_list)  # named errors before tfds makes any
      builder.download_and_prepare(
          file_format=FILE_FORMAT,
          download_config=tfds.download.DownloadConfig(manual_dir=data_cfg.manual_dir))
    return builder, build_msrvtt
  if kind == 'img2dataset':
    builder = img2dataset.make_builder(data_cfg, data_dir)

    def build_img2dataset():
      _needs_manual_dir(builder, data_cfg, 'the folder of img2dataset shards')
      img2dataset.build(builder, data_cfg)
    return builder, build_img2dataset
  if kind == 'tfds':
    return _prepared_tfds(data_cfg), None
  raise ValueError(f"config.data.builder={kind!r}: use 'synthetic', 'karpathy', 'tfds', "
                   "'msrvtt', 'synthetic_video' or 'img2dataset'.")


def _prepared_tfds(data_cfg) -> tfds.core.DatasetBuilder:
  if not data_cfg.tfds_name:
    raise ValueError("config.data.tfds_name='': builder='tfds' needs the name of a "
                     "prepared tfds dataset, e.g. 'coco_captions'.")
  builder = tfds.builder(data_cfg.tfds_name, data_dir=_data_dir(data_cfg))
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'config.data.tfds_name={data_cfg.tfds_name!r} is not prepared in '
        f'{builder.data_dir}. Nothing is downloaded during training; prepare it first, '
        f'e.g. `tfds build {data_cfg.tfds_name} --data_dir=<config.data.data_dir>`.')
  return builder


def get_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The dataset builder, prepared: opened where built, else built once.

  In a run of several processes only process 0 builds; the others wait for it, then open
  what it wrote. A process whose data_dir does not hold that copy (a folder on each
  host, not shared) then builds its own.
  """
  builder, build = _make(data_cfg)
  if build is None or (builder.is_prepared() and not distributed.is_main_process()):
    return builder
  # Process 0 reports on every dataset, built before or now, so that no process waits
  # for a report that never comes.
  where = data_cfg.data_dir or 'the default data_dir'
  distributed.first_process_runs(f'build {builder.info.full_name} in {where}',
                                 lambda: builder.is_prepared() or build())
  if distributed.is_main_process():
    return builder
  builder, build = _make(data_cfg)  # a new look at data_dir, after process 0's build
  if not builder.is_prepared():
    logging.warning('%s: process 0 built it, but not in this host\'s %s (not a folder all '
                    "hosts share); building this host's own copy.",
                    builder.info.full_name, where)
    build()
  return builder


def build(data_cfg, beam_pipeline_options: str = '') -> tfds.core.DatasetBuilder:
  """Builds the dataset `config.data` names ahead of training, where not built yet.

  `beam_pipeline_options` ('runner=DataflowRunner,project=...,...', as tfds' own
  `--beam_pipeline_options`) builds an img2dataset folder on Apache Beam instead of in
  local processes.
  """
  if not beam_pipeline_options:
    return get_builder(data_cfg)
  if data_cfg.builder != 'img2dataset':
    raise ConfigError(f'config.data.builder={data_cfg.builder!r}: only img2dataset folders '
                     'are built on Beam; drop --beam_pipeline_options to build it here.')
  try:
    defaults.validate_img2dataset(data_cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError('--beam_pipeline_options needs apache-beam: pip install -e ".[beam]" '
                      '(see docs/data.md, "img2dataset shards").') from None
  options = pipeline_options.PipelineOptions(
      [f'--{o}' for o in beam_pipeline_options.split(',') if o])
  return img2dataset.prepare(data_cfg, _data_dir(data_cfg), options)


def feature_keys(data_cfg) -> tuple[str, str]:
  if data_cfg.builder == 'tfds':
    return data_cfg.tfds_image_key, data_cfg.tfds_text_key
  if data_cfg.builder in ('msrvtt', 'synthetic_video'):
    return 'frames', 'captions'
  return 'image', 'captions'


def resolve_split(data_cfg, split: str) -> str:
  """'train' / 'val' / 'test' name the configured splits; anything else is a tfds split."""
  if split in ('train', 'val', 'test'):
    return data_cfg[f'{split}_split']
  return split


def num_examples(builder, split) -> int:
  return builder.info.splits[split].num_examples


def has_split(builder, split: str) -> bool:
  """Whether the split expression `split` names splits that `builder` has."""
  try:
    builder.info.splits[split]  # pylint: disable=pointless-statement
  except (KeyError, ValueError):
    return False
  return True


def _get(tree, path):
  for part in path.split('/'):
    tree = tree[part]
  return tree


def _nest(path, value):
  for part in reversed(path.split('/')):
    value = {part: value}
  return value


def check_keys(builder, keys: tuple[str, str]) -> None:
  """ValueError naming the config key when a feature is absent or not an image."""
  image_key, text_key = keys
  for key, what in ((image_key, 'tfds_image_key'), (text_key, 'tfds_text_key')):
    try:
      _get(builder.info.features, key)
    except (KeyError, TypeError, AttributeError):
      names = sorted(builder.info.features.keys())
      raise ValueError(f'config.data.{what}={key!r}: {builder.name} has no such feature; '
                       f"top-level features: {names} ('/' selects a nested one).") from None
  feature = _get(builder.info.features, image_key)
  if not isinstance(feature, (tfds.features.Image, tfds.features.Video)):
    raise ValueError(f'config.data.tfds_image_key={image_key!r}: not an Image or Video '
                     f'feature in {builder.name}; choose the encoded image feature.')


def image_shape(builder, keys: tuple[str, str]) -> tuple:
  """The stored image shape, [T, H, W, 3] for clips; None marks a size that varies."""
  return tuple(_get(builder.info.features, keys[0]).shape)


def is_video(builder, keys: tuple[str, str]) -> bool:
  return isinstance(_get(builder.info.features, keys[0]), tfds.features.Video)


def visual_shape(data_cfg, builder, keys):
  """(stored shape with the clip's frames cut to those fed, frame indices or None)."""
  shape = image_shape(builder, keys)
  if not is_video(builder, keys):
    return shape, None
  stored, wanted = shape[0], data_cfg.num_frames or shape[0]
  if None in shape:
    raise ValueError(f'{builder.name} stores clips of varying shape {shape}; the video '
                     'pipeline needs a fixed number and size of frames.')
  if wanted > stored:
    raise ValueError(f'config.data.num_frames={wanted}: {builder.name} stores {stored} '
                     f'frames per clip; use at most {stored} (0 = all).')
  return (wanted,) + shape[1:], tf.constant(segment_centres(stored, wanted), tf.int32)


def data_source(builder, split: str):
  """Random access to the serialized records of `split`: `len()`, `__getitems__`."""
  try:
    return builder.as_data_source(
        split, file_format=FILE_FORMAT,
        deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  except (NotImplementedError, ValueError) as e:
    if 'file format' not in str(e).lower():
      raise
    raise ValueError(
        f'{builder.name} in {builder.data_dir} is stored as '
        f'{builder.info.file_format.value}; training reads ArrayRecord (random access). '
        'Convert it once with `tfds '
        f'convert_format --dataset_version_dir={builder.data_dir} '
        '--out_file_format=array_record`, or rebuild it with '
        "`tfds build ... --file_format=array_record`.") from None


def fetch(source, indices) -> np.ndarray:
  """The serialized records at `indices` (object array of bytes, one per index)."""
  out = np.empty(len(indices), object)
  out[:] = source.__getitems__([int(i) for i in indices])
  return out


def _decoder(builder, decoders=None):
  """A TF function: one serialized record -> the example's features (`decoders` apply)."""
  features = builder.info.features
  example_parser = tfds.core.example_parser.ExampleParser(features.get_serialized_info())
  return lambda serialized: features.decode_example(example_parser.parse_example(serialized),
                                                    decoders=decoders)


def parser(builder, keys: tuple[str, str], extra=()):
  """A TF function: one serialized record -> {'image', 'captions', + `extra`}."""
  image_key, text_key = keys
  check_keys(builder, keys)
  decode = _decoder(builder, _nest(image_key, tfds.decode.SkipDecoding()))
  present = [k for k in extra if k in builder.info.features]

  def parse(serialized):
    ex = decode(serialized)
    out = {'image': _get(ex, image_key), 'captions': tf.reshape(_get(ex, text_key), [-1])}
    out.update({k: ex[k] for k in present})
    return out

  return parse


def _records(source, indices) -> tf.data.Dataset:
  """The serialized records of `source` at `indices`, in their order."""
  def serialized(chunk):
    return tf.numpy_function(lambda i: fetch(source, i), [chunk], tf.string,
                             stateful=False)
  ds = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
  return ds.batch(_CHUNK).map(serialized).unbatch()


def read(builder, split: str, keys: tuple[str, str], *, with_image: bool = True,
         extra=('image_id',), indices=None) -> tf.data.Dataset:
  """{'image': encoded bytes, 'captions': [n] strings, + `extra` features present}, in
  record order, or for `indices` only (in their order)."""
  source = data_source(builder, split)
  parse = parser(builder, keys, extra)
  indices = np.arange(len(source)) if indices is None else indices

  def select(record):
    ex = parse(record)
    if not with_image:
      del ex['image']
    return ex

  return _records(source, indices).map(select, num_parallel_calls=tf.data.AUTOTUNE,
                                       deterministic=True)


def read_examples(builder, split: str, *, decoders=None, start: int = 0,
                  stop: int | None = None) -> tf.data.Dataset:
  """Examples start..stop-1 of `split` of any prepared tfds dataset, ours (ArrayRecord)
  or another one's (TFRecord, read with `as_dataset`), in record order."""
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    source = data_source(builder, split)
    stop = len(source) if stop is None else min(stop, len(source))
    return _records(source, np.arange(start, stop)).map(
        _decoder(builder, decoders), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
  if start or stop is not None:
    split = f'{split}[{start}:{"" if stop is None else stop}]'
  return builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(shuffle_seed=None,
                                                        try_autocache=False),
                            decoders=decoders)
