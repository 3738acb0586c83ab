"""The photo path of the training input written with Grain worker processes instead of
tf.data threads, for benchmarks/input_pipeline.py to measure which is faster per core.

The same order (order.py), the same records (tfds ArrayRecord data source), the same
caption draw; per row in a worker process: parse the tf.Example (tfds, numpy), decode
with PIL (`draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop is large),
random resized crop + flip, normalise; per batch: tokenise. Photos only (no cache, no
video): it is a peer for `photo224`, not a second pipeline.
"""

import io
import math

from absl import flags
import grain
import numpy as np
from PIL import Image

from cookie_jax.data import batching, order, sources
from cookie_jax.data import tokenizer as tok_lib


class _Row:
  """Position g -> {'image': float32 [s, s, 3], 'caption': str}."""

  def __init__(self, data_cfg, seed, size):
    builder = sources.get_builder(data_cfg)
    self.source = sources.data_source(builder, sources.resolve_split(data_cfg, 'train'))
    self.features = builder.info.features
    self.keys = sources.feature_keys(data_cfg)
    self.seed, self.size, self.cfg = seed, size, data_cfg.to_dict()
    self.n = len(self.source)

  def __call__(self, g):
    g = np.array([g], np.int64)
    record = int(order.record(self.seed, 0, g, self.n)[0])
    if not hasattr(self, '_decoders'):  # made in the worker: tfds decoders do not pickle
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._decoders = {self.keys[0]: tfds.decode.SkipDecoding()}
    ex = self.features.deserialize_example_np(self.source[record], decoders=self._decoders)
    captions = list(ex['captions']) or [b'']
    u = order.uniforms(self.seed, g, 0, 1)[0, 0]
    caption = captions[min(int(math.floor(u * len(captions))), len(captions) - 1)]
    return {'image': self._view(ex['image'], order.uniforms(self.seed, g, 1, 5)[0]),
            'caption': caption.decode('utf-8', 'replace')
                       if isinstance(caption, bytes) else caption}

  def _view(self, encoded, u):
    cfg = self.cfg
    image = Image.open(io.BytesIO(encoded))
    w, h = image.size
    area = w * h * (cfg['crop_scale'][0] + (cfg['crop_scale'][1] - cfg['crop_scale'][0]) * u[0])
    lo, hi = math.log(cfg['crop_ratio'][0]), math.log(cfg['crop_ratio'][1])
    ratio = math.exp(lo + (hi - lo) * u[1])
    cw, ch = min(w, round(math.sqrt(area * ratio))), min(h, round(math.sqrt(area / ratio)))
    left, top = int(u[2] * (w - cw)), int(u[3] * (h - ch))
    scale = min(cw, ch) / self.size
    if scale >= 2:  # decode at 1/2, 1/4 or 1/8 of the size: most of the JPEG work saved
      image.draft('RGB', (math.ceil(w / scale * 1.01), math.ceil(h / scale * 1.01)))
      f = image.size[0] / w
      left, top, cw, ch = left * f, top * f, cw * f, ch * f
    image = image.convert('RGB').resize((self.size, self.size), Image.Resampling.BILINEAR,
                                        box=(left, top, left + cw, top + ch))
    pixels = np.asarray(image, np.float32)
    if cfg['flip'] and u[4] < 0.5:
      pixels = pixels[:, ::-1]
    return (pixels / 255.0 - np.asarray(cfg['mean'], np.float32)) / np.asarray(
        cfg['std'], np.float32)


class _Tokenize:

  def __init__(self, data_cfg):
    self.tokenizer = batching.load_tokenizer(data_cfg)

  def __call__(self, batch):
    out = tok_lib.encode(self.tokenizer, list(batch.pop('caption')))
    return {**batch, **out}


class GrainIterator:
  """Batches of the photo path from Grain: `workers` processes (0 = in this process)."""

  def __init__(self, data_cfg, *, image_size, global_batch_size, seed, mesh=None,
               second_view=False, start_step=0, workers=2):
    del mesh
    if second_view:
      raise ValueError('The Grain peer builds one view only.')
    row = _Row(data_cfg, seed, image_size)
    ds = grain.MapDataset.range(start_step * global_batch_size, 2**40).map(row)
    ds = ds.batch(global_batch_size).map(_Tokenize(data_cfg)).to_iter_dataset()
    if workers:
      if not flags.FLAGS.is_parsed():  # Grain reads absl flags in its workers
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    self._iterator = iter(ds)

  def __next__(self):
    return next(self._iterator)
