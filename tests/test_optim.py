"""The optimiser room: warmup and decay schedules, the weight-decay mask, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cookie_jax import optim
from cookie_jax.models import presets
from cookie_jax.config import ConfigError, default_config, validate_config


def _cfg(schedule, **kw):
  cfg = default_config().optim
  cfg.schedule, cfg.lr, cfg.warmup_steps, cfg.end_lr_factor = schedule, 1.0, 4, 0.1
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize('schedule,expected', [
    # warmup 0 -> 1 over 4 steps, then decay over the 8 left to end_lr_factor = 0.1
    ('cosine', [0.0, 0.25, 0.5, 0.75, 1.0] +
     [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t / 8)) for t in range(1, 9)]),
    ('linear', [0.0, 0.25, 0.5, 0.75, 1.0] + [1.0 - 0.9 * t / 8 for t in range(1, 9)]),
    ('constant', [0.0, 0.25, 0.5, 0.75] + [1.0] * 9),
])
def test_schedules(schedule, expected):
  lr = optim.learning_rate_schedule(_cfg(schedule), total_steps=12)
  np.testing.assert_allclose([float(lr(s)) for s in range(13)], expected, atol=1e-6)


def test_the_allowed_schedules_are_the_table_the_config_checks():
  assert set(optim.SCHEDULES) == {'cosine', 'linear', 'constant'}
  config = default_config()
  config.optim.schedule = 'step'
  with pytest.raises(ConfigError, match=r"optim\.schedule='step': use 'cosine', 'linear' "
                                        r"or 'constant'"):
    validate_config(config)
  with pytest.raises(ValueError, match=r"schedule='step'"):
    optim.learning_rate_schedule(_cfg('step'), 10)


def test_decay_mask_spares_biases_norms_positions_and_the_temperature():
  params = {'layer': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)},
            'norm': {'scale': jnp.ones(3)},
            'position_embeddings': jnp.ones((4, 3)), 'log_logit_scale': jnp.ones(()),
            'pooler': {'kernel': jnp.ones((3, 3))}}
  mask = optim.decay_mask(params)
  assert mask == {'layer': {'kernel': True, 'bias': False}, 'norm': {'scale': False},
                  'position_embeddings': False, 'log_logit_scale': False,
                  'pooler': {'kernel': False}}


def test_clipping_bounds_the_update_of_a_huge_gradient():
  cfg = _cfg('constant', warmup_steps=0, clip_norm=1.0, weight_decay=0.0)
  tx, _ = optim.make_optimizer(cfg, 10)
  params = {'w': jnp.zeros((4, 4))}
  state = tx.init(params)
  small, _ = tx.update({'w': jnp.full((4, 4), 1e-3)}, state, params)
  huge, _ = tx.update({'w': jnp.full((4, 4), 1e6)}, state, params)
  # Adam normalises the size away, and clipping keeps the huge gradient finite: equal steps.
  np.testing.assert_allclose(np.asarray(huge['w']), np.asarray(small['w']), rtol=1e-3)
  assert np.all(np.isfinite(np.asarray(huge['w'])))


def _decayed(config):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from cookie_jax import models  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(
      models.init_model(config.model, 0))))
  mask = optim.decay_mask(abstract, optim.unused_parts(config.model))
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): m
          for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}


def test_decay_mask_of_siglip_and_dinov2_layouts_spares_tokens_and_the_unused_head():
  config = default_config('tiny')
  config.model.vision.update(presets.SIGLIP_LAYOUT)
  config.model.image_pool = 'mean'
  decayed = _decayed(config)
  head = [n for n in decayed if n.startswith('vision/head/')]
  assert 'vision/head/probe' in head and 'vision/head/fc1/kernel' in head
  # Unused (COOKIE pools on its own): kept only to export whole, like the poolers.
  assert not any(decayed[n] for n in head), head
  assert decayed['vision/patch_embeddings/kernel']
  # Pooling with the tower's head: its weights are weights; the probe is a token.
  config.model.image_pool, config.model.shared.depth = 'tower', 0
  decayed = _decayed(config)
  assert decayed['vision/head/fc1/kernel'] and decayed['vision/head/in_proj/kernel']
  assert not decayed['vision/head/probe']
  config = default_config('tiny')
  config.model.vision.update(presets.DINOV2_LAYOUT, registers=2)
  decayed = _decayed(config)
  assert not decayed['vision/register_tokens'] and not decayed['vision/mask_token']
  assert not decayed['vision/cls_token'] and decayed['vision/patch_embeddings/kernel']
