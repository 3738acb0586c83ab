"""Retrieval evaluation: encode each side once (sharded), then Recall@K / RSUM.

The protocol is the standard one of VSE++ / CLIP / COOKIE:

* image -> text: an image has K >= 1 ground-truth captions (K may vary); its rank is the
  best rank among them. text -> image: a caption's rank is that of its one image.
* R@K is the percentage of queries ranked <= K; RSUM is the sum of the six recalls;
  ranks are 1-based; medr is the floor of the median rank (VSE++'s convention) and meanr
  the mean rank.
* Ties are pessimistic: a negative scoring exactly as high as the best ground truth is
  ranked before it (see cookie_jax/eval/search.py).
* Layouts: 'full' ranks against the whole split (COCO 5K, Flickr30K 1K, MSRVTT's full
  2,990-video test with 20 captions each); 'coco1k' averages every metric over 5 folds of
  consecutive images with their captions (COCO 1K, folds of 1000 when the split has
  COCO's 5000 test images); 'msrvtt1k' is MSRVTT's 1k-A (JSFusion) test: 1000 videos with
  exactly one caption each, ranked against all, and is refused on a split that is not
  one caption per video.
* Videos are the visual side like images (one embedding per clip); their metrics are
  named `v2t_*` / `t2v_*` (video->text, text->video) instead of `i2t_*` / `t2i_*`.

Unimodal tasks as in the COOKIE paper: text matching (text -> text, the other captions of
the same image are the positives) and image retrieval (image -> image, images sharing a
label are positives); the query itself is excluded from the gallery.

Ranks are exact and computed block by block over a gallery sharded across the mesh
(`search.positive_ranks`), so no device ever holds the full queries x gallery matrix.
"""

import functools
from typing import Any, Iterable, Mapping, NamedTuple

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from cookie_jax import sharding
from cookie_jax.data.defaults import clip_frames, eval_data_config
from cookie_jax.eval import search
from cookie_jax.models import abstract_model


RECALL_KS = (1, 5, 10)
LAYOUTS = ('full', 'coco1k', 'msrvtt1k')
COCO1K_FOLDS = 5
MSRVTT1K_VIDEOS = 1000
# Metric-name prefixes per kind of visual side: (visual->text, text->visual).
DIRECTIONS = {'image': ('i2t', 't2i'), 'video': ('v2t', 't2v')}


def name_metrics(metrics: dict, visual: str) -> dict:
  """`metrics` (or a Recall@K curve) with i2t/t2i renamed for `visual` ('image' or
  'video'): v2t_r1, t2v_medr, ..."""
  if visual not in DIRECTIONS:
    raise ValueError(f'visual={visual!r}: use one of {list(DIRECTIONS)}.')
  to_v, from_v = DIRECTIONS[visual]
  rename = {'i2t': to_v, 't2i': from_v}
  out = {}
  for key, value in metrics.items():
    head, sep, tail = key.partition('_')
    out[rename.get(head, head) + sep + tail] = value
  return out


def check_msrvtt1k(num_videos: int, caption_image_index) -> None:
  """Raises unless every video has exactly one caption (the 1k-A layout)."""
  counts = np.bincount(np.asarray(caption_image_index), minlength=num_videos)
  if np.any(counts != 1):
    bad = np.flatnonzero(counts != 1)
    raise ValueError(
        f'The msrvtt1k layout pairs each video with exactly one caption, but video '
        f'{bad[0]} has {counts[bad[0]]} ({bad.size} videos are not 1:1). Evaluate the '
        "1k-A split (msrvtt's 'test', from MSRVTT_JSFUSION_test.csv) or use layout "
        "'full' (e.g. for 'test_full').")
  if num_videos != MSRVTT1K_VIDEOS:
    logging.info('msrvtt1k layout on %d videos (the 1k-A test has %d).', num_videos,
             MSRVTT1K_VIDEOS)


