"""Top-k search time of `cookie_jax.eval.search.sharded_topk` against faiss `IndexFlatIP`.

For each gallery size M (random unit vectors, fp32, D=256) and 1k random unit queries,
times exact top-k through our blockwise sharded search, the same with
`jax.lax.approx_max_k`, and faiss-cpu's brute-force inner-product index, in one process
on the same data. Each timing is the median (and min-max) of `--runs` calls after one
warm-up call (compilation, faiss thread start-up); the three methods take turns within
each run, so that load from other processes on a shared machine biases none of them.
It also reports the recall@k of the approximate mode and of faiss against our exact
result (both sides are exact, so faiss should agree up to fp32 rounding of near-ties).

Galleries are placed on the devices once, before timing (`prepare_gallery`), as faiss's
`index.add` is; neither is timed. Usage:

    python benchmarks/retrieval_search.py [--sizes 10000,100000,1000000] [--runs 5]
        [--devices 1] [--block-size 4096] [--json out.json]

`--devices N` splits the host CPU into N XLA devices (set before jax is imported), to
exercise the sharded path on one machine.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time


def _args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='10000,100000,1000000')
  p.add_argument('--queries', type=int, default=1000)
  p.add_argument('--dim', type=int, default=256)
  p.add_argument('--k', type=int, default=10)
  p.add_argument('--runs', type=int, default=5)
  p.add_argument('--devices', type=int, default=1)
  p.add_argument('--block-size', type=int, default=4096)
  p.add_argument('--query-block-size', type=int, default=1024)
  p.add_argument('--recall-target', type=float, default=0.95)
  p.add_argument('--json', default='')
  return p.parse_args()


ARGS = _args() if __name__ == '__main__' else None
if ARGS is not None:
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={ARGS.devices}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from cookie_jax.eval import search  # pylint: disable=g-import-not-at-top,wrong-import-position


def unit_vectors(rng, n: int, dim: int, chunk: int = 100_000) -> np.ndarray:
  """n random unit vectors, generated in chunks so that peak memory stays ~1x the result."""
  out = np.empty((n, dim), np.float32)
  for lo in range(0, n, chunk):
    x = rng.standard_normal((min(chunk, n - lo), dim), dtype=np.float32)
    out[lo:lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def timed_interleaved(fns: dict, runs: int, cpu_times: dict | None = None):
  """{name: (result of the last call, [seconds per call])} after one untimed warm-up call
  of each. The methods take turns within each run, and the order turns round from run
  to run, so that a change in the load of a shared machine hits all of them alike.
  `cpu_times`, if given, receives each call's process CPU seconds (all threads)."""
  results = {name: fn() for name, fn in fns.items()}
  times = {name: [] for name in fns}
  names = list(fns)
  for run in range(runs):
    for name in names[run % len(names):] + names[:run % len(names)]:
      t0, c0 = time.perf_counter(), time.process_time()
      results[name] = fns[name]()
      times[name].append(time.perf_counter() - t0)
      if cpu_times is not None:
        cpu_times.setdefault(name, []).append(time.process_time() - c0)
  return {name: (results[name], times[name]) for name in fns}


def summary(times):
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times)}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
  k = truth.shape[1]
  return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


def bench_size(size: int, args, rng) -> dict:
  import faiss  # pylint: disable=g-import-not-at-top
  gallery = unit_vectors(rng, size, args.dim)
  queries = unit_vectors(rng, args.queries, args.dim)
  mesh = jax.make_mesh((len(jax.devices()),), ('gallery',))
  prepared = search.prepare_gallery(gallery, mesh, block_size=args.block_size)
  topk = lambda approx: search.sharded_topk(
      queries, prepared, args.k, query_block_size=args.query_block_size, approx=approx,
      recall_target=args.recall_target)
  index = faiss.IndexFlatIP(args.dim)
  index.add(gallery)
  cpu = {}
  out = timed_interleaved({
      'jax_exact': lambda: topk(False), 'jax_approx': lambda: topk(True),
      'faiss_flat_ip': lambda: index.search(queries, args.k)}, args.runs, cpu)
  (exact_s, exact_i), (_, approx_i), (faiss_s, faiss_i) = (
      out[m][0] for m in ('jax_exact', 'jax_approx', 'faiss_flat_ip'))
  row = {'gallery': size, 'queries': args.queries, 'dim': args.dim, 'k': args.k}
  row.update({m: summary(t) for m, (_, t) in out.items()})
  # CPU seconds per call (all threads; faiss's OpenMP threads also count while they spin).
  row.update({f'{m}_cpu': summary(t) for m, t in cpu.items()})
  row['exact_sets_equal_faiss'] = bool(all(
      set(a) == set(b) for a, b in zip(exact_i.tolist(), faiss_i.tolist())))
  row.update({
      'approx_recall_vs_exact': recall(approx_i, exact_i),
      'faiss_recall_vs_exact': recall(faiss_i, exact_i),
      'max_abs_score_diff_vs_faiss': float(np.abs(faiss_s - exact_s).max()),
  })
  row['exact_over_faiss'] = row['jax_exact']['median_s'] / row['faiss_flat_ip']['median_s']
  return row


def environment(args) -> dict:
  import faiss  # pylint: disable=g-import-not-at-top
  return {
      'nproc': os.cpu_count(), 'cpu': platform.processor() or platform.machine(),
      'python': sys.version.split()[0], 'jax': jax.__version__, 'numpy': np.__version__,
      'faiss': faiss.__version__, 'faiss_threads': faiss.omp_get_max_threads(),
      'jax_devices': len(jax.devices()), 'jax_platform': jax.devices()[0].platform,
      'block_size': args.block_size, 'query_block_size': args.query_block_size,
      'recall_target': args.recall_target, 'runs': args.runs,
      'loadavg_start': os.getloadavg(),
  }


def main(args):
  rng = np.random.default_rng(0)
  env = environment(args)
  print(json.dumps(env), flush=True)
  rows = []
  for size in (int(s) for s in args.sizes.split(',')):
    rows.append(bench_size(size, args, rng))
    gc.collect()  # free this size's galleries (numpy, device, faiss) before the next
    print(json.dumps(rows[-1]), flush=True)
  env['loadavg_end'] = os.getloadavg()
  print(f"\n{'gallery':>9} | {'jax exact (s)':>22} | {'jax approx (s)':>22} | "
        f"{'faiss FlatIP (s)':>22} | exact/faiss | approx R@{args.k} | faiss R@{args.k} | "
        f"same top-{args.k} sets | CPU s exact, faiss")
  for r in rows:
    cells = [f"{r[m]['median_s']:.3f} ({r[m]['min_s']:.3f}-{r[m]['max_s']:.3f})"
             for m in ('jax_exact', 'jax_approx', 'faiss_flat_ip')]
    print(f"{r['gallery']:>9} | " + ' | '.join(f'{c:>22}' for c in cells) +
          f" | {r['exact_over_faiss']:>11.2f} | {r['approx_recall_vs_exact']:>11.4f} | "
          f"{r['faiss_recall_vs_exact']:.4f} | {r['exact_sets_equal_faiss']} | "
          f"{r['jax_exact_cpu']['median_s']:.3f}, {r['faiss_flat_ip_cpu']['median_s']:.3f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'environment': env, 'results': rows}, f, indent=1)


if __name__ == '__main__':
  main(ARGS)
