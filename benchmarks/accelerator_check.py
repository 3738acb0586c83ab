r"""One command for the first hour on a GPU or TPU host: everything that matters, in at most
8 minutes including compilation, written as one JSON and a markdown table to paste into
docs/BENCHMARKS.md.

1. **Train step**: the `base` recipe (bf16, all three COOKIE losses) on one device
   at the largest per-device batch that fits: the compiled step's memory is read at two
   small batches, the largest batch that fits in 90% of the device is extrapolated from
   them and compiled to check (smaller if it does not fit). Pairs/s, model TFLOP/s
   (cookie_jax/flops.py), MFU where the device's peak is known, peak memory; on a TPU
   also the compiler's estimate of the same compiled program (`launch/compile.py`'s
   measure, cookie_jax/tpu_compile.py) beside the measured step time, which calibrates it.
2. **PyTorch peer**: the same model in PyTorch (`benchmarks/torch_peer.py`) with
   `torch.compile` and bf16 autocast, at the same batch, runs alternating with ours in the
   same process (as `benchmarks/train_throughput.py` does).
3. **Input pipeline**: pairs/s of `TrainIterator` on this host's CPUs, 224 px photos
   (`benchmarks/input_pipeline.py`), no device.
4. **Search**: `benchmarks/retrieval_search.py` at 1M x 256, 1k queries, top-10, with
   faiss `IndexFlatIP` beside it where faiss-cpu is installed.

    python benchmarks/accelerator_check.py --out /tmp/accel          # GPU / TPU host
    python benchmarks/accelerator_check.py --small --out /tmp/accel  # CPU, about a minute

`--small` is the CPU version (the `tiny` model, a 1 GB memory budget for the batch search,
a few photos, a 20k gallery); `tests/test_accelerator_check.py` runs it with even smaller
settings, so that the script cannot rot.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'accelerator_check'))
  p.add_argument('--small', action='store_true', help='the CPU version')
  p.add_argument('--preset', default='', help='default: base (tiny with --small)')
  p.add_argument('--image_size', type=int, default=0, help='0: the preset\'s')
  p.add_argument('--text_len', type=int, default=0, help='0: 64 (32 with --small)')
  p.add_argument('--start_batch', type=int, default=0, help='0: 16 (8 with --small)')
  p.add_argument('--max_batch', type=int, default=0, help='0: 8192 (64 with --small)')
  p.add_argument('--memory_gb', type=float, default=0.0,
                 help='device memory to fit in (0: the device\'s; 1 GB with --small on CPU)')
  p.add_argument('--steps', type=int, default=0, help='steps per run (0: 10, 2 small)')
  p.add_argument('--runs', type=int, default=3)
  p.add_argument('--no_torch', action='store_true')
  p.add_argument('--photos', type=int, default=0, help='0: 512 (16 with --small)')
  p.add_argument('--pipeline_batch', type=int, default=0, help='0: 256 (8 with --small)')
  p.add_argument('--pipeline_steps', type=int, default=0, help='0: 8 (2 with --small)')
  p.add_argument('--gallery', type=int, default=0, help='0: 1,000,000 (20,000 small)')
  p.add_argument('--queries', type=int, default=1000)
  p.add_argument('--search_runs', type=int, default=0, help='0: 5 (2 with --small)')
  p.add_argument('--skip', default='', help='comma-separated: train,torch,pipeline,search')
  args = p.parse_args(argv)
  small = args.small
  defaults = dict(preset='tiny' if small else 'base', text_len=32 if small else 64,
                  start_batch=8 if small else 16, max_batch=64 if small else 8192,
                  steps=2 if small else 10, photos=16 if small else 512,
                  pipeline_batch=8 if small else 256, pipeline_steps=2 if small else 8,
                  gallery=20_000 if small else 1_000_000, search_runs=2 if small else 5)
  for key, value in defaults.items():
    if not getattr(args, key):
      setattr(args, key, value)
  if small and not args.memory_gb:
    args.memory_gb = 1.0
  return args


if __name__ == '__main__':
  ARGS = parse_args()
  # Share a GPU with PyTorch; keep TensorFlow (input pipeline) off the accelerators.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from cookie_jax import comm_audit, flops as flops_lib, sharding, step as step_lib, tpu_compile
from cookie_jax.config import default_config, validate_config
# pylint: enable=g-import-not-at-top,wrong-import-position


def train_config(args, batch: int):
  """The `base` recipe's model and losses (or `--preset`), for one device."""
  sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'configs'))
  config = default_config(args.preset)
  if args.preset == 'base':
    import base as recipes  # pylint: disable=g-import-not-at-top
    config = recipes.get_config('base')
  else:
    config.loss.visual.weight = config.loss.textual.weight = 0.5
  config.model.dtype = 'bfloat16' if jax.default_backend() != 'cpu' else 'float32'
  if args.image_size:
    config.model.vision.image_size = args.image_size
  config.data.max_len = args.text_len
  config.train.batch_size = batch
  config.optim.schedule, config.optim.warmup_steps = 'constant', 0
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  return validate_config(config, num_devices=1)


