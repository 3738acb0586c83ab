r"""Per-device memory of the `base` train step under FSDP on 1, 2, 4 and 8 devices, and of
the cross-modal loss with and without chunking at a large global batch.

  python benchmarks/memory_scaling.py [--batch_size=64] [--devices=1,2,4,8]
      [--loss_batch=65536] [--chunk_size=1024] [--sigmoid]

Nothing is allocated or run: the state and batch are abstract (`jax.eval_shape`, then
`ShapeDtypeStruct`s carrying their shardings), and the numbers come from XLA's memory
analysis of the compiled (partitioned, per-device) program. Parameters and optimiser state
are the bytes of each leaf's shard on one device; temporaries are XLA's `temp_size`, the
peak of everything else the step keeps alive (activations, gradients, buffers).

The compile runs on host CPU devices (8 are forced below), so the program is the CPU
backend's; on GPU/TPU the fusion and remat choices differ, and temporaries with them,
while parameter and optimiser bytes are the same.
"""

import os
import sys

# Before jax is imported: eight host devices to build meshes of 1 to 8 from.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import math
import platform
import time

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from cookie_jax import models, optim, sharding, step as step_lib
from cookie_jax.losses import contrastive, sigmoid

MIB = 2**20


def abstract_train_state(config, mesh):
  """`step.create_train_state` without running its init: shapes and shardings only."""
  abstract_model = nnx.eval_shape(lambda: models.init_model(config.model, config.seed))
  graphdef, abstract_params = nnx.split(abstract_model)
  param_shardings = sharding.param_shardings(abstract_params, mesh)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)

  def init_fn():
    params = nnx.to_pure_dict(nnx.state(models.init_model(config.model, config.seed)))
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params),
                               nonfinite_step=jnp.full((), -1, jnp.int32))
  shapes = jax.eval_shape(init_fn)
  shardings = step_lib.TrainState(
      step=sharding.replicated(mesh), params=param_shardings,
      opt_state=sharding.opt_state_shardings(tx, shapes.opt_state, param_shardings, mesh),
      nonfinite_step=sharding.replicated(mesh))
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       shapes, shardings)
  setup = step_lib.Setup(graphdef=graphdef, tx=tx, schedule=schedule, mesh=mesh,
                         state_shardings=shardings)
  return state, setup


def abstract_batch(config, mesh, batch_size):
  s, length = config.model.vision.image_size, config.data.max_len
  spec = sharding.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32, sharding=spec),
           'input_ids': jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=spec),
           'attention_mask': jax.ShapeDtypeStruct((batch_size, length), jnp.int32,
                                                  sharding=spec)}
  if config.loss.visual.weight > 0 and config.loss.visual.partner == 'augmented':
    batch['image_view2'] = batch['image']
  return batch


