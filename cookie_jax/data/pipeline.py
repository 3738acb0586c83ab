"""The input pipeline: random access on the host, global `jax.Array`s out.

Training (`TrainIterator`, in train_input.py) is an infinite stream whose global batch k
is a pure function of (config seed, k); nothing else, not the number of processes, not
what came before:

* every builder writes ArrayRecord files, which tfds reads by index (`as_data_source`);
* row r of global batch k is global position g = k * B + r. It reads record
  perm_e(g mod N) of epoch e = g div N, where perm_e is a keyed bijection of [0, N)
  drawn from (seed, e) (`order.permute`: a Feistel network, O(1) memory). That is a true
  global shuffle: no buffer, every record once per epoch, batches that span epochs;
* a weighted mixture (`config.data.mixture`) first sends g to one of its datasets, in
  exact proportions per block of 4096 positions, also as a function of (seed, g);
* the caption drawn for a record and the crops of its views are keyed on (seed, g);
* process p reads only its rows of each global batch (the contiguous block its devices
  hold) and `jax.make_array_from_process_local_data` assembles the global arrays;
* a record that fails to decode is replaced by the next record of the same epoch's
  permutation that decodes, and counted (`bad_records`, logged as train/bad_records):
  never a crash, never a smaller batch.

So resuming at step k means starting the stream at k: no record is read to get there,
at step 10 or at step 10^6, and a run saved on P hosts resumes on P' hosts with the same
global batches. The checkpoint stores only the step. We chose this over checkpointing an
iterator's state (tf.data's, or Grain's), which is tied to one process layout.

Per step, one call fetches the step's records by index; parsing the tf.Example,
decoding and augmenting each row run in tf.data's thread pool (in C++, off the GIL; on 2
cores this beat Grain worker processes, see docs/BENCHMARKS.md), and a batch's captions
are tokenised in one Rust call. Equal-sized images (the synthetic sets) are decoded, and
their captions tokenised, once at the start when they fit in `cache_mb`, and augmented a
whole batch at a time (also when streamed) with per-row random numbers, so every path
gives the same batches. Device prefetch (prefetch.py) runs on top.

Video datasets take the same path: a clip is `image` [T, H, W, 3] (batches [B, T, H, W, 3]),
with `config.data.num_frames` frames taken evenly from those stored, and one crop per
clip shared by its frames. Everything downstream (sharding on axis 0, losses, evaluation)
is the image path's.

Evaluation (`eval_data`) visits a split once in order; the last global batch is padded
and masked. Process p owns rows [p*b, (p+1)*b) of every global batch of size
B = b * process_count, and reads only those records, so the global arrays hold images
0..B-1, B..2B-1, ... in order.
"""

import math

import jax
import numpy as np

from cookie_jax import sharding
from cookie_jax.data import augment, sources
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.batching import autotune as _autotune
from cookie_jax.data.batching import load_tokenizer, local_batch, processes
from cookie_jax.data.tf_env import tf
from cookie_jax.data.train_input import TrainIterator

__all__ = ['EvalData', 'TrainIterator', 'eval_data', 'has_split', 'load_tokenizer',
           'tokenizer_vocab_size']


def tokenizer_vocab_size(data_cfg) -> int:
  return load_tokenizer(data_cfg).get_vocab_size()


def has_split(data_cfg, split: str) -> bool:
  """Whether the dataset of `data_cfg` has `split` ('val', 'test' or a tfds split)."""
  builder = sources.get_builder(data_cfg)
  return sources.has_split(builder, sources.resolve_split(data_cfg, split))


