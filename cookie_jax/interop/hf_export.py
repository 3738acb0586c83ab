"""PyTorch / transformers checkpoints out: a trained COOKIE model as

  OUT/text_encoder/    a `transformers.BertModel` folder (+ the tokenizer files), or the
                       RobertaModel / XLMRobertaModel of the tower's options (hf_text.py),
  OUT/image_encoder/   a `transformers.ViTModel` folder (+ preprocessor_config.json), or
                       the CLIPVisionModel / SiglipVisionModel / Dinov2Model(WithRegisters)
                       of the tower's layout (hf_vision.py),
  OUT/cookie.safetensors + OUT/cookie_config.json
                       the shared transformer, projection heads and temperature,
  OUT/torch_model.py   `CookieTorchModel`, which loads all of it with torch alone;
  OUT/config.json, OUT/model.safetensors, ...  the whole model for
                       `AutoModel.from_pretrained(OUT, trust_remote_code=True)` and
                       transformers' zero-shot pipeline, with its tokenizer, image
                       processor and processor (`hf_automodel.py`),
  OUT/clip_benchmark_cookie.py  the model with open_clip's interface, for CLIP_benchmark,
  OUT/README.md        the model card (`model_card.py`).

Tower weights use transformers' original (4.x) key layout, which both 4.x and 5.x load.
Every tensor is written by the rules of `keys.py`, the same ones the importer reads.

OUT may be a `gs://` folder: safetensors and transformers' `save_pretrained` write local
files only, so the export is written to a local temporary folder and copied there
(`files.local_dir`).
"""

import json
import os
import pathlib
import shutil

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np

from cookie_jax import files
from cookie_jax.interop import hf_automodel, hf_text, hf_vision, keys, model_card
from cookie_jax.models import abstract_model
from cookie_jax.models.vit import prefix_tokens

FORMAT = 'cookie_jax.torch/1'
COOKIE_CONFIG = 'cookie_config.json'
COOKIE_WEIGHTS = 'cookie.safetensors'


def bert_config(text_cfg, *, pad_token_id: int = 0) -> dict:
  """config.json of the transformers class of our text tower (`BertModel` for the
  default options; RoBERTa, XLM-R: hf_text.py) with its sizes."""
  return hf_text.config_json(text_cfg, pad_token_id=pad_token_id)


def vit_config(vision_cfg) -> dict:
  """config.json of the transformers class of our image tower's layout (`ViTModel` for the
  default one; CLIP, SigLIP, DINOv2: hf_vision.py) with its sizes."""
  return hf_vision.config_json(vision_cfg)


def state_dict(params, rules) -> dict[str, np.ndarray]:
  """{torch key: float32 array} of the parameters the rules name."""
  return {key: keys.to_torch(keys.get_path(params, path), layout) for key, path, layout in rules}


def _write_json(path: pathlib.Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=2, sort_keys=True) + '\n', encoding='utf-8')


def _default_file_mode() -> int:
  """The mode `open()` gives a new file here: 0o666 less the umask (0o644 with 022)."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def _save_safetensors(tensors: dict, path: pathlib.Path) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  # transformers refuses a safetensors file without format metadata.
  save_file(tensors, str(path), metadata={'format': 'pt'})
  # safetensors writes through a private temporary file (mode 0o600); give the export
  # the permissions of every other file in it.
  os.chmod(path, _default_file_mode())


def write_tower(params, tower: str, tower_cfg, out_dir, *, pad_token_id: int = 0) -> None:
  """One tower (`params['text']` or `params['vision']`) as a transformers folder."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if tower == 'text':
    config, rules = bert_config(tower_cfg, pad_token_id=pad_token_id), keys.bert_rules(
        tower_cfg.depth)
  else:
    config = vit_config(tower_cfg)
    rules = hf_vision.rules(hf_vision.family(tower_cfg), tower_cfg)
  _write_json(out / 'config.json', config)
  _save_safetensors(state_dict(params, rules), out / 'model.safetensors')


