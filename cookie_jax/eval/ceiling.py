"""What a retrieval score means on its split: chance, the split's ceiling, one summary.

A split whose captions repeat verbatim (the synthetic set's test split: about a fifth of
its captions are also a caption of another image) caps what any model can score, since a
text encoder maps one caption to one embedding:

* text -> image: all queries with the same caption get the same image ranking. The best
  ranking for that caption puts first the images holding it most often, so R@K is at most
  the sum, over distinct captions, of the K largest per-image counts, over all queries.
* image -> text: caption rows with the same text tie, and ties are pessimistic
  (eval/search.py: a negative scoring exactly as high as the best ground truth is
  ranked before it). An image's best rank is therefore 1 + the fewest rows of another
  image sharing one of its captions, so R@K is at most the share of images with a caption
  that at most K - 1 rows of other images repeat.

Both bounds are reached by a model that gives each image any ranking it likes over the
distinct captions, so they are the ceiling, not an estimate. Duplicates are judged on what
the model reads (the token ids, after lowercasing and truncation to `max_len`) when
`retrieval_ceiling_of` is given an `EvalData`.

Chance is the expected recall of a random ranking: R@K = K / images for text -> image, and
1 - C(T - m, K) / C(T, K) for an image with m of the T captions, averaged over images.
"""

import collections
import math
from typing import Hashable, Sequence

import numpy as np

from cookie_jax.eval.protocol import RECALL_KS
DIRECTIONS = ('i2t', 't2i')


def _rsum(out: dict) -> dict:
  out['rsum'] = sum(out[f'{d}_r{k}'] for d in DIRECTIONS for k in RECALL_KS)
  return out


def _check(caption_keys, caption_image_index, num_images):
  index = np.asarray(caption_image_index)
  if index.ndim != 1 or len(caption_keys) != index.size:
    raise ValueError(f'caption_image_index must hold one image per caption: '
                     f'{len(caption_keys)} captions, index of shape {index.shape}.')
  if index.size == 0 or num_images < 1:
    raise ValueError(f'An empty split ({num_images} images, {index.size} captions) has '
                     'no ceiling; check the split name.')
  if index.min() < 0 or index.max() >= num_images:
    raise ValueError(f'caption_image_index has values in [{index.min()}, {index.max()}] '
                     f'but there are {num_images} images (valid: 0..{num_images - 1}).')
  missing = np.flatnonzero(np.bincount(index, minlength=num_images) == 0)
  if missing.size:
    raise ValueError(f'Images {missing[:10].tolist()} have no caption; their '
                     'image->text rank is undefined.')
  return index.astype(np.int64)


def retrieval_ceiling(caption_keys: Sequence[Hashable], caption_image_index,
                      num_images: int) -> dict[str, float]:
  """The highest R@1/5/10 both ways (percent) and RSUM any model can score on a split.

  Args:
    caption_keys: one hashable per caption row (its text, or its token ids as a tuple);
      equal keys are captions the model cannot tell apart.
    caption_image_index: the image of each caption row.
    num_images: images in the split.
  """
  index = _check(caption_keys, caption_image_index, num_images)
  # key -> Counter(image -> rows of that image with the key)
  holders = collections.defaultdict(collections.Counter)
  for key, image in zip(caption_keys, index.tolist()):
    holders[key][image] += 1
  out = {}
  for k in RECALL_KS:
    hits = sum(sum(sorted(c.values(), reverse=True)[:k]) for c in holders.values())
    out[f't2i_r{k}'] = 100.0 * hits / index.size
  # image -> fewest rows of other images tying with its best caption
  fewest = np.full(num_images, np.iinfo(np.int64).max)
  for counts in holders.values():
    total = sum(counts.values())
    for image, own in counts.items():
      fewest[image] = min(fewest[image], total - own)
  for k in RECALL_KS:
    out[f'i2t_r{k}'] = float(100.0 * np.mean(fewest + 1 <= k))
  return _rsum(out)


def chance_recall(caption_image_index, num_images: int) -> dict[str, float]:
  """Expected R@1/5/10 both ways (percent) and RSUM of a uniformly random ranking."""
  index = _check([None] * np.size(caption_image_index), caption_image_index, num_images)
  total = index.size
  per_image = np.bincount(index, minlength=num_images)
  out = {}
  for k in RECALL_KS:
    kk = min(k, total)
    miss = [math.comb(total - m, kk) / math.comb(total, kk) for m in per_image]
    out[f'i2t_r{k}'] = 100.0 * (1.0 - float(np.mean(miss)))
    out[f't2i_r{k}'] = 100.0 * min(k, num_images) / num_images
  return _rsum(out)


def eval_data_keys(data) -> list[tuple]:
  """The token ids (real tokens only) of each caption row of a pipeline `EvalData`: what
  the text tower reads, so captions equal after tokenising count as duplicates."""
  ids, mask = data.tokens['input_ids'], data.tokens['attention_mask'].astype(bool)
  return [tuple(row[m].tolist()) for row, m in zip(ids, mask)]


def retrieval_ceiling_of(data) -> dict[str, float]:
  """`retrieval_ceiling` of a pipeline `EvalData` split, by token ids."""
  return retrieval_ceiling(eval_data_keys(data), data.caption_image_index, data.num_images)


def chance_of(data) -> dict[str, float]:
  return chance_recall(data.caption_image_index, data.num_images)


def _row(name: str, m: dict) -> str:
  cells = '  '.join(f'{m[f"{d}_r{k}"]:5.1f}' for d in DIRECTIONS for k in RECALL_KS)
  return f'  {name:<8}{cells}  {m["rsum"]:6.1f}'


def progress_line(rsum: float, chance: float, ceiling: float) -> str:
  """Where RSUM lies between chance and the split's ceiling, in words: a share that is
  never negative nor printed as "-0%" (a short run can land just below chance)."""
  span = ceiling - chance
  share = 100.0 * (rsum - chance) / span if span > 0 else 0.0
  if share < 0.5:
    return (f'The model is no better than chance here (RSUM {rsum:.1f}, chance '
            f'{chance:.1f}); train longer.')
  return (f"The model has gone {min(share, 100.0):.0f}% of the way from chance to this "
          "split's ceiling (set by its repeated captions).")


def summary(result: dict, chance: dict, ceiling: dict, *, split: str = 'test',
            files: Sequence[tuple[str, str]] = ()) -> str:
  """The end-of-run table: R@1/5/10 both ways and RSUM of `result` between chance and the
  split's ceiling, then `files` as (what, path) lines."""
  head = '  '.join(f'{d}@{k:<2}' for d in DIRECTIONS for k in RECALL_KS)
  lines = [f'{split} retrieval, step {result.get("step", "?")} '
           f'(recall in %; RSUM is the sum of the six, at most 600):',
           f'  {"":<8}{head}    RSUM',
           _row('chance', chance), _row('model', result), _row('ceiling', ceiling),
           '  ' + progress_line(result['rsum'], chance['rsum'], ceiling['rsum'])]
  lines += [f'  {what}: {path}' for what, path in files]
  return '\n'.join(lines)
