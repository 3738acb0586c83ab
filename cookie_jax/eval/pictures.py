"""Pictures of a retrieval evaluation: example queries with their results, and R@K curves.

matplotlib is imported inside the drawing functions, so `import cookie_jax.eval.run`
costs nothing when no picture is drawn. Figures are built with the object-oriented API
(`Figure`, no pyplot), which renders with Agg and never touches the global backend of a
notebook or GUI the caller may be running.
"""

import dataclasses
import io
import textwrap
from typing import Sequence

import numpy as np

from cookie_jax import files

# Enough pixels that a 16 or 32 px synthetic image reads as shapes, not as a smudge.
MIN_PIXELS = 128
GOOD, BAD, MUTED = '#1a7f37', '#c62828', '#555555'
CHECK, CROSS = '\u2713', '\u2717'  # both in DejaVu Sans, matplotlib's default font


@dataclasses.dataclass
class ImageQuery:
  """An image and the captions it retrieved: (caption, score, is ground truth)."""
  image: np.ndarray  # uint8 [H, W, 3]
  image_index: int
  rank: int  # rank of its best ground-truth caption among all captions
  results: Sequence[tuple[str, float, bool]]
  truth: str  # its best-ranked ground-truth caption


@dataclasses.dataclass
class TextQuery:
  """A caption and the images it retrieved: (image, index, score, is ground truth)."""
  caption: str
  caption_index: int
  rank: int  # rank of its image among all images
  results: Sequence[tuple[np.ndarray, int, float, bool]]
  truth: np.ndarray
  truth_index: int