def rank_summary(ranks, prefix: str = '') -> dict[str, float]:
  """R@1/5/10 (percent), medr and meanr of 1-based ranks."""
  r = np.asarray(ranks)
  if r.size == 0:
    raise ValueError('No ranks to summarise: the evaluation had no queries.')
  out = {f'{prefix}r{k}': float(100.0 * np.mean(r <= k)) for k in RECALL_KS}
  out[f'{prefix}medr'] = float(np.floor(np.median(r)))
  out[f'{prefix}meanr'] = float(np.mean(r))
  return out


def _check_split(image_emb, text_emb, caption_image_index):
  n_img = np.shape(image_emb)[0] if np.ndim(image_emb) else 0
  n_txt = np.shape(text_emb)[0] if np.ndim(text_emb) else 0
  if n_img == 0 or n_txt == 0:
    raise ValueError(
        f'Empty evaluation split: {n_img} images and {n_txt} captions. Retrieval needs at '
        'least one of each; check the split name and that the data were built.')
  images = search.as_embeddings(image_emb, 'image embeddings')
  texts = search.as_embeddings(text_emb, 'text embeddings')
  if images.shape[1] != texts.shape[1]:
    raise ValueError(f'Image embeddings have dimension {images.shape[1]} but text '
                     f'embeddings {texts.shape[1]}; both must come from one model.')
  index = np.asarray(caption_image_index)
  if index.shape != (n_txt,) or not np.issubdtype(index.dtype, np.integer):
    raise ValueError(f'caption_image_index must be integers of shape ({n_txt},) (one '
                     f'image per caption); got {index.dtype} {index.shape}.')
  if index.min() < 0 or index.max() >= n_img:
    raise ValueError(f'caption_image_index has values in [{index.min()}, {index.max()}] '
                     f'but there are {n_img} images (valid: 0..{n_img - 1}).')
  missing = np.flatnonzero(np.bincount(index, minlength=n_img) == 0)
  if missing.size:
    raise ValueError(f'Images {missing[:10].tolist()} ({missing.size} in all) have no '
                     'caption, so their image->text rank is undefined; drop them or '
                     'check caption_image_index.')
  return images, texts, index.astype(np.int32)


def _cross_modal(images, texts, index, mesh, block_size, query_block_size):
  ids = np.arange(images.shape[0], dtype=np.int32)
  text_gallery = search.prepare_gallery(texts, mesh, labels=index, block_size=block_size)
  i2t = search.positive_ranks(images, ids, text_gallery,
                                 query_block_size=query_block_size)
  del text_gallery
  image_gallery = search.prepare_gallery(images, mesh, labels=ids, block_size=block_size)
  t2i = search.positive_ranks(texts, index, image_gallery,
                                 query_block_size=query_block_size)
  out = rank_summary(i2t, 'i2t_') | rank_summary(t2i, 't2i_')
  out['rsum'] = sum(out[f'{d}_r{k}'] for d in ('i2t', 't2i') for k in RECALL_KS)
  return out


