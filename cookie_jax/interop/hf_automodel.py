"""The transformers-native part of an export, so that from the folder OUT

    AutoModel.from_pretrained(OUT, trust_remote_code=True)           # modeling_cookie.CookieModel
    AutoTokenizer.from_pretrained(OUT)                               # the run's tokenizer
    AutoImageProcessor.from_pretrained(OUT, trust_remote_code=True)  # the eval view
    AutoProcessor.from_pretrained(OUT, trust_remote_code=True)       # both: text=, images=
    pipeline('zero-shot-image-classification', model=OUT, trust_remote_code=True)

work with no cookie_jax and no JAX installed, and `save_pretrained` / `push_to_hub` work
as for any transformers model. Written beside the tower folders of `hf_export`:

  OUT/config.json, OUT/model.safetensors   `CookieConfig` (auto_map) and the whole model;
  OUT/configuration_cookie.py, modeling_cookie.py, torch_model.py   its code;
  OUT/tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json;
  OUT/preprocessor_config.json, image_processing_cookie.py   the image processor;
  OUT/processor_config.json, processing_cookie.py   the two as one `CookieProcessor`.

The model is not written twice by hand: the export loads `CookieTorchModel` from the
tower folders and cookie.safetensors it has just written (the loader that
`torch_model.py` ships), places it in `CookieModel` and lets transformers'
`save_pretrained` write it, with transformers' own key names and code files. This part
needs torch; without it the export still writes everything else and says so.
"""

import json
import pathlib
import shutil
import tempfile

from absl import logging

from cookie_jax.interop import TORCH_CPU_INSTALL


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text(encoding='utf-8'))


def cookie_jax_section(model_cfg, data_cfg=None, step=None) -> dict:
  """What cookie_jax needs to rebuild the JAX model from the folder (`config.cookie_jax`)."""
  out = {'model': json.loads(model_cfg.to_json()), 'step': step}
  if data_cfg is not None:
    out['data'] = dict(mean=list(data_cfg.mean), std=list(data_cfg.std),
                       max_len=int(data_cfg.max_len), lowercase=bool(data_cfg.lowercase))
  return out


def image_processor(image_size: int, mean, std):
  """The `CookieImageProcessor` of the eval view at `image_size`."""
  from cookie_jax.interop.image_processing_cookie import CookieImageProcessor  # pylint: disable=g-import-not-at-top
  return CookieImageProcessor(size={'shortest_edge': int(image_size)},
                              crop_size={'height': int(image_size), 'width': int(image_size)},
                              image_mean=[float(m) for m in mean],
                              image_std=[float(s) for s in std])


def write_automodel(output, model_cfg, *, tokenizer=None, data_cfg=None,
                    step: int | None = None) -> bool:
  """Writes the AutoModel files into the export folder `output` (whose tower folders and
  cookie.safetensors are already written). Returns False, with a warning, without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    logging.warning('torch is not installed, so the AutoModel files (config.json, '
                    'model.safetensors, modeling_cookie.py) were not written; the tower '
                    'folders and torch_model.py were. Install the CPU build of torch (%s; '
                    'a plain `pip install torch` pulls a CUDA build of several GB) and '
                    'export again.', TORCH_CPU_INSTALL)
    return False
  # pylint: disable=g-import-not-at-top
  from cookie_jax.interop import hf_export
  from cookie_jax.interop.configuration_cookie import CookieConfig
  from cookie_jax.interop.image_processing_cookie import CookieImageProcessor
  from cookie_jax.interop.modeling_cookie import CookieModel
  from cookie_jax.interop.torch_model import CookieTorchModel
  # pylint: enable=g-import-not-at-top
  out = pathlib.Path(output)
  config = CookieConfig(
      text_config=_read_json(out / 'text_encoder' / 'config.json'),
      vision_config=_read_json(out / 'image_encoder' / 'config.json'),
      cookie=_read_json(out / hf_export.COOKIE_CONFIG),
      cookie_jax=cookie_jax_section(model_cfg, data_cfg, step))
  model = CookieModel(config)
  model.cookie.load_state_dict(CookieTorchModel.from_pretrained(out).state_dict())
  # Registered so that save_pretrained writes auto_map and copies the code files (with
  # their relative imports: configuration_cookie.py, torch_model.py). The zero-shot image
  # classification pipeline loads its model with this Auto class, as for CLIP and SigLIP.
  config.auto_map = {'AutoModelForZeroShotImageClassification': 'modeling_cookie.CookieModel'}
  CookieConfig.register_for_auto_class()
  CookieModel.register_for_auto_class('AutoModel')
  model.eval().save_pretrained(out)
  if tokenizer is not None and data_cfg is not None:
    hf_export.write_tokenizer(tokenizer, out, data_cfg.max_len)
  if data_cfg is not None:
    CookieImageProcessor.register_for_auto_class('AutoImageProcessor')
    image_proc = image_processor(model_cfg.vision.image_size, data_cfg.mean, data_cfg.std)
    image_proc.save_pretrained(out)
    if tokenizer is not None:
      write_processor(out, image_proc)
  return True


def write_processor(out: pathlib.Path, image_proc) -> None:
  """processor_config.json and processing_cookie.py: `AutoProcessor` takes text= and
  images= together, as CLIPProcessor does."""
  import transformers  # pylint: disable=g-import-not-at-top
  from cookie_jax.interop.processing_cookie import CookieProcessor  # pylint: disable=g-import-not-at-top
  CookieProcessor.register_for_auto_class()
  # Saved aside and only its own two files taken: transformers would write the tokenizer
  # files again, in its own form, over the ones `write_tokenizer` wrote.
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # what write_tokenizer wrote
    CookieProcessor(image_processor=image_proc, tokenizer=tokenizer).save_pretrained(tmp)
    for name in ('processor_config.json', 'processing_cookie.py'):
      shutil.copy(pathlib.Path(tmp) / name, out / name)
