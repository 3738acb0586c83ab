"""A tiny run for the tests of cookie_jax/eval: a checkpoint of random (non-degenerate)
weights, a WordPiece vocabulary file and a small synthetic dataset, all in a tmp folder.

No training: zero-shot and the index only read parameters, so random weights perturbed
away from their init (no LayerNorm at ones and zeros, no tied scores) test the wiring as
well as trained ones, in a second instead of a minute.
"""

import pathlib
import types

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax.config import default_config, validate_config
from cookie_jax.data.builders import scenes
from cookie_jax.models import init_model
from cookie_jax.step import TrainState

STEP = 5
WORDS = sorted(set(' '.join(
    list(scenes.COLOURS) + list(scenes.SHAPES) + list(scenes.REGIONS.values()) +
    ['a', 'an', 'one', 'single', 'small', 'large', 'big', 'little', 'placed', 'of', 'the',
     'left', 'right', 'above', 'below', 'to', 'two', 'three', 'circles', 'squares']).split()))


def tiny_config(root: pathlib.Path):
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + WORDS
  (root / 'vocab.txt').write_text('\n'.join(vocab) + '\n', encoding='utf-8')
  config = default_config('tiny')
  config.model.vision.image_size = 16
  config.model.vision.depth = config.model.text.depth = 1
  config.data.tokenizer = str(root / 'vocab.txt')
  config.data.data_dir = str(root / 'tfds')
  config.data.max_len = 16
  config.data.synthetic.update(dict(train_images=32, eval_images=24, image_size=32))
  config.eval.batch_size = 16
  return validate_config(config)


def random_params(model_cfg, seed: int = 0):
  rng = np.random.default_rng(seed)
  state = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: init_model(model_cfg, 0))))
  return jax.tree_util.tree_map_with_path(
      lambda path, s: ((path[-1].key == 'scale') +
                       rng.normal(0, 0.3, s.shape)).astype(np.float32), state)


def make_run(root: pathlib.Path, *, logit_scale: float | None = None
             ) -> types.SimpleNamespace:
  """A workdir holding one checkpoint (step STEP) with its config; `logit_scale` sets
  1 / temperature (random weights give about 1, and near-uniform class probabilities)."""
  root.mkdir(parents=True, exist_ok=True)
  config = tiny_config(root)
  params = random_params(config.model)
  if logit_scale is not None:
    params['log_logit_scale'] = np.log(np.float32(logit_scale)).astype(np.float32)
  workdir = root / 'run'
  ckpt = ckpt_lib.Checkpointer(str(workdir / 'checkpoints'), config.checkpoint)
  state = TrainState(step=jnp.asarray(STEP, jnp.int32), params=params, opt_state={},
                     nonfinite_step=jnp.asarray(-1, jnp.int32))
  ckpt.save(STEP, state, {}, config, force=True)
  ckpt.close()
  return types.SimpleNamespace(root=root, config=config, params=params, workdir=workdir)


def model_of(run):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(run.config.model, 0)))
  nnx.replace_by_pure_dict(state, run.params)
  return nnx.merge(graphdef, state)