class EvalData:
  """One pass over a split: images and captions each exactly once, in order, masked."""

  def __init__(self, data_cfg, split: str, *, image_size: int, batch_size: int,
               mesh: jax.sharding.Mesh | None = None, process_index: int | None = None,
               process_count: int | None = None):
    self.cfg = data_cfg
    self.split = sources.resolve_split(data_cfg, split)
    self.image_size = image_size
    self.batch_size = batch_size
    self.mesh = mesh
    self.process_index, self.process_count = processes(process_index, process_count)
    self.local_batch_size = local_batch(batch_size, self.process_count, 'eval.batch_size')
    # This process's rows of each global batch, as the mesh places them.
    self.rows = sharding.local_rows(mesh, batch_size, self.process_index,
                                    self.process_count)
    self._owned = np.zeros(batch_size, bool)
    self._owned[self.rows] = True
    self._builder = sources.get_builder(data_cfg)
    self._keys = sources.feature_keys(data_cfg)
    self._shape, self._frames = sources.visual_shape(data_cfg, self._builder, self._keys)
    # What the visual side is, for naming metrics (image->text or video->text).
    self.visual = 'image' if self._frames is None else 'video'

    counts, captions, ids = [], [], []
    text = sources.read(self._builder, self.split, self._keys, with_image=False)
    for ex in text.as_numpy_iterator():
      caps = [c.decode('utf-8', errors='replace') for c in ex['captions']]
      counts.append(len(caps))
      captions.extend(caps)
      if 'image_id' in ex:
        ids.append(int(ex['image_id']))
    if not counts:
      raise ValueError(f'Split {self.split!r} of {self._builder.name} is empty.')
    self.num_images = len(counts)
    self.num_captions = len(captions)
    self.captions = captions
    self.caption_image_index = np.repeat(np.arange(self.num_images),
                                         counts).astype(np.int32)
    self.image_ids = np.asarray(ids, np.int64) if ids else None
    self._tokens = tok_lib.encode(load_tokenizer(data_cfg), captions)

  @property
  def tokens(self) -> dict[str, np.ndarray]:
    """{'input_ids', 'attention_mask'} of every caption row, as the text tower reads them."""
    return self._tokens

  @property
  def num_image_batches(self) -> int:
    return math.ceil(self.num_images / self.batch_size)

  @property
  def num_text_batches(self) -> int:
    return math.ceil(self.num_captions / self.batch_size)

  def _mine(self, index):
    """True where global row `index` belongs to this process."""
    return self._owned[index % self.batch_size]

  def _out(self, batch):
    return batch if self.mesh is None else sharding.to_global(self.mesh, batch)

  def image_batches(self, with_ids: bool = False):
    """{'image': float32 [b, s, s, 3] (clips: [b, T, s, s, 3]), 'mask': bool [b]} (+
    'image_id' if asked)."""
    cfg, size = self.cfg, self.image_size
    total = self.num_image_batches * self.batch_size
    pads = sum(1 for i in range(self.num_images, total) if self._mine(i))
    has_ids = with_ids and self.image_ids is not None

    def view(encoded):
      if self._frames is None:
        return augment.eval_view(encoded, size=size)
      return augment.eval_clip(tf.gather(encoded, self._frames), size=size)

    def decode(ex):
      out = {'image': augment.normalize(view(ex['image']), cfg.mean, cfg.std),
             'mask': tf.constant(True)}
      if has_ids:
        out['image_id'] = ex['image_id']
      return out

    pixels = [size, size, 3] if self._frames is None else [self._shape[0], size, size, 3]
    pad = {'image': tf.zeros(pixels, tf.float32), 'mask': tf.constant(False)}
    if has_ids:
      pad['image_id'] = tf.constant(-1, tf.int64)
    mine = [i for i in range(self.num_images) if self._mine(i)]
    ds = sources.read(self._builder, self.split, self._keys, indices=mine)
    ds = ds.map(decode, num_parallel_calls=_autotune(cfg.num_parallel_calls),
                deterministic=True)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(pads))
    ds = ds.batch(self.local_batch_size).prefetch(_autotune(cfg.prefetch or 1))
    for batch in ds.as_numpy_iterator():
      yield self._out(batch)

  def text_batches(self):
    """{'input_ids', 'attention_mask': int32 [b, L], 'mask': bool [b]}."""
    total = self.num_text_batches * self.batch_size
    rows = {k: np.zeros((total,) + v.shape[1:], v.dtype) for k, v in self._tokens.items()}
    for k, v in self._tokens.items():
      rows[k][:self.num_captions] = v
    rows['mask'] = np.arange(total) < self.num_captions
    for i in range(self.num_text_batches):
      mine = i * self.batch_size + self.rows
      yield self._out({k: v[mine] for k, v in rows.items()})


def eval_data(data_cfg, split: str, *, image_size: int, batch_size: int,
              mesh: jax.sharding.Mesh | None = None, process_index: int | None = None,
              process_count: int | None = None) -> EvalData:
  """The split `split` ('val', 'test', or any tfds split expression) for evaluation."""
  return EvalData(data_cfg, split, image_size=image_size, batch_size=batch_size, mesh=mesh,
                  process_index=process_index, process_count=process_count)
