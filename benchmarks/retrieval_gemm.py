"""The fused dot-and-maximum pass of the exact search alone, without selection or copies.

What bounds `cookie_jax.eval.search.sharded_topk` at large galleries on a CPU: one pass
of `queries x block` fp32 dot products fused with the maximum of each group of 16 rows
(XLA:CPU's YNNPACK fusion), over the whole gallery, for several block sizes, and with
that fusion switched off for comparison. Each figure is the median (min-max) of `--runs`
calls after a warm-up call. Usage:

    python benchmarks/retrieval_gemm.py [--gallery 1048576] [--queries 1000] [--dim 256]
        [--block-sizes 1024,2048,4096,8192,16384] [--runs 3]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from cookie_jax.eval import search  # pylint: disable=g-import-not-at-top,wrong-import-position

GROUP = search.group_size(search.DEFAULT_BLOCK_SIZE, 10)  # 16 rows, as the search's


def _args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--gallery', type=int, default=1 << 20)
  p.add_argument('--queries', type=int, default=1000)
  p.add_argument('--dim', type=int, default=256)
  p.add_argument('--block-sizes', default='1024,2048,4096,8192,16384')
  p.add_argument('--runs', type=int, default=3)
  return p.parse_args()


def fused_pass(q, gallery, block: int, options: dict):
  """The compiled pass: [blocks, queries, block / GROUP] group maxima."""
  n, d = q.shape

  def one_block(rows):  # the search's own scores, and its group maxima
    return jnp.max(search._block_scores(q, rows).reshape(n, -1, GROUP), axis=2)  # pylint: disable=protected-access

  fn = jax.jit(lambda g: jax.lax.map(one_block, g.reshape(-1, block, d)))
  return fn.lower(gallery).compile(compiler_options=options)


def main():
  args = _args()
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
  gallery = jnp.asarray(rng.standard_normal((args.gallery, args.dim), dtype=np.float32))
  flops = 2 * args.queries * args.gallery * args.dim
  cases = [(int(b), 'ynnpack', {}) for b in args.block_sizes.split(',')]
  cases.append((4096, 'no ynnpack', {'xla_cpu_experimental_ynn_fusion_type': ''}))
  print(json.dumps({'nproc': os.cpu_count(), 'jax': jax.__version__,
                    'gallery': args.gallery, 'queries': args.queries, 'dim': args.dim,
                    'loadavg_start': os.getloadavg()}))
  for block, fusion, options in cases:
    if args.gallery % block:
      print(f'block {block}: skipped, the gallery is not a multiple of it')
      continue
    compiled = fused_pass(q, gallery, block, options)
    compiled(gallery).block_until_ready()
    times = []
    for _ in range(args.runs):
      start = time.perf_counter()
      compiled(gallery).block_until_ready()
      times.append(time.perf_counter() - start)
    med = statistics.median(times)
    print(f'block {block:6d} {fusion:10s} {med:7.3f} s ({min(times):.3f}-{max(times):.3f})'
          f'  {flops / med / 1e9:6.1f} GFLOP/s')
  print(json.dumps({'loadavg_end': os.getloadavg()}))


if __name__ == '__main__':
  main()