def to_uint8(image, mean, std, min_pixels: int = MIN_PIXELS) -> np.ndarray:
  """Undoes the pipeline's normalisation and upscales by an integer factor with nearest
  neighbour, so that every pixel of a tiny image stays a crisp square."""
  x = np.asarray(image, np.float32) * np.asarray(std, np.float32) + np.asarray(
      mean, np.float32)
  x = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
  factor = max(1, -(-min_pixels // max(x.shape[:2])))
  return np.repeat(np.repeat(x, factor, axis=0), factor, axis=1)


def _save(fig, path: str) -> None:
  """The figure as a PNG at `path` (local or gs://): rendered in memory, written whole."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png')
  files.write_bytes(path, buf.getvalue())


def _show(ax, image, *, border: str | None = None, dashed: bool = False) -> None:
  ax.imshow(image, interpolation='nearest')
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_visible(border is not None)
    if border is not None:
      spine.set_color(border)
      spine.set_linewidth(5)
      spine.set_linestyle('--' if dashed else '-')


def _image_query(fig, cell_image, cell_text, query: ImageQuery, top_k: int) -> None:
  ax = fig.add_subplot(cell_image)
  _show(ax, query.image)
  ax.set_title(f'image #{query.image_index}', fontsize=10)
  ax = fig.add_subplot(cell_text)
  ax.axis('off')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  found = 'in the top %d' % top_k if query.rank <= top_k else 'missed'
  ax.text(0, 0.97, f'top-{top_k} captions (truth at rank {query.rank}, {found})',
          fontsize=10, weight='bold', va='top')
  y = 0.80
  for caption, score, truth in query.results:
    mark, color = (CHECK, GOOD) if truth else (CROSS, BAD)
    ax.text(0, y, f'{mark} {score:+.2f}  {textwrap.shorten(caption, 78)}', fontsize=9.5,
            color=color, va='top', weight='bold' if truth else 'normal')
    y -= 0.14
  if query.rank > top_k:
    ax.text(0, y - 0.02, f'truth #{query.rank}: {textwrap.shorten(query.truth, 72)}',
            fontsize=9.5, color=MUTED, style='italic', va='top')


def _text_query(fig, cells, query: TextQuery) -> None:
  ax = fig.add_subplot(cells[0])
  ax.axis('off')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.text(0, 0.95, f'caption #{query.caption_index}', fontsize=10, weight='bold', va='top')
  ax.text(0, 0.78, textwrap.fill(f'"{query.caption}"', 34), fontsize=10, va='top')
  ax.text(0, 0.05, f'its image is at rank {query.rank}', fontsize=9.5, va='bottom',
          color=GOOD if query.rank <= len(query.results) else BAD)
  for rank, (cell, (image, index, score, truth)) in enumerate(
      zip(cells[1:], query.results), start=1):
    ax = fig.add_subplot(cell)
    color = GOOD if truth else BAD
    _show(ax, image, border=color)
    ax.set_title(f'{CHECK if truth else CROSS} #{rank}  {score:+.2f}', fontsize=10,
                 color=color, weight='bold' if truth else 'normal')
    ax.set_xlabel(f'image #{index}', fontsize=8.5, color=MUTED)
  ax = fig.add_subplot(cells[-1])
  _show(ax, query.truth, border=GOOD, dashed=True)
  ax.set_title('ground truth', fontsize=10, color=GOOD)
  ax.set_xlabel(f'image #{query.truth_index}', fontsize=8.5, color=MUTED)


def draw_examples(path: str, image_queries: Sequence[ImageQuery],
                  text_queries: Sequence[TextQuery], *, title: str, num_images: int,
                  num_captions: int, visual: str = 'image') -> None:
  """One PNG: image queries (two per row) with their top captions, then caption queries
  (one per row) with their top images and, last, the image they describe. `visual` names
  the visual side in the headings ('video': clips drawn as their frames side by side)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  top_k = max([len(q.results) for q in [*image_queries, *text_queries]] or [1])
  rows_i = -(-len(image_queries) // 2)
  rows_t = len(text_queries)
  fig = Figure(figsize=(17, 1.0 + 2.0 * rows_i + 2.3 * rows_t), dpi=100,
               layout='constrained')
  fig.suptitle(f'{title}; scores are cosine similarities', fontsize=13, weight='bold')
  top, bottom = fig.subfigures(2, 1, height_ratios=[2.0 * rows_i + 0.4,
                                                    2.3 * rows_t + 0.4])
  top.suptitle(f'{visual.capitalize()} \u2192 text: each {visual} against all {num_captions} '
               f'captions ({CHECK} green = one of its captions, {CROSS} red = another '
               f'{visual}\'s)', fontsize=11.5)
  if rows_i:
    grid = top.add_gridspec(rows_i, 4, width_ratios=[1.2, 6.8, 1.2, 6.8])
    for i, query in enumerate(image_queries):
      r, c = divmod(i, 2)
      _image_query(top, grid[r, 2 * c], grid[r, 2 * c + 1], query, top_k)
  bottom.suptitle(f'Text \u2192 {visual}: each caption against all {num_images} {visual}s '
                  f'(green frame = its {visual}; dashed, right: its {visual} wherever it '
                  'ranked)', fontsize=11.5)
  if rows_t:
    grid = bottom.add_gridspec(rows_t, top_k + 2, width_ratios=[3.2] + [1] * (top_k + 1))
    for r, query in enumerate(text_queries):
      _text_query(bottom, [grid[r, c] for c in range(top_k + 2)], query)
  _save(fig, path)


def draw_recall_curve(path: str, curve: dict, *, title: str,
                      marks: Sequence[int] = (1, 5, 10)) -> None:
  """R@K against K for both directions; the values at `marks` are dotted and listed in
  the legend, where they cannot overlap."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  ks = np.asarray(curve['k'])
  marks = [k for k in marks if k <= ks[-1]]
  fig = Figure(figsize=(9, 6), dpi=100, layout='constrained')
  ax = fig.add_subplot()
  for k in marks:
    ax.axvline(k, color='#999999', linestyle=':', linewidth=1)
  visual, (to_v, from_v) = ('video', ('v2t', 't2v')) if 'v2t' in curve else (
      'image', ('i2t', 't2i'))
  for name, label, color in ((to_v, f'{visual} \u2192 text', '#1f77b4'),
                             (from_v, f'text \u2192 {visual}', '#d62728')):
    values = np.asarray(curve[name])
    at = ', '.join(f'R@{k} {values[k - 1]:.1f}' for k in marks)
    ax.plot(ks, values, color=color, linewidth=2, label=f'{label}   ({at})')
    ax.plot(marks, values[np.asarray(marks) - 1], 'o', color=color)
  ax.set_xlim(0.5, ks[-1] + 0.5)
  ax.set_ylim(0, 102)
  ax.set_xlabel('K (results looked at per query)', fontsize=11)
  ax.set_ylabel('Recall@K (% of queries with a ground truth in the top K)', fontsize=11)
  ax.grid(True, alpha=0.3)
  ax.legend(loc='lower right', fontsize=10.5)
  ax.set_title(title, fontsize=11)
  _save(fig, path)


# Zero-shot classification and the image index (cookie_jax/eval/) -------------------------


@dataclasses.dataclass
class Confusion:
  """A class often taken for another: images of `true_name` classified as
  `predicted_name`, and one image the model rightly called `predicted_name`."""
  true_name: str
  predicted_name: str
  count: int
  share: float  # percent of the true class's images
  examples: Sequence[np.ndarray]  # uint8 [H, W, 3]
  reference: np.ndarray | None


def draw_confusions(path: str, rows: Sequence[Confusion], *, title: str) -> None:
  """One PNG: a row per confusion, its misclassified images framed in red and, last, a
  correctly classified image of the class they were taken for, dashed green."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  columns = max([len(r.examples) for r in rows] or [1])
  fig = Figure(figsize=(4.2 + 1.6 * (columns + 1), 0.9 + 1.9 * max(1, len(rows))), dpi=100,
               layout='constrained')
  fig.suptitle(f'{title}\nmost-confused classes: images of the true class taken for the '
               'predicted one (red); right: an image rightly called the predicted class',
               fontsize=11.5, weight='bold')
  grid = fig.add_gridspec(max(1, len(rows)), columns + 2, width_ratios=[2.6] + [1] * (
      columns + 1))
  for r, row in enumerate(rows):
    ax = fig.add_subplot(grid[r, 0])
    ax.axis('off')
    ax.text(0, 0.75, textwrap.fill(f'"{row.true_name}"', 24), fontsize=10.5, weight='bold',
            va='top')
    ax.text(0, 0.38, textwrap.fill(f'taken for "{row.predicted_name}"', 26), fontsize=10,
            color=BAD, va='top')
    ax.text(0, 0.02, f'{row.count} images ({row.share:.0f}% of the class)', fontsize=9,
            color=MUTED, va='bottom')
    for c, image in enumerate(row.examples):
      _show(fig.add_subplot(grid[r, c + 1]), image, border=BAD)
    if row.reference is not None:
      ax = fig.add_subplot(grid[r, columns + 1])
      _show(ax, row.reference, border=GOOD, dashed=True)
      ax.set_title(textwrap.shorten(row.predicted_name, 18), fontsize=9, color=GOOD)
  _save(fig, path)


@dataclasses.dataclass
class SearchResult:
  """A text query and its top images from an index: (image, name, score)."""
  query: str
  results: Sequence[tuple[np.ndarray, str, float]]


def draw_search(path: str, queries: Sequence[SearchResult], *, title: str) -> None:
  """One PNG: a row per text query, its top-k images with their scores and paths."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  top_k = max([len(q.results) for q in queries] or [1])
  fig = Figure(figsize=(3.4 + 1.9 * top_k, 0.8 + 2.2 * max(1, len(queries))), dpi=100,
               layout='constrained')
  fig.suptitle(f'{title}; scores are cosine similarities', fontsize=12, weight='bold')
  grid = fig.add_gridspec(max(1, len(queries)), top_k + 1, width_ratios=[2.6] + [1] * top_k)
  for r, q in enumerate(queries):
    ax = fig.add_subplot(grid[r, 0])
    ax.axis('off')
    ax.text(0, 0.9, textwrap.fill(f'"{q.query}"', 28), fontsize=10.5, va='top')
    for c, (image, name, score) in enumerate(q.results):
      ax = fig.add_subplot(grid[r, c + 1])
      _show(ax, image)
      ax.set_title(f'#{c + 1}  {score:+.3f}', fontsize=10)
      ax.set_xlabel(name if len(name) <= 26 else '...' + name[-23:], fontsize=8, color=MUTED)
  _save(fig, path)
