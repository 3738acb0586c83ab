"""Zero-shot classification with prompt ensembles, as CLIP reports it.

* **The classifier.** Every class name is put into every template ("a photo of a {}."),
  the C x T prompts are encoded as text, each class's T prompt embeddings are averaged
  and the mean is L2-normalised again: one unit vector per class (the ensemble).
* **Prediction.** An image's class scores are dot products with those vectors; its top-k
  classes come from `search.sharded_topk` (the class vectors are the gallery, sharded
  over the mesh), which orders equal scores by class index.
* **Reports.** Top-1 and top-5 accuracy (percent of images whose class is among their
  first 1 / 5 predictions; top-5 is top-min(5, C)), mean per-class recall (the top-1
  recall of each class that has images, averaged over those classes; equal to top-1 on a
  balanced set) and the confusion counts of the top-1 predictions.

Class names and templates are text files, one entry per line (`data/README.md` cites
their sources): `imagenet` (the 1000 ImageNet-1k names), templates `clip` (CLIP's 80),
`single` ("{}") and `synthetic` (for the synthetic shapes); any other value is a path.
"""

import importlib.resources
import pathlib
from typing import Sequence

import numpy as np

from cookie_jax.eval import search

CLASS_NAME_FILES = {'imagenet': 'imagenet_classes.txt'}
TEMPLATE_FILES = {'clip': 'clip_templates.txt', 'single': 'single_template.txt',
                  'synthetic': 'synthetic_templates.txt'}
TOP_K = 5


def _lines(name: str, files: dict, what: str) -> list[str]:
  if name in files:
    text = importlib.resources.files('cookie_jax.eval').joinpath(
        'data', files[name]).read_text(encoding='utf-8')
  else:
    path = pathlib.Path(name).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'{what}={name!r}: neither a shipped list ({sorted(files)}) '
                              'nor a file; give a text file with one entry per line.')
    text = path.read_text(encoding='utf-8')
  lines = [line.strip() for line in text.splitlines()]
  lines = [line for line in lines if line]
  if not lines:
    raise ValueError(f'{what}={name!r} has no entries (one per line expected).')
  return lines


def load_class_names(name: str) -> list[str]:
  """'imagenet' or a file with one class name per line, in class-index order."""
  return _lines(name, CLASS_NAME_FILES, '--class_names')


def load_templates(name: str) -> list[str]:
  """'clip', 'single', 'synthetic' or a file with one template per line, each holding
  exactly one '{}' where the class name goes."""
  templates = _lines(name, TEMPLATE_FILES, '--templates')
  bad = [t for t in templates if t.count('{}') != 1]
  if bad:
    raise ValueError(f'--templates={name!r}: every template needs exactly one {{}} for the '
                     f'class name; {len(bad)} do not, e.g. {bad[0]!r}.')
  return templates


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """The C x T prompts, class-major: class 0 in every template, then class 1, ..."""
  if not class_names or not templates:
    raise ValueError(f'Need at least one class name and one template; got '
                     f'{len(class_names)} and {len(templates)}.')
  return [t.replace('{}', name) for name in class_names for t in templates]


def ensemble(prompt_embeddings, num_classes: int) -> np.ndarray:
  """[C, D] unit class vectors: the mean of each class's prompt embeddings (class-major
  rows, as `prompts` orders them), L2-normalised."""
  emb = search.as_embeddings(prompt_embeddings, 'prompt embeddings')
  if num_classes < 1 or emb.shape[0] % num_classes:
    raise ValueError(f'{emb.shape[0]} prompt embeddings do not split into {num_classes} '
                     'classes of equal template counts.')
  mean = emb.reshape(num_classes, -1, emb.shape[1]).mean(axis=1)
  norm = np.linalg.norm(mean, axis=1, keepdims=True)
  if np.any(norm == 0):
    raise ValueError('A class\'s prompt embeddings average to zero, so it has no direction; '
                     'use other templates.')
  return (mean / norm).astype(np.float32)


def classify(image_embeddings, class_embeddings, *, k: int = TOP_K, mesh=None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(scores [N, k'], classes [N, k']) with k' = min(k, C), best first, for every image;
  the class vectors are sharded over `mesh` (None = one device)."""
  classes = search.as_embeddings(class_embeddings, 'class embeddings')
  gallery = search.prepare_gallery(classes, mesh)
  return search.sharded_topk(image_embeddings, gallery, min(k, classes.shape[0]))


def accuracy(top_classes, labels, num_classes: int) -> dict:
  """Top-1 / top-5 accuracy and mean per-class recall (percent), the per-class counts and
  recalls, and `confusion` [C, C] int (row: true class, column: top-1 prediction)."""
  top = np.asarray(top_classes)
  labels = np.asarray(labels, np.int64)
  if top.ndim != 2 or top.shape[0] != labels.shape[0] or top.shape[0] == 0:
    raise ValueError(f'Need top classes [N, k] for the N={labels.shape[0]} labels; got '
                     f'shape {top.shape}.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'Labels lie in [{labels.min()}, {labels.max()}]; there are '
                     f'{num_classes} classes.')
  hit1 = top[:, 0] == labels
  hitk = np.any(top[:, :TOP_K] == labels[:, None], axis=1)
  counts = np.bincount(labels, minlength=num_classes)
  correct = np.bincount(labels, weights=hit1, minlength=num_classes)
  present = counts > 0
  recall = np.where(present, 100.0 * correct / np.maximum(counts, 1), np.nan)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, top[:, 0]), 1)
  k = min(TOP_K, num_classes)
  return {'top1': float(100.0 * hit1.mean()), 'top5': float(100.0 * hitk.mean()),
          'mean_per_class_recall': float(np.nanmean(recall)),
          'chance_top1': 100.0 / num_classes, 'chance_top5': 100.0 * k / num_classes,
          'class_counts': counts, 'class_recall': recall, 'confusion': confusion}


def most_confused(confusion, class_names: Sequence[str], n: int = 6) -> list[dict]:
  """The `n` largest off-diagonal counts: {true, predicted (indices), true_name,
  predicted_name, count, share (percent of the true class's images)}."""
  conf = np.array(confusion, np.int64)
  np.fill_diagonal(conf, 0)
  order = np.argsort(-conf, axis=None, kind='stable')[:n]
  totals = np.asarray(confusion).sum(axis=1)
  out = []
  for flat in order:
    t, p = divmod(int(flat), conf.shape[1])
    if conf[t, p] == 0:
      break
    out.append({'true': t, 'predicted': p, 'true_name': class_names[t],
                'predicted_name': class_names[p], 'count': int(conf[t, p]),
                'share': float(100.0 * conf[t, p] / totals[t])})
  return out
