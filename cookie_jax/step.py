"""The train state, its sharded initialisation and the jitted train step.

Parameters live as a pure dict of arrays (the NNX state of `CookieModel`), so that the
state is a plain pytree for jit, optax and orbax; the module is rebuilt inside the step
with `nnx.merge`. Shardings come from the parameters' logical axes (cookie_jax.sharding).
"""

import math
from typing import Any, Callable

import flax.struct
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from cookie_jax import freeze as freeze_lib
from cookie_jax import losses as losses_lib
from cookie_jax import momentum as momentum_lib
from cookie_jax import objectives, optim, sharding
from cookie_jax.models import abstract_model, init_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # The first step (counted like `step`, 1 = the first update) whose loss or gradient
  # was not finite, or -1. From then on the state is frozen, so nothing from the bad
  # step or after it can reach a checkpoint.
  nonfinite_step: jax.Array
  # Method state besides the parameters (momentum.init_state): CODER's EMA parameters
  # and key queues; {} when no option needs any.
  extras: Any = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class Setup:
  """What is fixed for a run: the module's graph, the optimiser and the shardings."""
  graphdef: Any = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  schedule: Callable = flax.struct.field(pytree_node=False)
  mesh: Mesh = flax.struct.field(pytree_node=False)
  state_shardings: Any = flax.struct.field(pytree_node=False)


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh
                       ) -> tuple[TrainState, Setup]:
  """Initialises the parameters and optimiser state directly in their shardings."""
  init_fn, _, setup = train_state_setup(config, mesh)
  state = jax.jit(init_fn, out_shardings=setup.state_shardings)()
  return state, setup


def train_state_setup(config: ml_collections.ConfigDict, mesh: Mesh):
  """(init_fn, the abstract TrainState, Setup), allocating nothing: what
  `create_train_state` runs, and what compiling a step for a large model needs."""
  graphdef, abstract_state = abstract_model(config.model)
  param_shardings = sharding.param_shardings(abstract_state, mesh)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps, config.train.freeze,
                                     optim.unused_parts(config.model))

  def init_fn():
    params = nnx.to_pure_dict(nnx.state(init_model(config.model, config.seed)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), nonfinite_step=jnp.full((), -1, jnp.int32),
                      extras=momentum_lib.init_state(config.loss, params,
                                                     config.model.embed_dim))

  abstract = jax.eval_shape(init_fn)
  state_shardings = TrainState(
      step=sharding.replicated(mesh), params=param_shardings,
      opt_state=sharding.opt_state_shardings(tx, abstract.opt_state, param_shardings, mesh),
      nonfinite_step=sharding.replicated(mesh),
      extras=momentum_lib.state_shardings(abstract.extras, param_shardings,
                                          sharding.replicated(mesh)))
  return init_fn, abstract, Setup(graphdef=graphdef, tx=tx, schedule=schedule, mesh=mesh,
                                  state_shardings=state_shardings)


def with_params(state: TrainState, params) -> TrainState:
  """`state` with new parameters (fine-tuning init); an EMA copy restarts from them."""
  return state.replace(params=params, extras=momentum_lib.restart_from(state.extras, params))


def clip_logit_scale(params, max_logit_scale: float):
  """`params` with the log logit scale clipped to log(max_logit_scale) after an update, as
  open_clip clamps it in place. A clamp in the forward pass alone has no gradient above
  it, so Adam's momentum could carry the parameter past it for good. The sigmoid form's
  scale is the same parameter (its bias has no clamp, and needs none)."""
  log_scale = params['log_logit_scale']
  return {**params, 'log_logit_scale': jnp.minimum(log_scale, math.log(max_logit_scale))}


# The dropout stream's tag, folded into the seed's key before the step. Initialisation
# (`models.init_model`: nnx.Rngs(params=key(seed))) takes its n-th draw as
# fold_in(key(seed), n), so the steps' keys must not be fold_in(key(seed), step); the tag
# is far above any model's count of draws.
DROPOUT_STREAM = 0x64726F70  # 'drop'