def retrieval_metrics(image_emb, text_emb, caption_image_index, *, mesh: Mesh | None = None,
                      layout: str = 'full',
                      block_size: int = search.DEFAULT_BLOCK_SIZE,
                      query_block_size: int = search.DEFAULT_QUERY_BLOCK_SIZE
                      ) -> dict[str, float]:
  """Image<->text retrieval metrics of one split.

  Args:
    image_emb: [num_images, D] L2-normalised embeddings (numpy).
    text_emb: [num_captions, D].
    caption_image_index: int [num_captions], the image of each caption; every image needs
      at least one caption.
    mesh: the gallery is sharded over all of its devices; None = one device.
    layout: 'full', 'coco1k' (the mean over 5 folds of consecutive images) or
      'msrvtt1k' ('full', checked to be one caption per video).
  Returns:
    {i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, t2i_..., rsum}.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'Unknown layout {layout!r}; use one of {LAYOUTS}.')
  if layout == 'coco1k':
    return retrieval_metrics_folds(image_emb, text_emb, caption_image_index,
                                   num_folds=COCO1K_FOLDS, mesh=mesh, block_size=block_size,
                                   query_block_size=query_block_size)
  images, texts, index = _check_split(image_emb, text_emb, caption_image_index)
  if layout == 'msrvtt1k':
    check_msrvtt1k(len(images), index)
  return _cross_modal(images, texts, index, mesh, block_size, query_block_size)


def retrieval_metrics_folds(image_emb, text_emb, caption_image_index, *, num_folds: int,
                            mesh: Mesh | None = None,
                            block_size: int = search.DEFAULT_BLOCK_SIZE,
                            query_block_size: int = search.DEFAULT_QUERY_BLOCK_SIZE
                            ) -> dict[str, float]:
  """Every metric averaged over `num_folds` folds of consecutive images.

  Fold f holds images [f*n, (f+1)*n) with n = num_images / num_folds and the captions of
  those images (wherever they sit in the caption list); each fold is ranked on its own.
  COCO 1K is num_folds=5 on the 5000 test images.
  """
  images, texts, index = _check_split(image_emb, text_emb, caption_image_index)
  n_img = images.shape[0]
  if num_folds < 1 or n_img % num_folds:
    raise ValueError(f'{n_img} images cannot be split into num_folds={num_folds} equal '
                     'folds; COCO 1K needs the 5000 test images and num_folds=5.')
  if n_img != 5000 and num_folds == COCO1K_FOLDS:
    logging.info('Fold evaluation of %d images in %d folds of %d (COCO 1K has 5000).',
             n_img, num_folds, n_img // num_folds)
  size = n_img // num_folds
  folds = []
  for f in range(num_folds):
    lo, hi = f * size, (f + 1) * size
    sel = (index >= lo) & (index < hi)
    folds.append(_cross_modal(images[lo:hi], texts[sel], index[sel] - lo, mesh, block_size,
                              query_block_size))
  return {key: float(np.mean([m[key] for m in folds])) for key in folds[0]}


def unimodal_metrics(emb, labels, *, mesh: Mesh | None = None,
                     block_size: int = search.DEFAULT_BLOCK_SIZE,
                     query_block_size: int = search.DEFAULT_QUERY_BLOCK_SIZE
                     ) -> dict[str, float]:
  """Retrieval within one modality: items sharing a label are positives, the query itself
  is excluded. Text matching: `labels = caption_image_index`; image retrieval: the images'
  class or scene labels.

  Queries whose label no other item carries have no positive and are left out;
  `num_queries` says how many were ranked. Returns {r1, r5, r10, medr, meanr, num_queries}.
  """
  n = np.shape(emb)[0] if np.ndim(emb) else 0
  if n == 0:
    raise ValueError('Empty evaluation split: 0 items; check the split name and that the '
                     'data were built.')
  x = search.as_embeddings(emb, 'embeddings')
  lab = np.asarray(labels)
  if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0:
    raise ValueError(f'labels must be non-negative integers of shape ({n},); got '
                     f'{lab.dtype} {lab.shape}.')
  gallery = search.prepare_gallery(x, mesh, labels=lab, block_size=block_size)
  ranks = search.positive_ranks(x, lab, gallery, exclude_self=True,
                                   query_block_size=query_block_size)
  ranked = ranks[ranks > 0]
  if ranked.size == 0:
    raise ValueError(f'No item among {n} shares its label with another, so no query has a '
                     'positive; unimodal retrieval needs repeated labels.')
  return rank_summary(ranked) | {'num_queries': int(ranked.size)}


# --- Encoding --------------------------------------------------------------------------


class Weights(NamedTuple):
  """What the encoders run: a model's graph and its parameters (a pure dict), the form a
  checkpoint restores to. `Weights.of(model)` splits a live CookieModel."""
  graphdef: Any
  params: Any

  @classmethod
  def of(cls, model: nnx.Module) -> 'Weights':
    graphdef, state = nnx.split(model)
    return cls(graphdef, nnx.to_pure_dict(state))


def _check_weights(weights) -> Weights:
  if not isinstance(weights, Weights):
    raise TypeError(f'Expected protocol.Weights; got {type(weights).__name__}. Pass '
                    'Weights.of(model) for a CookieModel, or Weights(graphdef, params).')
  return weights


@functools.lru_cache(maxsize=16)
def encoder(graphdef, mesh: Mesh, side: str):
  """The jitted `(params, batch) -> (embeddings, mask)` of one side over `mesh`, both
  replicated (the mask as int32, 1 for a real row)."""
  # Cached per (model graph, mesh, side) so that evaluating every N training steps
  # compiles once.
  # Traced with the train step's activation constraints: without them XLA may follow an
  # FSDP parameter's sharded `embed` axis into the activations and gather those instead.
  def encode(params, batch):
    with sharding.activation_sharding(mesh):
      model = nnx.merge(graphdef, params)
      if side == 'image':
        emb = model.encode_image(batch['image'])
      else:
        emb = model.encode_text(batch['input_ids'], batch['attention_mask'])
    # As int32: libtpu 0.0.42.1's cost model gives optimal_seconds = -1 (no estimate) for
    # any program that gathers a 1-byte array, and the bool mask was the only one here.
    return emb, batch['mask'].astype(jnp.int32)

  rep = sharding.replicated(mesh)
  return jax.jit(encode, out_shardings=(rep, rep))


_SIDE_KEYS = {'image': ('image',), 'text': ('input_ids', 'attention_mask')}


def abstract_encoder(config, mesh: Mesh, side: str, batch_size: int | None = None):
  """(`encoder(graphdef, mesh, side)`, its abstract `(params, batch)`): the program that
  validation and `launch/eval.py` run on `mesh` at `batch_size` (default
  `config.eval.batch_size`), with the shapes, dtypes and shardings they give it but no
  values, so that `tpu_compile` and `comm_audit` compile that program, not a copy."""
  graphdef, abstract_state = abstract_model(config.model)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract_state),
                        sharding.param_shardings(abstract_state, mesh))
  data_cfg = eval_data_config(config.data, config.eval.data)
  spec = sharding.batch_sharding(mesh)  # where `_place` puts every field
  rows = lambda shape, dtype: jax.ShapeDtypeStruct(
      (batch_size or config.eval.batch_size,) + shape, dtype, sharding=spec)
  if side == 'image':
    size, frames = config.model.vision.image_size, clip_frames(data_cfg)
    batch = {'image': rows((size, size, 3) if frames is None else
                           (frames, size, size, 3), np.float32)}
  else:
    batch = dict.fromkeys(_SIDE_KEYS['text'], rows((data_cfg.max_len,), np.int32))
  batch['mask'] = rows((), np.bool_)
  return encoder(graphdef, mesh, side), (params, batch)


def _place(batch: Mapping[str, Any], keys, mesh: Mesh) -> dict[str, jax.Array]:
  """The batch's fields as global arrays sharded over the batch axes.

  Numpy batches are this process's rows; they are padded (masked out) to a multiple of
  the local batch shards, so any eval batch size works.
  """
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f'The eval batch lacks {missing} (it has {sorted(batch)}); image '
                     "batches need 'image', text batches 'input_ids' and 'attention_mask'.")
  first = batch[keys[0]]
  rows = np.shape(first)[0]
  fields = {k: batch[k] for k in keys}
  fields['mask'] = batch['mask'] if 'mask' in batch else np.ones(rows, bool)
  if isinstance(first, jax.Array):
    out = {}
    for k, v in fields.items():
      v = v if isinstance(v, jax.Array) else np.asarray(v)
      if not isinstance(v, jax.Array) or v.is_fully_addressable:
        v = jax.device_put(v, sharding.batch_sharding(mesh))
      out[k] = v
    return out
  local_shards = max(1, sharding.batch_shards(mesh) // jax.process_count())
  pad = -rows % local_shards
  host = {}
  for k, v in fields.items():
    v = np.asarray(v)
    if k == 'mask':
      v = v.astype(bool)
    host[k] = np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) if pad else v
  return sharding.to_global(mesh, host)


def _kept(emb: jax.Array, keep: jax.Array) -> np.ndarray:
  return search.to_numpy(emb)[search.to_numpy(keep).astype(bool)]


def _encode(side: str, weights: Weights, batches: Iterable[Mapping[str, Any]], mesh: Mesh,
            progress: bool, total: int | None) -> np.ndarray:
  graphdef, params = _check_weights(weights)
  fn = encoder(graphdef, mesh, side)
  if progress:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm.tqdm(batches, total=total, desc=f'encode {side}s', unit='batch')
  chunks, pending = [], None
  # One batch behind: batch k+1 is read, placed and dispatched before batch k's result
  # is fetched, so the devices are not idle while the host waits for it.
  for batch in batches:
    out = fn(params, _place(batch, _SIDE_KEYS[side], mesh))
    if pending is not None:
      chunks.append(_kept(*pending))
    pending = out
  if pending is not None:
    chunks.append(_kept(*pending))
  if not chunks:
    return np.zeros((0, 0), np.float32)
  return np.concatenate(chunks).astype(np.float32)


def encode_images(weights: Weights, batches: Iterable[Mapping[str, Any]], mesh: Mesh, *,
                  progress: bool = False, total: int | None = None) -> np.ndarray:
  """L2-normalised image embeddings [N, D] of the rows whose `mask` is True.

  `weights`: the model's `Weights` (`Weights.of(model)` for a CookieModel). `batches`:
  dicts with `image` float32 [B, H, W, 3] and `mask` bool [B], as numpy (this process's
  rows) or global jax.Arrays. Every process gets all N rows, in order.
  """
  return _encode('image', weights, batches, mesh, progress, total)


def encode_texts(weights: Weights, batches: Iterable[Mapping[str, Any]], mesh: Mesh, *,
                 progress: bool = False, total: int | None = None) -> np.ndarray:
  """L2-normalised text embeddings [N, D]; batches hold `input_ids`, `attention_mask`
  int32 [B, L] and `mask` bool [B]."""
  return _encode('text', weights, batches, mesh, progress, total)


def evaluate_retrieval(graphdef, params, eval_data, *, mesh: Mesh, layout: str = 'full',
                       text_matching: bool = True, progress: bool = False,
                       block_size: int = search.DEFAULT_BLOCK_SIZE) -> dict[str, float]:
  """Encodes a split once per side and returns its retrieval metrics.

  `eval_data` is `cookie_jax.data.pipeline.eval_data(...)` or anything with
  `image_batches()`, `text_batches()`, `caption_image_index`, `num_images` and
  `num_captions`. With `text_matching`, adds the text->text metrics as `t2t_*`. Video
  splits (`eval_data.visual == 'video'`) give v2t_* / t2v_* instead of i2t_* / t2i_*.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'Unknown layout {layout!r}; use one of {LAYOUTS}.')
  model = Weights(graphdef, params)
  images = encode_images(model, eval_data.image_batches(), mesh, progress=progress,
                         total=getattr(eval_data, 'num_image_batches', None))
  texts = encode_texts(model, eval_data.text_batches(), mesh, progress=progress,
                       total=getattr(eval_data, 'num_text_batches', None))
  for name, got, want in (('images', len(images), eval_data.num_images),
                          ('captions', len(texts), eval_data.num_captions)):
    if got != want:
      raise ValueError(f'Encoded {got} {name} but the split has {want}: the batches\' '
                       "'mask' does not mark exactly the real rows.")
  return metrics_from_embeddings(images, texts, eval_data.caption_image_index, mesh=mesh,
                                 layout=layout, text_matching=text_matching,
                                 block_size=block_size,
                                 visual=getattr(eval_data, 'visual', 'image'))


def metrics_from_embeddings(images, texts, caption_image_index, *, mesh: Mesh,
                            layout: str = 'full', text_matching: bool = True,
                            block_size: int = search.DEFAULT_BLOCK_SIZE,
                            visual: str = 'image') -> dict[str, float]:
  """The metrics of `evaluate_retrieval`, from embeddings already encoded; `visual`
  ('image' or 'video') names them (see `name_metrics`)."""
  index = np.asarray(caption_image_index)
  metrics = retrieval_metrics(images, texts, index, mesh=mesh, layout=layout,
                              block_size=block_size)
  if text_matching and np.bincount(index).max() < 2:
    logging.info('Text matching skipped: no image has two captions, so no caption has a '
             'positive.')
  elif text_matching:
    matching = unimodal_metrics(texts, index, mesh=mesh, block_size=block_size)
    metrics.update({f't2t_{k}': v for k, v in matching.items()})
  return name_metrics(metrics, visual)
