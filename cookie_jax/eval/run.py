"""Evaluates one checkpoint of a training run: `evaluate_checkpoint(config, workdir)`.

It writes into WORKDIR/eval/ (process 0 only), as retrieval-<split>-<layout>-<step>...:
  ....json           every retrieval metric, plus the Recall@K curve;
  ...-recall.png     R@K for K = 1..50, image->text and text->image;
  ...-examples.png   image queries with their top-5 captions and caption queries with
                     their top-5 images, ground truth marked.

Each side of the split is encoded once. The metrics come from `protocol.metrics_from_embeddings`
on those embeddings (so they equal `protocol.evaluate_retrieval`, which would encode
again), the curve from exact ranks (`search.positive_ranks`) and the examples from
`search.sharded_topk`.
"""

import re

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import files, sharding
from cookie_jax.eval import protocol, search
from cookie_jax.config import ConfigError, config_from_dict, validate_config
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.metric_writer import write_json
from cookie_jax.models import abstract_model

EXAMPLE_IMAGE_QUERIES = 6
EXAMPLE_TEXT_QUERIES = 4
EXAMPLE_TOP_K = 5
CURVE_MAX_K = 50


def output_paths(workdir: str, split: str, step: int, *, layout: str = 'full',
                 task: str = 'retrieval') -> dict[str, str]:
  """Where `evaluate_checkpoint` writes: {'json', 'recall', 'examples'}, named
  WORKDIR/eval/<task>-<split>-<layout>-<step>..., so that no two evaluations of one
  checkpoint overwrite each other (an empty part is left out)."""
  # A tfds split expression such as 'test[:100]' must not become a path.
  name = re.sub(r'[^A-Za-z0-9_.+-]+', '_', split).strip('_') or 'split'
  stem = '-'.join(part for part in (task, name, layout, str(step)) if part)
  base = files.join(workdir, 'eval', stem)
  return {'json': f'{base}.json', 'recall': f'{base}-recall.png',
          'examples': f'{base}-examples.png'}


def resolve_step(directory: str, step: int | None) -> tuple[int, ml_collections.ConfigDict]:
  """The step to evaluate (default: the latest) and the config saved with it."""
  step = ckpt_lib.resolve_step(directory, step)
  saved = ckpt_lib.saved_config(directory, step)
  if not saved:
    raise FileNotFoundError(f'{directory}/{step} has no saved config; pass --config with '
                            'the config the run was trained with.')
  return step, config_from_dict(saved)


def restore_params(config: ml_collections.ConfigDict, directory: str, step: int, mesh):
  """(graphdef, params) of `step`: the parameters alone (no optimiser state, which is
  twice their size), restored straight into their shardings on `mesh`."""
  graphdef, abstract_state = abstract_model(config.model)
  abstract = ckpt_lib.abstract_with_shardings(
      nnx.to_pure_dict(abstract_state), sharding.param_shardings(abstract_state, mesh))
  params, _ = ckpt_lib.load_params(directory, abstract, step)
  return graphdef, params


def _eval_data(pipeline, config, split: str, layout: str):
  from cookie_jax.data import sources  # pylint: disable=g-import-not-at-top
  from cookie_jax.data.defaults import eval_data_config  # pylint: disable=g-import-not-at-top
  data_cfg = eval_data_config(config.data, config.eval.data)  # what validation read
  builder = sources.get_builder(data_cfg)
  resolved = sources.resolve_split(data_cfg, split)
  try:
    sources.num_examples(builder, resolved)
  except (KeyError, ValueError) as e:
    named = f' (config.data.{split}_split={resolved!r})' if resolved != split else ''
    raise ConfigError(f'--split={split!r}{named} is not a split of {builder.name}: '
                      f"{' '.join(str(e).split())} 'val' and 'test' name "
                      'config.data.val_split / test_split.') from None
  # Numpy batches (mesh=None): the encoders place them on the mesh, and the example
  # pictures can read the pixels back without a gather.
  data = pipeline.eval_data(data_cfg, split, image_size=config.model.vision.image_size,
                            batch_size=config.eval.batch_size)
  if layout == 'coco1k' and data.num_images % protocol.COCO1K_FOLDS:
    raise ConfigError(f'--layout=coco1k splits the images into {protocol.COCO1K_FOLDS} '
                      f'equal folds, but split {split!r} has {data.num_images} images; '
                      "use --layout=full.")
  if layout == 'msrvtt1k':
    try:
      protocol.check_msrvtt1k(data.num_images, data.caption_image_index)
    except ValueError as e:
      raise ConfigError(f'--layout=msrvtt1k --split={split!r}: {e}') from None
  return data


