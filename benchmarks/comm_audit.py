"""Communication audit: bytes per collective of the compiled `base` train step, on CPU
devices, against the FSDP ideal (cookie_jax/comm_audit.py says what each counts).

Nothing is allocated: the step is compiled for abstract arrays. Usage:

    python benchmarks/comm_audit.py [--preset base] [--meshes 1x8,2x4] [--batch 4096]
        [--hlo_dir DIR] [--json out.json]

A mesh `DxF` is data=D x fsdp=F (tensor=1) over D*F forced host CPU devices. The ratio
counts the partitioned module (the program's own dtypes); the final CPU-optimised HLO,
where the CPU backend has rewritten bf16 collectives to fp32, is reported beside it.
`--hlo_dir` keeps both modules of each mesh (and `--from_hlo` re-reads them without
compiling).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--config', default='base', help='a variant of configs/base.py')
  p.add_argument('--meshes', default='1x8,2x4')
  p.add_argument('--batch', type=int, default=0, help='global batch (0: the recipe\'s)')
  p.add_argument('--hlo_dir', default='')
  p.add_argument('--from_hlo', action='store_true')
  p.add_argument('--no_constraints', action='store_true',
                 help='without the activation sharding constraints (models.layers.constrain)')
  p.add_argument('--visual', type=float, default=-1.0, help='loss.visual.weight (-1: as set)')
  p.add_argument('--textual', type=float, default=-1.0,
                 help='loss.textual.weight (-1: as set)')
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  if args.from_hlo and not args.hlo_dir:
    p.error('--from_hlo re-reads the modules that an earlier run saved to --hlo_dir DIR')
  return args


def _meshes(text):
  return [tuple(int(x) for x in m.split('x')) for m in text.split(',')]


ARGS = parse_args() if __name__ == '__main__' else None
if ARGS is not None:
  devices = max(d * f for d, f in _meshes(ARGS.meshes))
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={devices}')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from cookie_jax import comm_audit, sharding
# pylint: enable=g-import-not-at-top,wrong-import-position


def recipe(name: str, batch: int, data: int, fsdp: int):
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import base as recipes  # pylint: disable=g-import-not-at-top
  config = recipes.get_config(name)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, 1
  if batch:
    config.train.batch_size = batch
  for term in ('visual', 'textual'):
    if getattr(ARGS, term, -1.0) >= 0:
      config.loss[term].weight = getattr(ARGS, term)
  return config


def mib(x: float) -> str:
  return f'{x / 2**20:,.1f}' if x >= 2**24 else f'{x / 2**20:.3g}'


def table(results) -> str:
  lines = ['| mesh (data x fsdp) | collective | count | MiB / device / step | FSDP ideal MiB '
           '| measured / ideal | CPU-optimised MiB (bf16 upcast) |',
           '|---|---|---:|---:|---:|---:|---:|']
  for r in results:
    name = f"{r['mesh']['data']} x {r['mesh']['fsdp']}"
    for kind, row in r['rows'].items():
      if not row['count'] and not row['ideal']:
        continue
      # A ratio against an ideal of a few scalars says nothing ('–').
      ratio = f"{row['bytes'] / row['ideal']:.2f}" if row['ideal'] > 0.1 * row['bytes'] else '–'
      final = r['optimised']['rows'][kind]
      lines.append(f"| {name} | {kind} | {row['count']:,} | {mib(row['bytes'])} | "
                   f"{mib(row['ideal'])} | {ratio} | {mib(final['bytes'])} |")
      if row['sliced_bytes']:
        lines.append(f"| {name} | … of which only sliced to the shard (a reduce-scatter on "
                     f"GPU/TPU) | | {mib(row['sliced_bytes'])} | | | "
                     f"{mib(final['sliced_bytes'])} |")
    lines.append(f"| {name} | **all, scalars left out** | | **{mib(r['bytes'])}** | "
                 f"**{mib(r['ideal'])}** | **{r['ratio']:.2f}** | "
                 f"{mib(r['optimised']['bytes'])} ({r['optimised']['ratio']:.2f}x) |")
  return '\n'.join(lines)


def main(args):
  if args.no_constraints:
    from cookie_jax.models import layers  # pylint: disable=g-import-not-at-top
    layers.constrain = lambda x, logical_axes: x
  results = []
  for data, fsdp in _meshes(args.meshes):
    config = recipe(args.config, args.batch, data, fsdp)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:data * fsdp])
    tag = '_unconstrained' if args.no_constraints else ''
    stem = f'{args.config}{tag}_{data}x{fsdp}'
    paths = {view: os.path.join(args.hlo_dir, f'{stem}.{view}.hlo')
             for view in ('partitioned', 'optimised')} if args.hlo_dir else {}
    t0 = time.perf_counter()
    if args.from_hlo:
      hlos = {}
      for view, path in paths.items():
        if os.path.exists(path) or view == 'optimised':
          with open(path, encoding='utf-8') as f:
            hlos[view] = f.read()
    else:
      print(f'compiling {args.config} for data={data} x fsdp={fsdp} ...', flush=True)
      hlos = comm_audit.compiled_hlos(config, mesh)
      for view, path in paths.items():
        if hlos.get(view):
          os.makedirs(args.hlo_dir, exist_ok=True)
          with open(path, 'w', encoding='utf-8') as f:
            f.write(hlos[view])
    r = comm_audit.audit(config, mesh, hlos)
    r.update(config=args.config, batch=config.train.batch_size,
             constraints=not args.no_constraints,
             compile_s=time.perf_counter() - t0, remat=bool(config.model.remat),
             dtype=config.model.dtype, loadavg=os.getloadavg())
    results.append(r)
    print(json.dumps(r), flush=True)
  print(table(results))
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main(ARGS)