def shard_bytes(tree) -> int:
  """Bytes one device holds of an abstract, sharded pytree (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape)
    total += math.prod(shape) * x.dtype.itemsize
  return total


def train_step_memory(config, num_devices, batch_size, compile_step=True):
  mesh = sharding.make_mesh({'data': 1, 'fsdp': num_devices, 'tensor': 1},
                            devices=jax.devices()[:num_devices])
  state, setup = abstract_train_state(config, mesh)
  sizes = {'devices': num_devices, 'params': shard_bytes(state.params),
           'opt_state': shard_bytes(state.opt_state)}
  if not compile_step:  # the state's bytes need only its shapes and shardings
    return {**sizes, 'temp': float('nan'), 'compile_s': float('nan')}
  batch = abstract_batch(config, mesh, batch_size)
  start = time.perf_counter()
  compiled = step_lib.make_train_step(config, setup).lower(state, batch).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  return {**sizes, 'temp': mem.temp_size_in_bytes, 'compile_s': seconds}


def loss_memory(global_batch, dim, chunk_size, num_devices=8, form='info_nce'):
  """Temp bytes per device of the cross-modal loss and its gradients, 8-way data parallel.

  form: 'info_nce' (the softmax form), 'sigmoid_ring' (SigLIP's loss as a ppermute ring)
  or 'sigmoid_all_gather' (the same loss against the all-gathered batch; no chunking).
  """
  mesh = sharding.make_mesh({'data': num_devices, 'fsdp': 1, 'tensor': 1},
                            devices=jax.devices()[:num_devices])
  spec = NamedSharding(mesh, P(sharding.BATCH_AXES))
  emb = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=spec)
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  if form != 'info_nce':
    scale = (scale, scale)  # the sigmoid's logit scale and bias
  if form == 'sigmoid_ring':
    fn = lambda a, b, s, ax: sigmoid.sigmoid_loss(a, b, s, ax, chunk_size=chunk_size)
  elif form == 'sigmoid_all_gather':
    fn = sigmoid.sigmoid_loss_all_gather
  elif chunk_size:
    fn = lambda a, b, s, ax: contrastive.info_nce_chunked(a, b, s, ax, chunk_size)
  else:
    fn = contrastive.info_nce
  loss = jax.shard_map(lambda a, b, s: fn(a, b, s, sharding.BATCH_AXES), mesh=mesh,
                       in_specs=(P(sharding.BATCH_AXES), P(sharding.BATCH_AXES), P()),
                       out_specs=P())
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  return step.lower(emb, emb, scale).compile().memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0])
  parser.add_argument('--batch_size', type=int, default=64,
                      help='Global batch of the compiled step (the base recipe uses 4096).')
  parser.add_argument('--devices', default='1,2,4,8')
  parser.add_argument('--skip_loss', action='store_true')
  parser.add_argument('--state_only', action='store_true',
                      help='Parameter and optimiser bytes only: no compile (seconds).')
  parser.add_argument('--loss_batch', type=int, default=65536)
  parser.add_argument('--chunk_size', type=int, default=1024)
  parser.add_argument('--sigmoid', action='store_true',
                      help="also SigLIP's sigmoid loss: the ring, unchunked and chunked, "
                      'and the all-gather peer, at --loss_batch')
  args = parser.parse_args()

  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config('base')
  print(f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'jax {jax.__version__}, backend {jax.default_backend()}')
  print(f'base config, mesh data=1 x fsdp=N, global batch {args.batch_size}, '
        f'dtype {config.model.dtype}, remat {config.model.remat}\n')
  dim = config.model.embed_dim
  if not args.skip_loss:
    print(f'Cross-modal loss + gradients, global batch {args.loss_batch} x {dim}, '
          f'8 devices data parallel (B_local = {args.loss_batch // 8}):\n')
    print('| loss | temporaries MiB/device |')
    print('|---|---:|')
    rows = [('unchunked (`info_nce`)', 'info_nce', 0),
            (f'chunked, chunk_size={args.chunk_size}', 'info_nce', args.chunk_size)]
    if args.sigmoid:
      rows += [('sigmoid, all-gather (`sigmoid_loss_all_gather`)', 'sigmoid_all_gather', 0),
               ('sigmoid, ring (`sigmoid_loss`)', 'sigmoid_ring', 0),
               (f'sigmoid, ring, chunk_size={args.chunk_size}', 'sigmoid_ring',
                args.chunk_size)]
    for name, form, chunk in rows:
      temp = loss_memory(args.loss_batch, dim, chunk, form=form)
      print(f'| {name} | {temp / MIB:.1f} |', flush=True)
  print()
  print('| devices | params MiB/device | optimiser state MiB/device | temporaries MiB/device '
        '| total MiB/device | compile s |')
  print('|---:|---:|---:|---:|---:|---:|')
  for n in (int(d) for d in args.devices.split(',')):
    r = train_step_memory(config, n, args.batch_size, compile_step=not args.state_only)
    total = r['params'] + r['opt_state'] + r['temp']
    print(f"| {n} | {r['params'] / MIB:.1f} | {r['opt_state'] / MIB:.1f} | "
          f"{r['temp'] / MIB:.1f} | {total / MIB:.1f} | {r['compile_s']:.0f} |", flush=True)


if __name__ == '__main__':
  main()