def step_rng(seed: int, step: jax.Array) -> jax.Array:
  """Dropout randomness of a step: a function of the seed and the step only, on a stream
  of its own (`DROPOUT_STREAM`), apart from the initialisation's keys."""
  stream = jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM)
  return jax.random.fold_in(stream, step)


def split_micro_batches(batch, num_micro: int, mesh: Mesh):
  """[B, ...] -> [num_micro, B / num_micro, ...] so that every micro-batch is spread over
  all batch shards with no data movement: each device splits its own rows."""
  shards = sharding.batch_shards(mesh)
  spec = sharding.batch_sharding(mesh, stacked=True)

  def split(x):
    b = x.shape[0]
    y = x.reshape(shards, num_micro, b // (shards * num_micro), *x.shape[1:])
    y = jnp.swapaxes(y, 0, 1).reshape(num_micro, b // num_micro, *x.shape[1:])
    return jax.lax.with_sharding_constraint(y, spec)
  return jax.tree.map(split, batch)


def _differentiable(tree) -> list[jax.Array]:
  """The floating-point leaves of `tree`: the embeddings GradCache differentiates, without
  the boolean `valid` masks of the extra negatives that travel beside them."""
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def _with_differentiable(tree, floats: list[jax.Array]):
  """`tree` with its floating-point leaves replaced, in order, by `floats`."""
  floats = iter(floats)
  return jax.tree.map(lambda x: next(floats) if jnp.issubdtype(x.dtype, jnp.inexact) else x,
                      tree)


def make_grad_fn(config: ml_collections.ConfigDict, setup: Setup, constants=None):
  """params, batch, rng, queues -> ((total, terms, logit_scale), grads).

  `queues` are extra negatives that need no gradient (`momentum.queue_negatives`) or
  {}; `constants` the data-mined tables of `objectives.needs_constants`.

  With `train.accum_steps = M > 1`, GradCache-style accumulation that keeps the negatives
  of the whole batch: (1) embed every micro-batch without gradients, (2) compute the loss
  on all embeddings and its gradient with respect to them, (3) re-embed micro-batch by
  micro-batch and backpropagate those embedding gradients into the parameters. Only one
  micro-batch's activations are alive at a time; the result equals the full-batch
  gradient.
  """
  loss_cfg = config.loss
  num_micro = config.train.accum_steps
  options = objectives.loss_options(loss_cfg)
  if constants is None and objectives.needs_constants(loss_cfg):
    raise ValueError('These loss options need the tables mined from the training data '
                     '(see cookie_jax.data.concepts); pass `constants`.')
  constants = None if constants is None else jax.tree.map(jnp.asarray, dict(constants))

  fuse = objectives.fuse_views(loss_cfg, setup.mesh.devices.size)
  # Locked parameters (train.freeze) are cut from autodiff before the model runs.
  locked = lambda params: freeze_lib.stop_frozen(params, config.train.freeze)

  def inputs_fn(params, batch, rng):
    return objectives.loss_inputs(nnx.merge(setup.graphdef, locked(params)), batch, rng,
                                  loss_cfg, constants, fuse=fuse)

  def replicated_fn(params):
    return objectives.replicated_args(nnx.merge(setup.graphdef, locked(params)), loss_cfg)

  def reported_scale(replicated):
    scale = replicated.get('cross_modal')
    return scale[0] if isinstance(scale, tuple) else scale  # sigmoid form: (t, c)

  if num_micro == 1:
    compute = losses_lib.sharded_losses(setup.mesh, chunk_size=loss_cfg.chunk_size,
                                        options=options)

    def loss_fn(params, batch, rng, queues):
      replicated = replicated_fn(params)
      pairs, negatives = inputs_fn(params, batch, rng)
      terms = compute(pairs, replicated, objectives.merge_negatives(negatives, queues))
      return losses_lib.weighted_total(terms, loss_cfg), (terms, reported_scale(replicated))

    def grad_fn(params, batch, rng, queues):
      (total, (terms, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, batch, rng, queues)
      return (total, terms, scale), grads
    return grad_fn

  compute = losses_lib.sharded_losses(setup.mesh, stacked=True,
                                      chunk_size=loss_cfg.chunk_size, options=options)

  def grad_fn(params, batch, rng, queues):
    micro = split_micro_batches(batch, num_micro, setup.mesh)
    keys = jax.random.split(rng, num_micro)
    _, stacked = jax.lax.scan(lambda c, xs: (c, inputs_fn(params, *xs)), None,
                              (micro, keys))
    replicated = replicated_fn(params)

    def loss_of_embeddings(embeddings, replicated):
      pairs, negatives = _with_differentiable(stacked, embeddings)
      terms = compute(pairs, replicated, objectives.merge_negatives(negatives, queues))
      return losses_lib.weighted_total(terms, loss_cfg), terms
    (total, terms), (g_stacked, g_replicated) = jax.value_and_grad(
        loss_of_embeddings, argnums=(0, 1), has_aux=True)(_differentiable(stacked),
                                                           replicated)

    def backprop(acc, xs):
      batch_m, key_m, g_m = xs
      _, vjp = jax.vjp(lambda p: _differentiable(inputs_fn(p, batch_m, key_m)), params)
      return jax.tree.map(jnp.add, acc, vjp(g_m)[0]), None
    grads, _ = jax.lax.scan(backprop, jax.tree.map(jnp.zeros_like, params),
                            (micro, keys, g_stacked))
    _, replicated_vjp = jax.vjp(replicated_fn, params)
    grads = jax.tree.map(jnp.add, grads, replicated_vjp(g_replicated)[0])
    return (total, terms, reported_scale(replicated)), grads
  return grad_fn


def make_train_step(config: ml_collections.ConfigDict, setup: Setup, constants=None):
  """A jitted `(state, batch) -> (state, metrics)`; the input state is donated."""
  grad_fn = make_grad_fn(config, setup, constants)
  momentum = config.loss.momentum

  def train_step(state: TrainState, batch):
    with sharding.activation_sharding(setup.mesh):
      return _train_step(state, batch)

  def _train_step(state: TrainState, batch):
    rng = step_rng(config.seed, state.step)
    queues = {}
    if momentum.queue_size:
      # Keys of this batch from the momentum encoder; they join the queue after the
      # update, so the loss sees only keys of earlier batches.
      keys = momentum_lib.momentum_keys(
          nnx.merge(setup.graphdef, state.extras['ema_params']), batch)
      queues = momentum_lib.queue_negatives(state.extras)
    (total, terms, scale), grads = grad_fn(state.params, batch, rng, queues)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = clip_logit_scale(optax.apply_updates(state.params, updates),
                              config.model.max_logit_scale)
    extras = state.extras
    if momentum.queue_size:
      extras = momentum_lib.update(extras, params, keys, momentum.momentum)
    # Non-finite guard: keep the last good state and remember where it went wrong.
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    healthy = finite & (state.nonfinite_step < 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(healthy, n, o), new, old)
    # Recorded as the step number this update would have produced (as metrics are logged).
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step + 1,
                               state.nonfinite_step)
    metrics = {f'loss/{k}': v for k, v in terms.items()}
    metrics.update({'loss': total, 'grad_norm': grad_norm,
                    'learning_rate': setup.schedule(state.step)})
    if scale is not None:
      metrics['temperature'] = 1.0 / scale
    # For the loop's guard, which reads it from the metrics it fetches anyway.
    metrics['nonfinite_step'] = nonfinite_step
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state),
                           nonfinite_step=nonfinite_step,
                           extras=keep(extras, state.extras))
    return new_state, metrics

  batch_sharding = sharding.batch_sharding(setup.mesh)
  return jax.jit(train_step,
                 in_shardings=(setup.state_shardings, batch_sharding),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=(0,))
