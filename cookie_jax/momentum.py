"""CODER's momentum encoder and key queues: the method state in `TrainState.extras`.

An EMA copy of the parameters embeds every batch (no dropout, no gradient); its keys are
enqueued after the update (all devices' keys, FIFO ring buffer), and the queues serve as
extra negatives of the cross-modal term, so the loss sees only keys of earlier batches.
`config.loss.momentum.queue_size = 0` turns it off; the state is then {}.
"""

from typing import Any

import jax
import jax.numpy as jnp

from cookie_jax.models import CookieModel


def init_state(loss_cfg, params, embed_dim: int) -> dict[str, Any]:
  """The train state's method-specific part: EMA parameters and the two key queues."""
  q = loss_cfg.momentum.queue_size
  if not q:
    return {}
  return {'ema_params': jax.tree.map(jnp.copy, params),
          'image_queue': jnp.zeros((q, embed_dim), jnp.float32),
          'text_queue': jnp.zeros((q, embed_dim), jnp.float32),
          # Keys enqueued so far (capped at the queue size): rows [0, count) are valid.
          'queue_count': jnp.zeros((), jnp.int32),
          # Where the next batch of keys goes (FIFO ring buffer).
          'queue_ptr': jnp.zeros((), jnp.int32)}


def momentum_keys(model: CookieModel, batch) -> tuple[jax.Array, jax.Array]:
  """The momentum encoder's normalised image and text keys of a batch (no dropout)."""
  image = model.encode_image(batch['image'])
  text = model.encode_text(batch['input_ids'], batch['attention_mask'])
  return jax.lax.stop_gradient(image), jax.lax.stop_gradient(text)


def queue_negatives(extras) -> dict[str, Any]:
  """The queues as replicated extra negatives of the cross-modal term."""
  q = extras['image_queue'].shape[0]
  valid = jnp.arange(q) < extras['queue_count']
  return {'cross_modal': {'a': {'queue': (extras['image_queue'], valid)},
                          'b': {'queue': (extras['text_queue'], valid)}}}


def update(extras, params, keys, momentum: float):
  """EMA step on the new parameters, then the batch's keys enqueued (oldest overwritten)."""
  image_keys, text_keys = keys
  n, q = image_keys.shape[0], extras['image_queue'].shape[0]
  ptr = extras['queue_ptr']
  ema = jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p,
                     extras['ema_params'], params)
  return {'ema_params': ema,
          'image_queue': jax.lax.dynamic_update_slice(extras['image_queue'], image_keys,
                                                      (ptr, 0)),
          'text_queue': jax.lax.dynamic_update_slice(extras['text_queue'], text_keys,
                                                     (ptr, 0)),
          'queue_count': jnp.minimum(extras['queue_count'] + n, q),
          'queue_ptr': (ptr + n) % q}


def state_shardings(extras, param_shardings, replicated):
  """EMA parameters are laid out like the parameters; queues and counters replicated."""
  return {k: param_shardings if k == 'ema_params' else replicated for k in extras}


def restart_from(extras, params):
  """`extras` with the EMA copy restarted from `params` (fine-tuning init)."""
  extras = dict(extras)
  if 'ema_params' in extras:
    extras['ema_params'] = jax.tree.map(jnp.copy, params)
  return extras
