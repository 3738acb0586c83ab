"""The model card of an export (OUT/README.md, what the Hugging Face Hub shows): what the
model is, how to use it, the recipe and data of its run, the run's evaluation figures for
the exported step where the workdir has them, and a licence field left for the user.

Figures are read from the run's workdir as training and `launch/eval.py` wrote them:
WORKDIR/test_retrieval.json (the test split at the end of training) and
WORKDIR/eval/retrieval-*.json, WORKDIR/eval/zeroshot-*.json, those of the exported step
only. No torch.
"""

import json

from etils import epath

from cookie_jax.interop import hf_vision
from cookie_jax.models import bert, vit

CARD = 'README.md'


def _figures_file(path) -> dict | None:
  try:
    return json.loads(epath.Path(path).read_text(encoding='utf-8'))
  except (OSError, ValueError):
    return None


def run_figures(workdir: str, step: int) -> list[dict]:
  """The evaluation results of `step` in the run's workdir, each with its `source`."""
  root = epath.Path(workdir)
  paths = [root / 'test_retrieval.json']
  if (root / 'eval').is_dir():
    paths += sorted((root / 'eval').glob('retrieval-*.json'))
    paths += sorted((root / 'eval').glob('zeroshot-*.json'))
  out = []
  for path in paths:
    result = _figures_file(path) if path.is_file() else None
    if isinstance(result, dict) and result.get('step') == step:
      out.append(dict(result, source=str(path.relative_to(root))))
  return out


def _retrieval_row(r: dict) -> str | None:
  visual = 'video' if 'v2t_r1' in r else 'image'
  to_v, from_v = ('v2t', 't2v') if visual == 'video' else ('i2t', 't2i')
  if f'{to_v}_r1' not in r:
    return None
  recall = lambda p: ' / '.join(f"{r[f'{p}_r{k}']:.1f}" for k in (1, 5, 10))
  split = r.get('split', 'test')
  sizes = (f", {r['num_images']} {visual}s, {r['num_captions']} captions"
           if 'num_images' in r else '')
  layout = f", layout {r['layout']}" if r.get('layout', 'full') != 'full' else ''
  return (f"| retrieval, {split} split{layout}{sizes} | {visual}→text R@1/5/10 "
          f"{recall(to_v)}; text→{visual} {recall(from_v)}; RSUM {r['rsum']:.1f} "
          f"| `{r['source']}` |")


def _zeroshot_row(r: dict) -> str:
  return (f"| zero-shot classification, {r['dataset']} {r['split']} ({r['num_images']} "
          f"images, {r['num_classes']} classes, templates '{r['templates']}') | top-1 "
          f"{r['top1']:.2f}%, top-5 {r['top5']:.2f}% (chance {r['chance_top1']:.2f}%) "
          f"| `{r['source']}` |")


def evaluation_section(figures: list[dict]) -> list[str]:
  rows = [_zeroshot_row(r) if r.get('task') == 'zeroshot' else _retrieval_row(r)
          for r in figures]
  rows = [row for row in rows if row]
  if not rows:
    return ['No evaluation figures of this step were found in the run\'s workdir '
            '(`test_retrieval.json`, `eval/*.json`); evaluate it with '
            '`python launch/eval.py --workdir=WORKDIR` and export again.']
  return ['| evaluation | result | from the run\'s |', '| --- | --- | --- |', *rows]


def _tower(t, name) -> str:
  return f'{name}: width {t.width}, depth {t.depth}, {t.heads} heads, MLP {t.mlp_dim}'


def model_lines(model_cfg) -> list[str]:
  v, t, s = model_cfg.vision, model_cfg.text, model_cfg.shared
  shared = ('none (a dual encoder)' if s.depth == 0 else
            f'width {s.width}, depth {s.depth}, {s.heads} heads, MLP {s.mlp_dim}')
  # The transformers classes the export writes (hf_vision.family, bert's hf_class).
  vision_class = hf_vision.CLASSES.get(vit.transformers_family(v), 'ViT')
  text_class = bert.options(t)['hf_class']
  lines = [f'- preset `{model_cfg.preset}`; embeddings of {model_cfg.embed_dim} dimensions, '
           f'pooling: image `{model_cfg.image_pool}`, text `{model_cfg.text_pool}`',
           f'- {_tower(v, f"image tower ({vision_class})")}, {v.image_size} px images in '
           f'{v.patch_size} px patches',
           f'- {_tower(t, f"text tower ({text_class})")}, vocabulary {t.vocab_size}',
           f'- weight-sharing transformer: {shared}']
  for side, init in (('text', model_cfg.get('text_init')), ('image', model_cfg.get('image_init'))):
    if init:
      lines.append(f'- {side} tower initialised from `{init}` (its licence applies too)')
  if model_cfg.video.num_frames > 0:
    lines.append(f'- video: {model_cfg.video.num_frames} frames, averaged')
  return lines