def write_tokenizer(tokenizer, out_dir, max_len: int) -> None:
  """tokenizer.json (fast), vocab.txt (slow / other tools) and the configs HF reads."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(out_dir)
  # Saved without our fixed padding and truncation: HF callers choose those per call.
  tok = Tokenizer.from_str(tokenizer.to_str())
  tok.no_padding()
  tok.no_truncation()
  tok.save(str(out / 'tokenizer.json'))
  vocab = tok.get_vocab()
  from cookie_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  style = tok_lib.special_style(vocab)
  specials = {k: v for k, v in tok_lib.SPECIALS[style].items() if v in vocab}
  _write_json(out / 'special_tokens_map.json', specials)
  if style == 'roberta':
    # RoBERTa's byte-level BPE, XLM-R's SentencePiece: tokenizer.json is the tokenizer.
    _write_json(out / 'tokenizer_config.json', dict(
        specials, bos_token=specials.get('cls_token'), eos_token=specials.get('sep_token'),
        tokenizer_class='PreTrainedTokenizerFast', model_max_length=max_len))
    return
  (out / 'vocab.txt').write_text(
      ''.join(t + '\n' for t in sorted(vocab, key=vocab.get)), encoding='utf-8')
  lowercase = bool(getattr(tok.normalizer, 'lowercase', True))
  _write_json(out / 'tokenizer_config.json', dict(
      specials, tokenizer_class='BertTokenizer', do_lower_case=lowercase,
      model_max_length=max_len))


def cookie_config(model_cfg, *, step=None, data_cfg=None) -> dict:
  """cookie_config.json: what `CookieTorchModel` needs beyond the two tower folders."""
  s = model_cfg.shared
  shared = None if s.depth == 0 else dict(
      width=s.width, depth=s.depth, heads=s.heads, mlp_dim=s.mlp_dim, dropout=s.dropout,
      attention_dropout=s.attention_dropout, modality_embedding=bool(s.modality_embedding),
      modality_layernorm=bool(s.modality_layernorm))
  out = dict(
      format=FORMAT, step=step, image_pool=model_cfg.image_pool,
      text_pool=model_cfg.text_pool, embed_dim=model_cfg.embed_dim,
      image_width=model_cfg.vision.width, text_width=model_cfg.text.width, shared=shared,
      # Tokens before the patches (class token, registers), which image_pool='mean' skips.
      image_prefix_tokens=prefix_tokens(model_cfg.vision),
      max_logit_scale=model_cfg.max_logit_scale,
      image_partner_dim=model_cfg.image_partner_dim,
      text_partner_dim=model_cfg.text_partner_dim, layer_norm_eps=1e-12,
      # A 'mean' video model (`encode_video`); None for an image-text model.
      video=(dict(num_frames=model_cfg.video.num_frames, temporal='mean')
             if model_cfg.video.num_frames > 0 else None))
  if data_cfg is not None:
    out.update(image_mean=list(data_cfg.mean), image_std=list(data_cfg.std),
               max_len=data_cfg.max_len)
  return out


def _preprocessor_config(vision_cfg, data_cfg) -> dict:
  # The eval view resizes the shorter side and centre-crops (bilinear, no antialias); for
  # square inputs that is this resize. Pixels normalised as in training.
  return dict(image_processor_type='ViTImageProcessor', do_resize=True,
              size=dict(height=vision_cfg.image_size, width=vision_cfg.image_size),
              resample=2, do_rescale=True, rescale_factor=1.0 / 255.0, do_normalize=True,
              image_mean=list(data_cfg.mean), image_std=list(data_cfg.std))


# Parameters that shape training only and are left out of an export.
TRAINING_ONLY = ('prototypes', 'concept_gcn', 'logit_bias')


def export_params(params, model_cfg, output, *, tokenizer=None, data_cfg=None,
                  step: int | None = None, config=None, figures=()) -> dict:
  """Writes an export of `params` (the model's pure dict) to `output` (local or gs://);
  returns the paths.

  `config` (the run's whole config) and `figures` (`model_card.run_figures`) go into the
  model card."""
  video = model_cfg.video
  if video.num_frames > 0 and video.temporal != 'mean':
    raise ValueError(
        f"config.model.video.temporal={video.temporal!r}: the PyTorch export has no "
        "temporal transformer, and leaving its weights out would change the model. Export "
        "a temporal='mean' video model (or an image-text model); the JAX checkpoint "
        'itself keeps every weight.')
  params = jax.device_get(params)
  with files.local_dir(output) as local:
    automodel = _write_export(params, model_cfg, pathlib.Path(local), tokenizer=tokenizer,
                              data_cfg=data_cfg, step=step, config=config, figures=figures)
  return {'output': files.join(output), 'text_encoder': files.join(output, 'text_encoder'),
          'image_encoder': files.join(output, 'image_encoder'),
          'cookie': files.join(output, COOKIE_WEIGHTS), 'tokenizer': tokenizer is not None,
          'step': step, 'automodel': automodel}


def _write_export(params, model_cfg, out: pathlib.Path, *, tokenizer, data_cfg,
                  step, config, figures) -> bool:
  """The files of `export_params` in the local folder `out`; True with the AutoModel."""
  pad_id = 0  # BertModel's; RoBERTa and XLM-R write their own (hf_text.config_json)
  if tokenizer is not None and tokenizer.token_to_id('[PAD]') is not None:
    pad_id = tokenizer.token_to_id('[PAD]')
  write_tower(params['text'], 'text', model_cfg.text, out / 'text_encoder', pad_token_id=pad_id)
  write_tower(params['vision'], 'vision', model_cfg.vision, out / 'image_encoder')
  if tokenizer is not None:
    write_tokenizer(tokenizer, out / 'text_encoder', data_cfg.max_len)
  if data_cfg is not None:
    _write_json(out / 'image_encoder' / 'preprocessor_config.json',
                _preprocessor_config(model_cfg.vision, data_cfg))
  _save_safetensors(state_dict(params, keys.cookie_rules(model_cfg)), out / COOKIE_WEIGHTS)
  training_only = [k for k in TRAINING_ONLY if params.get(k) is not None]
  if training_only:
    # Shape training only (CODER's clustering and concept branch); retrieval never uses them.
    logging.info('Not exported (training-only, unused at retrieval): %s.',
                 ', '.join(training_only))
  _write_json(out / COOKIE_CONFIG, cookie_config(model_cfg, step=step, data_cfg=data_cfg))
  # The loaders travel with the weights, so that a PyTorch-only machine needs no cookie_jax.
  for name in ('torch_model.py', 'image_processing_cookie.py', 'clip_benchmark_cookie.py'):
    shutil.copy(pathlib.Path(__file__).with_name(name), out / name)
  model_card.write(out, model_cfg, step=step, config=config, data_cfg=data_cfg,
                   figures=figures)
  automodel = hf_automodel.write_automodel(out, model_cfg, tokenizer=tokenizer,
                                           data_cfg=data_cfg, step=step)
  # transformers' save_pretrained writes its model.safetensors through safetensors too.
  for path in out.rglob('*.safetensors'):
    os.chmod(path, _default_file_mode())
  return automodel


def read_export(output) -> dict:
  """The parameters of an export as our pure dict (the inverse of `export_params`)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from cookie_jax.interop import hf_import  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(output)
  flat = {}
  for tower, folder in (('text', 'text_encoder'), ('vision', 'image_encoder')):
    _, tower_flat = hf_import.tower_weights(out / folder, tower, f'export {out}')
    flat.update({(tower,) + p: v for p, v in tower_flat.items()})
  cfg = json.loads((out / COOKIE_CONFIG).read_text(encoding='utf-8'))
  tensors = load_file(str(out / COOKIE_WEIGHTS))
  model_cfg = ml_collections.ConfigDict(dict(
      shared=cfg['shared'] or dict(depth=0),
      image_partner_dim=cfg['image_partner_dim'], text_partner_dim=cfg['text_partner_dim']))
  for key, path, layout in keys.cookie_rules(model_cfg):
    flat[path] = keys.from_torch(tensors[key], layout)
  tree = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


# Whole runs ---------------------------------------------------------------------------


def _load_tokenizer(data_cfg):
  try:
    if data_cfg.tokenizer and data_cfg.tokenizer != 'synthetic':
      # What `pipeline.load_tokenizer` does for a tokenizer folder, without TensorFlow.
      from cookie_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
      return tok_lib.finalize(
          tok_lib.tokenizer_from_path(data_cfg.tokenizer, lowercase=data_cfg.lowercase),
          data_cfg.max_len)
    # The synthetic datasets keep their vocabulary in their tfds metadata.
    from cookie_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return pipeline.load_tokenizer(data_cfg)
  except Exception as e:  # pylint: disable=broad-except
    # The weights are the export; a tokenizer that cannot be rebuilt here (TensorFlow
    # missing, dataset elsewhere) must not cost the user the rest.
    logging.warning('Tokenizer not exported (%s: %s). Copy tokenizer.json / vocab.txt of '
                    'config.data.tokenizer into text_encoder/ yourself.', type(e).__name__, e)
    return None


def _run_tokenizer(workdir: str, data_cfg):
  """The tokenizer the run saved (WORKDIR/tokenizer.json); for a run that predates it,
  the one `config.data` gives today, with a note."""
  from cookie_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  saved = tok_lib.read_run_tokenizer(workdir)
  if saved is not None:
    return tok_lib.finalize(saved, data_cfg.max_len)
  logging.warning("%s has no %s (the run predates it): exporting the tokenizer that "
                  "config.data gives today, which cannot be checked against the run's.",
                  tok_lib.run_root(workdir), tok_lib.RUN_TOKENIZER)
  return _load_tokenizer(data_cfg)


def export_run(workdir: str, output: str, step: int | None = None) -> dict:
  """Exports step `step` (default: the latest) of a training run's workdir to `output`."""
  from cookie_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from cookie_jax.config import config_from_dict, validate_config  # pylint: disable=g-import-not-at-top
  directory = ckpt_lib.find_checkpoints(workdir, accept_checkpoint_dir=True)
  step = ckpt_lib.resolve_step(directory, step)
  config = validate_config(config_from_dict(ckpt_lib.saved_config(directory, step)))
  abstract = nnx.to_pure_dict(abstract_model(config.model)[1])
  device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend='cpu')[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  params, step = ckpt_lib.load_params(directory, abstract, step)
  tokenizer = _run_tokenizer(workdir, config.data)
  from cookie_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  figures = model_card.run_figures(tok_lib.run_root(workdir), step)
  result = export_params(params, config.model, output, tokenizer=tokenizer,
                         data_cfg=config.data, step=step, config=config, figures=figures)
  logging.info('Exported %s step %d to %s.', directory, step, output)
  return result