def device_memory(args) -> float:
  if args.memory_gb:
    return args.memory_gb * 2**30
  stats = jax.devices()[0].memory_stats() or {}
  if 'bytes_limit' not in stats:
    raise SystemExit('This device reports no memory limit; pass --memory_gb.')
  return float(stats['bytes_limit'])


def compile_step(args, batch: int):
  """(compiled step, config, bytes the step needs on the device) at `batch`."""
  config = train_config(args, batch)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, abstract_batch, setup = comm_audit.abstract_inputs(config, mesh)
  # On a TPU, the program `launch/compile.py` estimates (tpu_compile.COMPILER_OPTIONS),
  # so that the measured step time calibrates that estimate.
  options = tpu_compile.COMPILER_OPTIONS if jax.default_backend() == 'tpu' else None
  compiled = step_lib.make_train_step(config, setup).lower(state, abstract_batch).compile(
      compiler_options=options)
  m = compiled.memory_analysis()
  need = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)
  return compiled, config, float(need)


def largest_batch(args, log) -> dict:
  """Two compiles give memory = fixed + per_pair * batch; the extrapolated largest batch
  (a multiple of the start batch) is compiled to check, and shrunk until it fits."""
  limit = 0.9 * device_memory(args)
  b0 = args.start_batch
  tried = {}
  for b in (b0, 2 * b0):
    t0 = time.perf_counter()
    tried[b] = compile_step(args, b)
    log(f'batch {b}: {tried[b][2] / 2**30:.2f} GiB ({time.perf_counter() - t0:.0f} s)')
  per_pair = max((tried[2 * b0][2] - tried[b0][2]) / b0, 1.0)
  fixed = tried[b0][2] - per_pair * b0
  batch = int((limit - fixed) / per_pair) // b0 * b0
  batch = max(b0, min(batch, args.max_batch))
  while True:
    if batch not in tried:
      t0 = time.perf_counter()
      tried[batch] = compile_step(args, batch)
      log(f'batch {batch}: {tried[batch][2] / 2**30:.2f} GiB '
          f'({time.perf_counter() - t0:.0f} s)')
    if tried[batch][2] <= limit or batch == b0:
      break
    batch = max(b0, int(batch * limit / tried[batch][2]) // b0 * b0)
  compiled, config, need = tried[batch]
  return {'batch': batch, 'compiled': compiled, 'config': config, 'need_bytes': need,
          'limit_bytes': limit, 'fixed_bytes': fixed, 'bytes_per_pair': per_pair}


def _timed(step, sync, steps: int) -> float:
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  return time.perf_counter() - t0


def train_and_peer(args, log) -> dict:
  import train_throughput  # pylint: disable=g-import-not-at-top
  found = largest_batch(args, log)
  config, b = found['config'], found['batch']
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  init_fn, _, setup = step_lib.train_state_setup(config, mesh)
  holder = {'state': jax.jit(init_fn, out_shardings=setup.state_shardings)()}
  batch_np = train_throughput.random_batch(config)
  batch = sharding.to_global(mesh, batch_np)
  compiled = found['compiled']

  def jax_step():
    holder['state'], _ = compiled(holder['state'], batch)
  jax_sync = lambda: jax.block_until_ready(holder['state'])
  trainers = {'jax': (jax_step, jax_sync)}
  out = {'preset': args.preset, 'batch_per_device': b, 'dtype': config.model.dtype,
         'image_size': config.model.vision.image_size, 'text_len': config.data.max_len,
         'memory_limit_gib': found['limit_bytes'] / 0.9 / 2**30,
         'compiled_memory_gib': found['need_bytes'] / 2**30,
         'params': int(sum(x.size for x in jax.tree.leaves(holder['state'].params)))}
  if 'torch' not in args.skip and not args.no_torch:
    out.update(torch_peer(config, batch_np, trainers, log))
  for _ in range(2):
    jax_step()
  jax_sync()
  pairs = {name: [] for name in trainers}
  for run in range(args.runs):
    for name in (list(trainers) if run % 2 == 0 else list(reversed(trainers))):
      pairs[name].append(args.steps * b / _timed(*trainers[name], args.steps))
    log(f'run {run + 1}: ' + ', '.join(f'{n} {v[-1]:.1f} pairs/s' for n, v in pairs.items()))
  flops = flops_lib.train_step_flops(config)['total']
  peak = flops_lib.peak_flops_per_device(config.model.dtype)
  for name, values in pairs.items():
    median = statistics.median(values)
    use = flops_lib.utilisation(flops, median / b, 1, peak)
    out[f'{name}_pairs_per_sec'] = median
    out[f'{name}_pairs_per_sec_runs'] = values
    out[f'{name}_model_tflops'] = use['tflops_per_device']
    out[f'{name}_mfu'] = use.get('mfu')
  # The TPU compiler's estimate (its cost model's optimal_seconds) of this same compiled
  # program, beside the measured step: on a TPU the first calibration of
  # `launch/compile.py`'s estimates. Only a TPU's: other compilers' figures are not it.
  estimate = (tpu_compile.usable_seconds(tpu_compile.cost(compiled)['optimal_seconds'])
              if jax.default_backend() == 'tpu' else None)
  out['measured_step_s'] = b / out['jax_pairs_per_sec']
  out['estimated_step_s'] = estimate
  out['measured_over_estimate'] = out['measured_step_s'] / estimate if estimate else None
  if 'torch' in pairs:
    out['jax_over_torch'] = statistics.median(
        j / t for j, t in zip(pairs['jax'], pairs['torch']))
  stats = jax.devices()[0].memory_stats() or {}
  out['peak_memory_gib'] = (stats['peak_bytes_in_use'] / 2**30
                            if 'peak_bytes_in_use' in stats else None)
  out['flops_per_step'] = flops
  return out


def torch_peer(config, batch_np, trainers, log) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch_peer as peer  # pylint: disable=g-import-not-at-top
  gpu = jax.default_backend() == 'gpu' and torch.cuda.is_available()
  b = config.train.batch_size
  t0 = time.perf_counter()
  while True:
    try:
      tt = peer.TorchTrainer(config, peer.torch_batch(batch_np),
                             device='cuda' if gpu else 'cpu', dtype=config.model.dtype,
                             compile_model=gpu)
      for _ in range(2):
        tt.step()
      tt.sync()
      break
    except torch.OutOfMemoryError:  # same batch as ours first, then halved
      if b <= 1:
        raise
      b //= 2
      batch_np = {k: v[:b] for k, v in batch_np.items()}
      if gpu:
        torch.cuda.empty_cache()
  log(f'PyTorch warm-up (torch.compile={gpu}) {time.perf_counter() - t0:.0f} s, batch {b}')
  if b != config.train.batch_size:
    raise SystemExit(f'PyTorch fits only batch {b} < ours {config.train.batch_size}; '
                     'rerun with --max_batch to compare at equal batch.')
  trainers['torch'] = (tt.step, tt.sync)
  return {'torch_compile': gpu, 'torch_warmup_s': time.perf_counter() - t0,
          'torch_params': tt.num_params()}


def input_pipeline_rate(args, log) -> dict:
  import pathlib  # pylint: disable=g-import-not-at-top
  import input_pipeline  # pylint: disable=g-import-not-at-top
  from cookie_jax.data import defaults, sources  # pylint: disable=g-import-not-at-top
  work = pathlib.Path(args.out) / 'pipeline'
  kb = input_pipeline.make_photo_folder(work / 'coco', args.photos)
  cfg = defaults.data_config()
  cfg.update(dict(builder='karpathy', manual_dir=str(work / 'coco'),
                  data_dir=str(work / 'tfds'), tokenizer=str(work / 'coco' / 'vocab.txt'),
                  max_len=64, crop_scale=(0.08, 1.0), flip=True))
  sources.get_builder(cfg)
  median, rates, start, cpu = input_pipeline.measure(
      cfg, image_size=224, batch=args.pipeline_batch, steps=args.pipeline_steps, warmup=1,
      runs=1 if args.small else 2, pipelines=('new',))['new']
  log(f'input pipeline: {median:.0f} pairs/s at 224 px on {os.cpu_count()} CPUs')
  return {'pairs_per_sec': median, 'runs': rates, 'first_batch_s': start,
          'cpu_ms_per_pair': cpu, 'host_cpus': os.cpu_count(), 'jpeg_kb': kb,
          'batch': args.pipeline_batch}


def search(args, log) -> dict:
  import retrieval_search  # pylint: disable=g-import-not-at-top
  opts = argparse.Namespace(dim=256, queries=args.queries, k=10, runs=args.search_runs,
                            block_size=4096, query_block_size=1024, recall_target=0.95)
  rng = np.random.default_rng(0)
  try:
    import faiss  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    log('faiss-cpu is not installed (pip install faiss-cpu): our search alone.')
    from cookie_jax.eval import search  # pylint: disable=g-import-not-at-top
    gallery = retrieval_search.unit_vectors(rng, args.gallery, opts.dim)
    queries = retrieval_search.unit_vectors(rng, opts.queries, opts.dim)
    mesh = jax.make_mesh((len(jax.devices()),), ('gallery',))
    prepared = search.prepare_gallery(gallery, mesh)
    out = retrieval_search.timed_interleaved(
        {'jax_exact': lambda: search.sharded_topk(queries, prepared, opts.k)}, opts.runs)
    return {'gallery': args.gallery, 'jax_exact': retrieval_search.summary(
        out['jax_exact'][1]), 'devices': len(jax.devices())}
  row = retrieval_search.bench_size(args.gallery, opts, rng)
  row['devices'] = len(jax.devices())
  log(f"search {args.gallery}: exact {row['jax_exact']['median_s']:.3f} s, faiss "
      f"{row['faiss_flat_ip']['median_s']:.3f} s")
  return row


def markdown(result: dict) -> str:
  env, lines = result['environment'], []
  lines.append(f"Machine: {env['device_kind']} x {env['devices']} ({env['platform']}), "
               f"{env['host_cpus']} host CPUs; jax {env['jax']}; "
               f"{result['wall_s']:.0f} s in all.")
  t = result.get('train')
  if t:
    mfu = lambda v: 'n/a' if v is None else f'{100 * v:.1f}%'
    lines += ['', '| | batch / device | pairs/s | model TFLOP/s | MFU | peak memory GiB |',
              '|---|---:|---:|---:|---:|---:|']
    peak = t['peak_memory_gib']
    peak = f'{peak:.1f}' if peak is not None else f"{t['compiled_memory_gib']:.1f} (compiled)"
    lines.append(f"| JAX, {t['preset']} {t['dtype']} | {t['batch_per_device']} | "
                 f"{t['jax_pairs_per_sec']:.1f} | {t['jax_model_tflops']:.3g} | "
                 f"{mfu(t['jax_mfu'])} | {peak} |")
    if 'torch_pairs_per_sec' in t:
      lines.append(f"| PyTorch{' + torch.compile' if t['torch_compile'] else ''} | "
                   f"{t['batch_per_device']} | {t['torch_pairs_per_sec']:.1f} | "
                   f"{t['torch_model_tflops']:.3g} | {mfu(t['torch_mfu'])} | |")
      lines.append(f"| JAX / PyTorch | | **{t['jax_over_torch']:.2f}** | | | |")
    if t['estimated_step_s']:
      lines.append(f"\nStep measured {t['measured_step_s'] * 1e3:.1f} ms; the TPU compiler's "
                   f"estimate for the same compiled program {t['estimated_step_s'] * 1e3:.1f} "
                   f"ms (measured / estimate **{t['measured_over_estimate']:.2f}**).")
  p = result.get('pipeline')
  if p:
    lines.append(f"\nInput pipeline (224 px photos, batch {p['batch']}, {p['host_cpus']} "
                 f"host CPUs): **{p['pairs_per_sec']:,.0f} pairs/s**, "
                 f"{p['cpu_ms_per_pair']:.2f} CPU ms / pair.")
  s = result.get('search')
  if s:
    faiss = (f", faiss FlatIP {s['faiss_flat_ip']['median_s']:.3f} s, exact / faiss "
             f"{s['exact_over_faiss']:.2f}, same top-10 sets: {s['exact_sets_equal_faiss']}"
             if 'faiss_flat_ip' in s else '')
    lines.append(f"\nSearch {s['gallery']:,} x 256, 1k queries, top-10 over "
                 f"{s['devices']} device(s): exact {s['jax_exact']['median_s']:.3f} s{faiss}.")
  return '\n'.join(lines) + '\n'


def main(args) -> dict:
  begin = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)

  def log(msg):
    print(f'[{time.perf_counter() - begin:6.1f} s] {msg}', flush=True)
  dev = jax.devices()[0]
  result = {'environment': {
      'platform': jax.default_backend(), 'device_kind': dev.device_kind,
      'devices': len(jax.devices()), 'host_cpus': os.cpu_count(), 'jax': jax.__version__,
      'loadavg_start': os.getloadavg()}, 'args': vars(args)}
  parts = (('train', train_and_peer), ('pipeline', input_pipeline_rate), ('search', search))
  for name, fn in parts:
    if name in args.skip.split(','):
      continue
    t0 = time.perf_counter()
    result[name] = fn(args, log)
    result[name]['seconds'] = time.perf_counter() - t0
    log(f'{name} done in {result[name]["seconds"]:.0f} s')
  result['wall_s'] = time.perf_counter() - begin
  result['environment']['loadavg_end'] = os.getloadavg()
  with open(os.path.join(args.out, 'accelerator_check.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1, default=str)
  table = markdown(result)
  with open(os.path.join(args.out, 'accelerator_check.md'), 'w', encoding='utf-8') as f:
    f.write(table)
  print(table)
  return result


if __name__ == '__main__':
  main(ARGS)