def recipe_lines(config) -> list[str]:
  tr, o, loss = config.train, config.optim, config.loss
  terms = [f"{name} (weight {loss[name].weight:g})"
           for name in ('cross_modal', 'textual', 'visual', 'cluster', 'concept')
           if name in loss and loss[name].weight > 0]
  return [f'- {tr.steps} steps of global batch {tr.batch_size}'
          + (f' ({tr.accum_steps} accumulated micro-batches)' if tr.accum_steps > 1 else '')
          + f', seed {config.seed}, compute dtype {config.model.dtype}',
          f'- AdamW, learning rate {o.lr:g} ({o.schedule}, {o.warmup_steps} warm-up steps), '
          f'betas {o.b1:g} / {o.b2:g}, weight decay {o.weight_decay:g}, gradient clip '
          f'{o.clip_norm:g}',
          f"- losses: {', '.join(terms) or 'none'}"
          + (f"; cross-modal form `{loss.cross_modal.form}`" if 'cross_modal' in loss else '')]


def data_lines(data_cfg) -> list[str]:
  b = data_cfg.builder
  source = {
      'synthetic': 'the synthetic shapes dataset that cookie_jax generates (no download)',
      'img2dataset': f"img2dataset shards from `{data_cfg.manual_dir}`"
                     + (f" (`{data_cfg.img2dataset.name}`)" if data_cfg.img2dataset.name else ''),
      'karpathy': f"the Karpathy split of `{data_cfg.get('karpathy_dataset', '')}`",
      'tfds': f"the tfds dataset `{data_cfg.get('tfds_name', '')}`",
      'msrvtt': f"MSR-VTT from `{data_cfg.manual_dir}`",
      'synthetic_video': 'the synthetic video set that cookie_jax generates (no download)',
  }.get(b, f'builder `{b}`')
  lines = [f'- training data: {source}']
  if data_cfg.get('mixture'):
    lines.append(f'- mixture: `{list(data_cfg.mixture)}`')
  lines.append(f'- text: the run\'s WordPiece tokenizer (`{data_cfg.tokenizer or "synthetic"}`),'
               f' at most {data_cfg.max_len} tokens, lowercase {bool(data_cfg.lowercase)}')
  lines.append(f'- images normalised with mean {list(data_cfg.mean)}, std {list(data_cfg.std)};'
               ' evaluation view: the shorter side resized (bilinear, no antialiasing), '
               'centre crop')
  return lines


def card(model_cfg, *, step=None, config=None, data_cfg=None, figures=()) -> str:
  """The text of OUT/README.md."""
  data_cfg = data_cfg if data_cfg is not None else (config.data if config else None)
  title = f"COOKIE {model_cfg.preset} (cookie_jax){f', step {step}' if step is not None else ''}"
  out = ['---',
         '# Yours to set: the licence your training data, any pretrained towers and your',
         '# own terms allow (e.g. apache-2.0, cc-by-4.0, other). The export cannot know it.',
         'license: unknown',
         'library_name: transformers',
         'pipeline_tag: zero-shot-image-classification',
         'tags: [cookie_jax, clip, image-text-retrieval, zero-shot-image-classification]',
         '---', '', f'# {title}', '',
         'A contrastive image-text model (COOKIE: a ViT image tower, a BERT text tower and a '
         'weight-sharing transformer over both, L2-normalised embeddings compared by cosine '
         'similarity), trained with cookie_jax in JAX and exported '
         'to PyTorch / transformers. The embeddings equal the JAX model\'s (fp32, tested '
         'to 1e-4).', '',
         '## Use', '', '```python',
         'from transformers import pipeline',
         "classifier = pipeline('zero-shot-image-classification', model=OUT, "
         'trust_remote_code=True)',
         "classifier(image, candidate_labels=['a dog', 'a cat'], "
         "hypothesis_template='a photo of {}.')", '',
         'from transformers import AutoModel, AutoProcessor',
         'model = AutoModel.from_pretrained(OUT, trust_remote_code=True)',
         'processor = AutoProcessor.from_pretrained(OUT, trust_remote_code=True)',
         "out = model(**processor(text=captions, images=images, return_tensors='pt', "
         'padding=True))',
         'out.logits_per_image  # [images, texts]; model.get_image_features / '
         'get_text_features: the embeddings', '```', '',
         'For [CLIP_benchmark](https://github.com/LAION-AI/CLIP_benchmark): '
         '`python OUT/clip_benchmark_cookie.py eval --model_type=cookie --pretrained=OUT '
         '--dataset=cifar10 --dataset_root=DATA --output=cifar10.json`.', '',
         '## Model', '', *model_lines(model_cfg), '']
  if config is not None:
    out += ['## Training recipe', '', *recipe_lines(config), '']
  if data_cfg is not None:
    out += ['## Data', '', *data_lines(data_cfg), '']
  out += ['## Evaluation', '', *evaluation_section(list(figures)), '',
          '## Licence', '',
          'Not set by the export: fill in `license:` at the top of this file with what the '
          'training data, any pretrained towers and your own terms allow.', '']
  return '\n'.join(out)


def write(out_dir, model_cfg, **kwargs) -> None:
  (epath.Path(out_dir) / CARD).write_text(card(model_cfg, **kwargs), encoding='utf-8')
