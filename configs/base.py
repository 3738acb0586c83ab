"""COOKIE recipes. Select one with `--config=configs/base.py:<variant>`.

Variants:
  tiny  - the tiny model on the synthetic set with a small batch; used by tests.
  base  - the pre-training recipe: ViT-B/16 + BERT-base + a 2-layer weight-sharing
          transformer, global batch 4096, bf16 compute, all three COOKIE losses.
"""

from cookie_jax.config import default_config

VARIANTS = ('tiny', 'base')


def get_config(arg: str | None = None):
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'Unknown variant {variant!r} of configs/base.py; '
                     f'choose one of {VARIANTS} (e.g. --config=configs/base.py:base).')
  if variant == 'tiny':
    config = default_config('tiny')
    config.train.batch_size = 32
    config.train.steps = 20
    config.eval.batch_size = 32
    return config

  config = default_config('base')
  config.model.dtype = 'bfloat16'
  config.model.remat = True
  config.loss.cross_modal.weight = 1.0
  config.loss.visual.weight = 0.5
  config.loss.textual.weight = 0.5
  config.data.max_len = 64
  config.train.batch_size = 4096
  config.train.steps = 100_000
  config.optim.lr = 5e-4
  config.optim.warmup_steps = 2_000
  config.optim.weight_decay = 0.2
  config.eval.batch_size = 1024
  # FSDP within a host's 8 accelerators, data parallel across hosts.
  config.mesh.data = -1
  config.mesh.fsdp = 8
  return config