def recall_curve(images, texts, index, *, mesh, layout: str = 'full',
                 max_k: int = CURVE_MAX_K) -> dict[str, list]:
  """R@K (percent) for K = 1..max_k in both directions, from exact ranks.

  With layout 'coco1k' the curve is the mean of the folds' curves, as the metrics are, so
  its values at K = 1, 5, 10 are the reported R@1/5/10.
  """
  folds = protocol.COCO1K_FOLDS if layout == 'coco1k' else 1
  size = len(images) // folds
  # Up to the caption gallery's size: beyond the image gallery's, text->image is 100.
  ks = np.arange(1, min(max_k, len(texts) // folds) + 1)
  curves = {'i2t': [], 't2i': []}
  for f in range(folds):
    lo, hi = f * size, (f + 1) * size
    sel = (index >= lo) & (index < hi)
    fold_index, ids = index[sel] - lo, np.arange(size, dtype=np.int32)
    text_gallery = search.prepare_gallery(texts[sel], mesh, labels=fold_index)
    i2t = search.positive_ranks(images[lo:hi], ids, text_gallery)
    image_gallery = search.prepare_gallery(images[lo:hi], mesh, labels=ids)
    t2i = search.positive_ranks(texts[sel], fold_index, image_gallery)
    for name, ranks in (('i2t', i2t), ('t2i', t2i)):
      curves[name].append(100.0 * np.mean(ranks[:, None] <= ks[None], axis=0))
  return {'k': ks.tolist(),
          **{name: np.mean(c, axis=0).tolist() for name, c in curves.items()}}


def _spread(n: int, count: int, offset: float = 0.0) -> np.ndarray:
  """`count` indices spread evenly over range(n) (fewer when n is small)."""
  step = n / max(1, count)
  return np.unique(np.minimum(((np.arange(count) + offset) * step).astype(np.int64), n - 1))


def _topk_as_ranked(queries, labels, placed, gallery_labels, k: int):
  """The top k in the order the (pessimistic) rank counts them: among equal scores,
  negatives before ground truth, so that a truth listed at position p has rank p and one
  of rank > k is not listed. Equal scores are common: identical captions embed alike.

  Every item tied with the k-th is fetched first (the fetch doubles until the last score
  fetched is below the k-th's), so that a tie cut by the fetch cannot change the order.
  """
  fetch = min(placed.size, 2 * k)
  while True:
    scores, top = search.sharded_topk(queries, placed, fetch)
    if fetch == placed.size or np.all(scores[:, -1] < scores[:, k - 1]):
      break
    fetch = min(placed.size, 2 * fetch)
  truth = np.asarray(gallery_labels)[top] == np.asarray(labels)[:, None]
  order = np.lexsort((truth, -scores), axis=-1)[:, :k]  # stable: by index within a tie
  return (np.take_along_axis(scores, order, axis=-1),
          np.take_along_axis(top, order, axis=-1))


def example_results(images, texts, index, *, mesh, top_k: int = EXAMPLE_TOP_K,
                    num_image_queries: int = EXAMPLE_IMAGE_QUERIES,
                    num_text_queries: int = EXAMPLE_TEXT_QUERIES) -> dict[str, dict]:
  """Top-k lists over the whole split for a few queries spread over it.

  Returns {'i2t': {...}, 't2i': {...}}, each with `queries`, top-k `indices` and `scores`,
  `ranks`, the exact 1-based rank of each query's best ground truth, and `truths`, the
  gallery index of that ground truth. The top-k lists equal scores as the rank counts
  them (negatives first), so a listed truth's position is its rank.
  """
  ids = np.arange(len(images), dtype=np.int32)
  out = {}
  for name, queries, labels, gallery, gallery_labels, count, offset in (
      ('i2t', images, ids, texts, index, num_image_queries, 0.0),
      # Half a step later, so that caption queries come from other images.
      ('t2i', texts, index, images, ids, num_text_queries, 0.5)):
    chosen = _spread(len(queries), count, offset)
    placed = search.prepare_gallery(gallery, mesh, labels=gallery_labels)
    scores, top = _topk_as_ranked(queries[chosen], labels[chosen], placed, gallery_labels,
                                  min(top_k, len(gallery)))
    ranks = search.positive_ranks(queries[chosen], labels[chosen], placed)
    truths = []
    for q in chosen:
      positives = np.flatnonzero(gallery_labels == labels[q])
      truths.append(positives[np.argmax(gallery[positives] @ queries[q])])
    out[name] = {'queries': chosen, 'indices': top, 'scores': scores, 'ranks': ranks,
                 'truths': np.asarray(truths, np.int64)}
  return out


def _images_at(data, wanted) -> dict[int, np.ndarray]:
  """The normalised eval images at the given split indices (one partial read)."""
  wanted, found, seen = set(int(i) for i in wanted), {}, 0
  for batch in data.image_batches():
    rows = np.asarray(batch['image'])[np.asarray(batch['mask'], bool)]
    for j, row in enumerate(rows):
      if seen + j in wanted:
        found[seen + j] = row
    seen += len(rows)
    if seen > max(wanted):
      break
  return found


def _picture(pixels: np.ndarray) -> np.ndarray:
  """An image as is; a clip [T, H, W, 3] as its frames side by side."""
  return np.concatenate(list(pixels), axis=1) if pixels.ndim == 4 else pixels


def _draw(data, config, examples, curve, paths, title) -> None:
  from cookie_jax.eval import pictures  # pylint: disable=g-import-not-at-top
  if data.process_count > 1:
    # This process's batches hold only its rows; read the whole split here.
    from cookie_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    data = pipeline.eval_data(data.cfg, data.split, image_size=data.image_size,
                              batch_size=data.batch_size, process_index=0, process_count=1)
  i2t, t2i = examples['i2t'], examples['t2i']
  index = np.asarray(data.caption_image_index)
  pixels = _images_at(data, np.concatenate(
      [i2t['queries'], t2i['indices'].ravel(), t2i['truths']]))
  view = lambda i: pictures.to_uint8(_picture(pixels[int(i)]), config.data.mean,
                                     config.data.std)
  image_queries = [pictures.ImageQuery(
      image=view(q), image_index=int(q), rank=int(r), truth=data.captions[gt],
      results=[(data.captions[c], float(s), bool(index[c] == q)) for c, s in zip(top, sc)])
      for q, top, sc, r, gt in zip(i2t['queries'], i2t['indices'], i2t['scores'],
                                   i2t['ranks'], i2t['truths'])]
  text_queries = [pictures.TextQuery(
      caption=data.captions[q], caption_index=int(q), rank=int(r), truth=view(gt),
      truth_index=int(gt),
      results=[(view(i), int(i), float(s), bool(i == gt)) for i, s in zip(top, sc)])
      for q, top, sc, r, gt in zip(t2i['queries'], t2i['indices'], t2i['scores'],
                                   t2i['ranks'], t2i['truths'])]
  pictures.draw_examples(paths['examples'], image_queries, text_queries, title=title,
                         num_images=data.num_images, num_captions=data.num_captions,
                         visual=getattr(data, 'visual', 'image'))
  pictures.draw_recall_curve(paths['recall'], curve, title=title)


def evaluate_checkpoint(config: ml_collections.ConfigDict | None, workdir: str, *,
                        step: int | None = None, split: str = 'test', layout: str = 'full',
                        progress: bool = True, pictures: bool = True) -> dict:
  """Evaluates step `step` (default: the latest) of the run in `workdir` on `split`.

  Args:
    config: the config to evaluate with; None = the one saved with the checkpoint. Its
      model must be the checkpoint's (checked); data and eval settings may differ.
    split: 'val', 'test' (config.data.val_split / test_split) or a tfds split.
    layout: 'full', 'coco1k' or 'msrvtt1k' (see cookie_jax/eval/protocol.py).
    pictures: also draw the example and Recall@K PNGs.
  Returns:
    What the JSON file (`output_paths`) holds: the metrics of `evaluate_retrieval`
    (i2t_r1, ..., rsum, t2t_*; v2t_* / t2v_* for video), `step`, `split`, `layout`, the
    split's sizes and `recall_curve` ({'k', 'i2t', 't2i'} or {'k', 'v2t', 't2v'}); and
    `files`, the paths written.
  """
  if layout not in protocol.LAYOUTS:
    raise ConfigError(f'--layout={layout!r}: use one of {list(protocol.LAYOUTS)}.')
  directory = ckpt_lib.find_checkpoints(workdir)
  step, saved = resolve_step(directory, step)
  config = validate_config(saved if config is None else config,
                           num_devices=jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  from cookie_jax.data import pipeline  # TensorFlow loads here, not at import time.
  tok_lib.check_run_tokenizer(workdir, pipeline.load_tokenizer(config.data), 'evaluation')
  data = _eval_data(pipeline, config, split, layout)
  graphdef, params = restore_params(config, directory, step, mesh)
  logging.info('Evaluating %s/%d on %s (%d images, %d captions).', directory, step,
               data.split, data.num_images, data.num_captions)

  model = protocol.Weights(graphdef, params)
  images = protocol.encode_images(model, data.image_batches(), mesh, progress=progress,
                                  total=data.num_image_batches)
  texts = protocol.encode_texts(model, data.text_batches(), mesh, progress=progress,
                                total=data.num_text_batches)
  index = np.asarray(data.caption_image_index)
  visual = getattr(data, 'visual', 'image')
  result = protocol.metrics_from_embeddings(images, texts, index, mesh=mesh, layout=layout,
                                            visual=visual)
  curve = protocol.name_metrics(recall_curve(images, texts, index, mesh=mesh,
                                             layout=layout), visual)
  result.update(step=step, split=split, layout=layout, num_images=data.num_images,
                num_captions=data.num_captions, recall_curve=curve)

  paths = output_paths(workdir, split, step, layout=layout)
  write_json(paths['json'], result)
  result['files'] = paths if pictures else {'json': paths['json']}
  if pictures:
    examples = example_results(images, texts, index, mesh=mesh)  # collective: every process
    if jax.process_index() == 0:
      title = (f'{data.split} split, step {step}, layout {layout} '
               f'({data.num_images} {visual}s, {data.num_captions} captions)')
      _draw(data, config, examples, curve, paths, title)
  logging.info('Wrote %s', ', '.join(result['files'].values()))
  return result


def summary(result: dict) -> str:
  """A few lines for the console: the headline metrics and the files written."""
  def direction(prefix):
    return ', '.join(f'R@{k} {result[f"{prefix}_r{k}"]:.1f}' for k in protocol.RECALL_KS)
  visual = 'video' if 'v2t_r1' in result else 'image'
  to_v, from_v = protocol.DIRECTIONS[visual]
  lines = [f"{result['split']} split, step {result['step']}, layout {result['layout']} "
           f"({result['num_images']} {visual}s, {result['num_captions']} captions)",
           f"  {visual}->text  {direction(to_v)}, medr {result[f'{to_v}_medr']:.0f}",
           f"  text->{visual}  {direction(from_v)}, medr {result[f'{from_v}_medr']:.0f}"]
  if 't2t_r1' in result:
    lines.append(f"  text->text   {direction('t2t')}, medr {result['t2t_medr']:.0f}")
  lines.append(f"  RSUM {result['rsum']:.1f}")
  lines += [f'  wrote {path}' for path in result.get('files', {}).values()]
  return '\n'.join(lines)
