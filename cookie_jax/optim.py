"""AdamW with warmup + cosine / linear / constant decay, a weight-decay mask and clipping."""

import jax
import ml_collections
import optax

from cookie_jax.tree_paths import key_name

# Parameters that are positions, tokens or scales rather than weights, and the towers'
# transformers-compatible poolers (unused by COOKIE, so decay would only erode imported
# weights): never decayed. `probe` is SigLIP's pooling query, a token like cls_token.
NO_DECAY_NAMES = ('position_embeddings', 'cls_token', 'register_tokens', 'mask_token',
                  'probe', 'modality_embedding', 'log_logit_scale', 'pooler')


def unused_parts(model_cfg) -> tuple[str, ...]:
  """Parameter-path prefixes the model keeps but never calls, spared decay like the
  poolers: SigLIP's attention-pooling head (`vision/head`) unless model.image_pool='tower'
  pools with it; kept only so that an imported tower exports whole."""
  return ('vision/head',) if model_cfg.get('image_pool', 'cls') != 'tower' else ()


# optim.schedule -> (cfg, decay_steps) -> the schedule after the linear warmup. The one
# list of allowed schedules (config.validate_config checks against it).
SCHEDULES = {
    'cosine': lambda cfg, n: optax.cosine_decay_schedule(cfg.lr, n, alpha=cfg.end_lr_factor),
    'linear': lambda cfg, n: optax.linear_schedule(cfg.lr, cfg.lr * cfg.end_lr_factor, n),
    'constant': lambda cfg, n: optax.constant_schedule(cfg.lr),
}


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int
                           ) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f'config.optim.schedule={cfg.schedule!r}: use one of '
                     f'{list(SCHEDULES)}.')
  after = SCHEDULES[cfg.schedule](cfg, decay_steps)
  if warmup == 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, warmup), after], boundaries=[warmup])


def decay_mask(params, unused=()):
  """True where weight decay applies: matrices and kernels, not biases, norms, positions,
  the class, register, mask and probe tokens, modality vectors or the temperature, nor
  anything under the path prefixes `unused` (`unused_parts`)."""
  def keep(path, leaf):
    names = [key_name(k) for k in path]
    joined = '/'.join(map(str, names))
    return (leaf.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)
            and not any(joined == p or joined.startswith(p + '/') for p in unused))
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, freeze=(),
                   unused=()) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ clipping) and its schedule; `freeze` (config `train.freeze`) locks the
  parameters it matches: no update, no optimiser state, no decay (cookie_jax/freeze.py);
  `unused` (`unused_parts(config.model)`) are not decayed."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=lambda p: decay_mask(p, unused)))
  tx = optax.chain(*parts)
  if freeze:
    from cookie_jax import freeze as freeze_lib  # pylint: disable=g-import-not-at-top
    tx = freeze_lib.locked_optimizer(tx, tuple(freeze))
  return tx, schedule
