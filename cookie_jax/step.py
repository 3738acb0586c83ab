"""The train state, its sharded initialisation and the jitted train step.

Parameters live as a pure dict of arrays (the NNX state of `CookieModel`), so that the
state is a plain pytree for jit, optax and orbax; the module is rebuilt inside the step
with `nnx.merge`. Shardings come from the parameters' logical axes (cookie_jax.sharding).
"""

from typing import Any, Callable

import flax.struct
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import ml_collections
import optax

from cookie_jax import losses as losses_lib
from cookie_jax import optim, sharding
from cookie_jax.models import CookieModel, l2_normalize
from cookie_jax.models.layers import split_rng

LOSS_NAMES = ('cross_modal', 'visual', 'textual')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@flax.struct.dataclass
class Setup:
  """What is fixed for a run: the module's graph, the optimiser and the shardings."""
  graphdef: Any = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  schedule: Callable = flax.struct.field(pytree_node=False)
  mesh: Mesh = flax.struct.field(pytree_node=False)
  state_shardings: Any = flax.struct.field(pytree_node=False)


def init_model(model_cfg: ml_collections.ConfigDict, seed: int) -> CookieModel:
  return CookieModel(model_cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh
                       ) -> tuple[TrainState, Setup]:
  """Initialises the parameters and optimiser state directly in their shardings."""
  abstract_model = nnx.eval_shape(lambda: init_model(config.model, config.seed))
  graphdef, abstract_state = nnx.split(abstract_model)
  param_shardings = sharding.param_shardings(abstract_state, mesh)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)

  def init_fn():
    params = nnx.to_pure_dict(nnx.state(init_model(config.model, config.seed)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))

  abstract = jax.eval_shape(init_fn)
  state_shardings = TrainState(
      step=sharding.replicated(mesh), params=param_shardings,
      opt_state=sharding.opt_state_shardings(tx, abstract.opt_state, param_shardings, mesh))
  state = jax.jit(init_fn, out_shardings=state_shardings)()
  return state, Setup(graphdef=graphdef, tx=tx, schedule=schedule, mesh=mesh,
                      state_shardings=state_shardings)


def _need(batch, key, why):
  if key not in batch:
    raise ValueError(f"{why} needs batch['{key}'], which the input pipeline did not "
                     f'provide (batch has {sorted(batch)}).')
  return batch[key]


def loss_pairs(model: CookieModel, batch, rng, loss_cfg):
  """The (a, b) embedding pair and the logit scale of every loss term with weight > 0."""
  r_img, r_txt, r_img2, r_txt2 = split_rng(rng, 4)
  image = model.embed_image(batch['image'], rng=r_img)
  text = model.embed_text(batch['input_ids'], batch['attention_mask'], rng=r_txt)
  pairs, scales = {}, {}
  if loss_cfg.cross_modal.weight > 0:
    pairs['cross_modal'] = (l2_normalize(image), l2_normalize(text))
    scales['cross_modal'] = model.logit_scale()
  if loss_cfg.visual.weight > 0:
    if loss_cfg.visual.partner == 'augmented':
      view2 = _need(batch, 'image_view2', "loss.visual.partner='augmented'")
      pairs['visual'] = (l2_normalize(image), model.encode_image(view2, rng=r_img2))
    else:
      partner = _need(batch, 'image_partner', "loss.visual.partner='external'")
      pairs['visual'] = (model.image_partner(image),
                         l2_normalize(jax.lax.stop_gradient(partner)))
    scales['visual'] = jnp.float32(1.0 / loss_cfg.visual.temperature)
  if loss_cfg.textual.weight > 0:
    if loss_cfg.textual.partner == 'dropout':
      pairs['textual'] = (l2_normalize(text), model.encode_text(
          batch['input_ids'], batch['attention_mask'], rng=r_txt2))
    else:
      partner = _need(batch, 'text_partner', "loss.textual.partner='external'")
      pairs['textual'] = (model.text_partner(text),
                          l2_normalize(jax.lax.stop_gradient(partner)))
    scales['textual'] = jnp.float32(1.0 / loss_cfg.textual.temperature)
  return pairs, scales


def sharded_losses(mesh: Mesh):
  """`compute_losses` inside shard_map over the batch axes: global negatives, local logits."""
  def local(pairs, scales):
    return losses_lib.compute_losses(pairs, scales, axis_name=sharding.BATCH_AXES)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(sharding.BATCH_AXES), P()),
                       out_specs=P())


def make_loss_fn(config: ml_collections.ConfigDict, setup: Setup):
  """params, batch, rng -> (total, {term: value, 'logit_scale': s})."""
  loss_cfg = config.loss
  compute = sharded_losses(setup.mesh)

  def loss_fn(params, batch, rng):
    model = nnx.merge(setup.graphdef, params)
    pairs, scales = loss_pairs(model, batch, rng, loss_cfg)
    terms = compute(pairs, scales)
    total = sum(loss_cfg[name].weight * value for name, value in terms.items())
    return total, dict(terms, logit_scale=model.logit_scale())
  return loss_fn


def step_rng(seed: int, step: jax.Array) -> jax.Array:
  """Dropout randomness of a step: a function of the seed and the step only."""
  return jax.random.fold_in(jax.random.key(seed), step)


def make_train_step(config: ml_collections.ConfigDict, setup: Setup):
  """A jitted `(state, batch) -> (state, metrics)`; the input state is donated."""
  loss_fn = make_loss_fn(config, setup)

  def train_step(state: TrainState, batch):
    rng = step_rng(config.seed, state.step)
    (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    scale = aux.pop('logit_scale')
    metrics = {f'loss/{k}': v for k, v in aux.items()}
    metrics.update({'loss': total, 'temperature': 1.0 / scale,
                    'grad_norm': optax.tree.norm(grads),
                    'learning_rate': setup.schedule(state.step)})
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_sharding = sharding.batch_sharding(setup.mesh)
  return jax.jit(train_step,
                 in_shardings=(setup.state_shardings, batch_sharding),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=(0,))
