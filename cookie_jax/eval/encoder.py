"""What encodes images and texts for zero-shot classification and the image index: the
parameters of a training run's checkpoint, or of an export folder, placed on a mesh, with
the run's tokenizer and image preprocessing.

Both sources give an `Encoder`; its `encode_texts` and `encode_images` are
`cookie_jax.eval.protocol`'s sharded encoders (one jit over the mesh, batches padded and
masked), so every embedding equals what `launch/eval.py` computes for the same input.
"""

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import files, sharding
from cookie_jax.eval import protocol
from cookie_jax.models import abstract_model
from cookie_jax.config import ConfigError, config_from_dict, validate_config
from cookie_jax.data import tokenizer as tok_lib

DEFAULT_BATCH_SIZE = 256


@dataclasses.dataclass
class Encoder:
  """A model on a mesh with its tokenizer and eval view (size, mean, std)."""
  graphdef: Any
  params: Any
  mesh: jax.sharding.Mesh
  tokenizer: Any
  config: ml_collections.ConfigDict
  batch_size: int
  source: dict  # {'workdir', 'step'} or {'export'}: where the weights came from

  @property
  def model(self) -> protocol.Weights:
    return protocol.Weights(self.graphdef, self.params)

  @property
  def image_size(self) -> int:
    return int(self.config.model.vision.image_size)

  @property
  def mean(self) -> tuple:
    return tuple(self.config.data.mean)

  @property
  def std(self) -> tuple:
    return tuple(self.config.data.std)

  def text_batches(self, texts: Sequence[str]):
    """This process's rows of global batches of the tokenised `texts`, the last one
    padded and masked (as `pipeline.EvalData.text_batches`)."""
    tokens = tok_lib.encode(self.tokenizer, list(texts))
    total = math.ceil(len(texts) / self.batch_size) * self.batch_size
    rows = {k: np.zeros((total,) + v.shape[1:], v.dtype) for k, v in tokens.items()}
    for k, v in tokens.items():
      rows[k][:len(texts)] = v
    rows['mask'] = np.arange(total) < len(texts)
    mine = sharding.process_rows(self.mesh, self.batch_size)
    for lo in range(0, total, self.batch_size):
      yield {k: v[lo + mine] for k, v in rows.items()}

  def encode_texts(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
    """L2-normalised [len(texts), D]; every process gets all rows."""
    if not texts:
      raise ValueError('No texts to encode.')
    return protocol.encode_texts(self.model, self.text_batches(texts), self.mesh,
                                 progress=progress,
                                 total=math.ceil(len(texts) / self.batch_size))

  def encode_images(self, batches: Iterable[Mapping[str, Any]], *, progress: bool = False,
                    total: int | None = None) -> np.ndarray:
    """L2-normalised embeddings of the batch rows whose `mask` is True."""
    return protocol.encode_images(self.model, batches, self.mesh, progress=progress,
                                  total=total)


def _check_batch(config, batch_size: int) -> int:
  shards = sharding.batch_shards(sharding.make_mesh(config.mesh))
  if batch_size < 1 or batch_size % max(shards, jax.process_count()):
    raise ConfigError(f'--batch_size={batch_size}: the batch is split over {shards} '
                      f'devices; use a multiple of {shards}.')
  return batch_size


def run_config(workdir: str, *, step: int | None = None,
               config: ml_collections.ConfigDict | None = None
               ) -> tuple[int, ml_collections.ConfigDict]:
  """(step, config) of the checkpoint `from_run` would load, without loading it."""
  from cookie_jax.eval import run as eval_run  # pylint: disable=g-import-not-at-top
  directory = ckpt_lib.find_checkpoints(workdir)
  step, saved = eval_run.resolve_step(directory, step)
  return step, validate_config(saved if config is None else config,
                               num_devices=jax.device_count())


def from_run(workdir: str, *, step: int | None = None,
             config: ml_collections.ConfigDict | None = None,
             batch_size: int | None = None) -> Encoder:
  """Step `step` (default: the latest) of the run in `workdir`, with the config saved
  with it (or `config`, whose model must be the checkpoint's)."""
  from cookie_jax.eval import run as eval_run  # pylint: disable=g-import-not-at-top
  from cookie_jax.data import pipeline  # pylint: disable=g-import-not-at-top  # TF here
  directory = ckpt_lib.find_checkpoints(workdir)
  step, config = run_config(workdir, step=step, config=config)
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params = eval_run.restore_params(config, directory, step, mesh)
  size = _check_batch(config, batch_size or config.eval.batch_size)
  tokenizer = pipeline.load_tokenizer(config.data)
  tok_lib.check_run_tokenizer(workdir, tokenizer, 'encoding with this run')
  return Encoder(graphdef, params, mesh, tokenizer, config, size,
                 {'workdir': files.absolute(workdir), 'step': int(step)})


def export_config(path) -> ml_collections.ConfigDict:
  """The cookie_jax config an export folder was written from (its config.json), with
  the training-only parts that exports leave out switched off."""
  file = pathlib.Path(path) / 'config.json'
  if not file.is_file():
    raise FileNotFoundError(f'--export={str(path)!r} has no config.json; give a folder '
                            'written by `python launch/export_torch.py` (with torch '
                            'installed, which writes the AutoModel files).')
  saved = json.loads(file.read_text(encoding='utf-8')).get('cookie_jax')
  if not saved or 'model' not in saved:
    raise ValueError(f'{file} has no cookie_jax section; it was not written by '
                     'cookie_jax\'s export (or by an older one); export the run again.')
  config = config_from_dict({'model': saved['model'], 'data': saved.get('data', {})})
  config.model.num_prototypes = 0  # hf_export.TRAINING_ONLY: not in the export
  config.model.concept_gcn_depth = 0
  config.model.logit_bias = False  # SigLIP's bias: training-only too
  return config


def from_export(path, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Encoder:
  """The model of an export folder (`launch/export_torch.py --output=PATH`), read back
  into JAX (`hf_export.read_export`), with its tokenizer (PATH/tokenizer.json)."""
  from cookie_jax.interop import hf_export  # pylint: disable=g-import-not-at-top
  config = export_config(path)
  config.eval.batch_size = batch_size
  validate_config(config, num_devices=jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  graphdef, abstract = abstract_model(config.model)
  shardings = sharding.param_shardings(abstract, mesh)
  params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s),
                        hf_export.read_export(path), shardings)
  tokenizer = tok_lib.finalize(tok_lib.tokenizer_from_path(os.fspath(path)),
                               config.data.max_len)
  return Encoder(graphdef, params, mesh, tokenizer, config, _check_batch(config, batch_size),
                 {'export': files.absolute(path)})
