"""Zero-shot classification of a run's checkpoint: `zeroshot_checkpoint(config, workdir)`
(`launch/eval.py --task=zeroshot`).

The image set is, in this order of choice:
  * `image_folder`: a local ImageFolder (root/<class>/<image>), class names from folders;
  * `dataset`: a prepared tfds dataset with a `ClassLabel` feature (`label_key`), class
    names from that feature (WordNet ids of ImageNet-1k become the shipped names);
  * nothing, for a run on the synthetic shapes: the synthetic zero-shot set
    (`cookie_jax/data/builders/zeroshot_shapes.py`), 30 colour-shape classes, with the
    `synthetic` templates.

It writes into WORKDIR/eval/ (process 0 only):
  zeroshot-<set>-<split>-<step>.json             top-1, top-5, mean per-class recall,
                                                 chance, per-class recall, confusions;
  zeroshot-<set>-<split>-<step>-confusions.png   the most-confused class pairs with
                                                 example images.
"""

import re

from absl import logging
import jax
import numpy as np

from cookie_jax import files, sharding
from cookie_jax.config import ConfigError
from cookie_jax.eval import encoder as encoder_lib
from cookie_jax.eval import zeroshot
from cookie_jax.metric_writer import write_json

CONFUSIONS_SHOWN = 6
EXAMPLES_PER_CONFUSION = 5
SKIPPED_NAMED = 20


def output_paths(workdir: str, name: str, split: str, step: int,
                 label_key: str = 'label') -> dict[str, str]:
  """{'json', 'confusions'}: WORKDIR/eval/zeroshot-<name>-<split>-<step>.* (the set named
  <name>.<label_key> when the label feature is not 'label')."""
  clean = lambda s: re.sub(r'[^A-Za-z0-9_.+-]+', '_', s).strip('_') or 'set'
  if label_key != 'label':
    name = f'{name}.{label_key}'
  base = files.join(workdir, 'eval', f'zeroshot-{clean(name)}-{clean(split)}-{step}')
  return {'json': f'{base}.json', 'confusions': f'{base}-confusions.png'}


def _synthetic_set(config, split):
  from cookie_jax.data import sources  # pylint: disable=g-import-not-at-top
  if config.data.builder != 'synthetic':
    raise ConfigError(
        f'--task=zeroshot needs --dataset (a tfds dataset with a ClassLabel feature) or '
        f'--image_folder; only runs on the synthetic shapes (this run: '
        f"config.data.builder={config.data.builder!r}) have a default zero-shot set.")
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.builder = 'synthetic_zeroshot'
  return sources.get_builder(data_cfg), split or 'test'


def image_set(config, *, dataset: str = '', image_folder: str = '', split: str = '',
              label_key: str = 'label', data_dir: str = '', batch_size: int, mesh=None):
  """(the labelled image set, default templates name) for the arguments above."""
  from cookie_jax.data import classification  # pylint: disable=g-import-not-at-top  # TF
  view = dict(image_size=config.model.vision.image_size, mean=config.data.mean,
              std=config.data.std, batch_size=batch_size)
  rows = dict(mesh=mesh)  # which rows of each batch this process reads (tfds sets)
  try:
    if image_folder:
      return classification.ImageFolder(image_folder, **view), 'clip'
    if dataset:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        builder = tfds.builder(dataset, data_dir=data_dir or config.data.data_dir or None)
      except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(f'--dataset={dataset!r}: tfds knows no such dataset. Give a '
                          "prepared tfds dataset (e.g. 'imagenet2012', 'cifar10') or "
                          '--image_folder=ROOT.') from None
      if not builder.is_prepared():
        raise FileNotFoundError(
            f'--dataset={dataset!r} is not prepared in {builder.data_dir}; nothing is '
            f'downloaded here. Prepare it first, e.g. `tfds build {dataset}`.')
      return classification.TfdsClassification(builder, split or 'test', label_key=label_key,
                                                **view, **rows), 'clip'
    builder, split = _synthetic_set(config, split)
    return classification.TfdsClassification(builder, split, label_key=label_key,
                                              **view, **rows), 'synthetic'
  except ValueError as e:
    raise ConfigError(str(e)) from None


def class_names_of(data, class_names: str = '') -> tuple[list[str], str]:
  """(prompt-ready names, where they came from)."""
  from cookie_jax.data import classification  # pylint: disable=g-import-not-at-top
  if class_names:
    names, source = zeroshot.load_class_names(class_names), class_names
  elif classification.looks_like_imagenet(data.class_names):
    names, source = zeroshot.load_class_names('imagenet'), 'imagenet (WordNet ids mapped)'
  else:
    names, source = data.class_names, 'dataset'
  if len(names) != len(data.class_names):
    raise ConfigError(f'--class_names={class_names!r} has {len(names)} names but '
                      f'{data.name} has {len(data.class_names)} classes.')
  return [classification.readable_name(n) for n in names], source


def evaluate_classifier(encoder, data, names, templates, *, progress=True) -> dict:
  """Encodes the prompts and the images once and returns the metrics and predictions."""
  prompts = zeroshot.prompts(names, templates)
  logging.info('Encoding %d prompts (%d classes x %d templates).', len(prompts), len(names),
               len(templates))
  classes = zeroshot.ensemble(encoder.encode_texts(prompts, progress=progress), len(names))
  images = encoder.encode_images(data.image_batches(), progress=progress,
                                 total=data.num_batches)
  kept = np.flatnonzero(data.kept)
  if len(images) != len(kept):
    raise ValueError(f'Encoded {len(images)} images but {len(kept)} were read.')
  scores, top = zeroshot.classify(images, classes, mesh=encoder.mesh)
  labels = data.labels[kept]
  metrics = zeroshot.accuracy(top, labels, len(names))
  return {'metrics': metrics, 'top': top, 'scores': scores, 'labels': labels, 'rows': kept}


def _examples(out, confusions):
  """Image rows per confusion: misclassified ones, then one correct image of the class
  it was taken for (or None)."""
  top1, labels, rows = out['top'][:, 0], out['labels'], out['rows']
  chosen = []
  for c in confusions:
    wrong = rows[(labels == c['true']) & (top1 == c['predicted'])][:EXAMPLES_PER_CONFUSION]
    right = rows[(labels == c['predicted']) & (top1 == c['predicted'])][:1]
    chosen.append((wrong.tolist(), int(right[0]) if right.size else None))
  return chosen


def _draw(path, data, config, out, confusions, title):
  from cookie_jax.eval import pictures  # pylint: disable=g-import-not-at-top
  chosen = _examples(out, confusions)
  pixels = data.images_at([r for wrong, right in chosen for r in wrong + [right]
                           if r is not None])
  view = lambda r: pictures.to_uint8(pixels[r], config.data.mean, config.data.std)
  rows = [pictures.Confusion(true_name=c['true_name'], predicted_name=c['predicted_name'],
                             count=c['count'], share=c['share'],
                             examples=[view(r) for r in wrong if r in pixels],
                             reference=view(right) if right in pixels else None)
          for c, (wrong, right) in zip(confusions, chosen)]
  pictures.draw_confusions(path, rows, title=title)


def zeroshot_checkpoint(config, workdir: str, *, step: int | None = None, dataset: str = '',
                        image_folder: str = '', split: str = '', label_key: str = 'label',
                        class_names: str = '', templates: str = '', data_dir: str = '',
                        progress: bool = True, pictures: bool = True) -> dict:
  """Zero-shot top-1 / top-5 / mean per-class recall of step `step` (default: the latest)
  of the run in `workdir`; `config` None = the one saved with the checkpoint. Returns
  what the JSON holds, plus `files`."""
  # The image set, names and templates first: a mistake there is reported before the
  # checkpoint is read.
  step, config = encoder_lib.run_config(workdir, step=step, config=config)
  data, default_templates = image_set(config, dataset=dataset, image_folder=image_folder,
                                      split=split, label_key=label_key, data_dir=data_dir,
                                      batch_size=config.eval.batch_size,
                                      mesh=sharding.make_mesh(config.mesh))
  names, names_source = class_names_of(data, class_names)
  template_list = zeroshot.load_templates(templates or default_templates)
  encoder = encoder_lib.from_run(workdir, step=step, config=config)
  out = evaluate_classifier(encoder, data, names, template_list, progress=progress)
  m = out['metrics']
  confusions = zeroshot.most_confused(m['confusion'], names, CONFUSIONS_SHOWN)
  result = {
      'task': 'zeroshot', 'step': step, 'dataset': data.name, 'split': data.split,
      'label_key': getattr(data, 'label_key', 'folder'), 'num_images': int(len(out['rows'])),
      'num_classes': len(names), 'templates': templates or default_templates,
      'num_templates': len(template_list), 'class_names_from': names_source,
      **{k: m[k] for k in ('top1', 'top5', 'mean_per_class_recall', 'chance_top1',
                           'chance_top5')},
      'per_class': [{'name': n, 'images': int(c), 'recall': None if np.isnan(r) else float(r)}
                    for n, c, r in zip(names, m['class_counts'], m['class_recall'])],
      'most_confused': confusions,
      'num_skipped': len(data.skipped),
      'skipped': [{'path': p, 'error': e} for p, e in data.skipped[:SKIPPED_NAMED]],
  }
  if data.skipped:
    logging.warning('Skipped %d unreadable images, e.g. %s', len(data.skipped),
                    data.skipped[:3])
  paths = output_paths(workdir, data.name, data.split, step, getattr(data, 'label_key', 'label'))
  write_json(paths['json'], result)
  result['files'] = paths if pictures and confusions else {'json': paths['json']}
  if pictures and confusions and jax.process_index() == 0:
    title = (f'{data.name} {data.split}, step {step}: zero-shot top-1 {m["top1"]:.1f}% '
             f'(chance {m["chance_top1"]:.1f}%), {len(names)} classes, '
             f'{len(template_list)} templates')
    _draw(paths['confusions'], data, config, out, confusions, title)
  logging.info('Wrote %s', ', '.join(result['files'].values()))
  return result


def summary(result: dict) -> str:
  """A few lines for the console."""
  lines = [f"zero-shot {result['dataset']} {result['split']}, step {result['step']} "
           f"({result['num_images']} images, {result['num_classes']} classes, "
           f"{result['num_templates']} templates '{result['templates']}')",
           f"  top-1 {result['top1']:.2f}%  (chance {result['chance_top1']:.2f}%)",
           f"  top-5 {result['top5']:.2f}%  (chance {result['chance_top5']:.2f}%)",
           f"  mean per-class recall {result['mean_per_class_recall']:.2f}%"]
  if result['num_skipped']:
    lines.append(f"  skipped {result['num_skipped']} unreadable images, e.g. "
                 f"{result['skipped'][0]['path']}")
  lines += [f'  wrote {path}' for path in result.get('files', {}).values()]
  return '\n'.join(lines)
