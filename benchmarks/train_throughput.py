r"""Train-step throughput of our JAX step against the same model in PyTorch, in one run.

Both sides train the same COOKIE model (the preset's towers, shared layers, pooling and
heads; parameter counts are checked equal) on the same random batch with the same loss
terms and weights and the same AdamW (lr, betas, eps, weight decay and its mask,
global-norm clipping, constant learning rate). The PyTorch side is `benchmarks/torch_peer.py`:
transformers' `ViTModel` / `BertModel` and `ViTLayer`s, `torch.optim.AdamW`, as a PyTorch
user would write it (`torch.compile` on GPU). Runs alternate between the two (JAX first
in odd runs, PyTorch first in even ones), so that a change in the machine's load hits both
alike; each run times `--steps` steps after the warm-up (compilation excluded). Reported:
pairs/s medians with min–max, the JAX/PyTorch ratio of each run and its median, model
FLOPs per step (`cookie_jax/flops.py`, cross-checked against XLA's cost analysis), model
TFLOP/s and MFU where the device's peak is known.

`--loop tiny` also times the full training loop (`train.train_and_evaluate` on the synthetic
dataset: tf.data, device prefetch, logging; evaluation off) against the bare jitted step
on the same batches, once with its tf.data input and once with those batches served from
memory: on a CPU the input pipeline's threads share the cores with the step, so the
second figure is the loop's own overhead.

    python benchmarks/train_throughput.py                          # CPU: tiny and small
    python benchmarks/train_throughput.py --presets tiny --loop tiny
    python benchmarks/train_throughput.py --device gpu --presets base   # bf16, torch.compile
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--presets', default='', help='comma-separated; default: tiny,small on '
                 'CPU, base on GPU')
  p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'gpu'))
  p.add_argument('--runs', type=int, default=5)
  p.add_argument('--steps', type=int, default=0, help='steps per run (0: per preset)')
  p.add_argument('--batch_size', type=int, default=0, help='0: per preset')
  p.add_argument('--image_size', type=int, default=0, help='0: per preset')
  p.add_argument('--text_len', type=int, default=32)
  p.add_argument('--losses', default='cookie', choices=('cookie', 'cross_modal'),
                 help='cookie: cross-modal + visual (2nd view) + textual (2nd dropout '
                 'pass), weights 1, 0.5, 0.5; cross_modal: that term alone')
  p.add_argument('--dtype', default='auto', choices=('auto', 'float32', 'bfloat16'))
  p.add_argument('--torch_compile', default='auto', choices=('auto', 'on', 'off'))
  p.add_argument('--torch_threads', type=int, default=0, help='0: all cores')
  p.add_argument('--one_core', action='store_true',
                 help='pin the process to one core, PyTorch on 1 thread: CPU time per '
                 'step is then a like-for-like figure that other jobs on the machine '
                 'hardly change')
  p.add_argument('--no_torch', action='store_true')
  p.add_argument('--peak_flops', type=float, default=0.0,
                 help='peak FLOP/s per device for MFU (0: the table in cookie_jax/flops.py)')
  p.add_argument('--loop', default='', help='comma-separated presets whose full training '
                 'loop is also timed against the bare step, e.g. tiny')
  p.add_argument('--loop_intervals', type=int, default=5)
  p.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(),
                                                    'cookie_jax_train_throughput'))
  p.add_argument('--json', default='')
  return p.parse_args(argv)


# Imported (benchmarks/accelerator_check.py): the defaults, not this process's argv.
ARGS = parse_args(None if __name__ == '__main__' else [])
if ARGS.one_core:  # before JAX and PyTorch start their thread pools
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  ARGS.torch_threads = 1
if ARGS.device == 'cpu':
  os.environ['JAX_PLATFORMS'] = 'cpu'
# PyTorch shares the GPU: JAX must not take 75% of its memory up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from cookie_jax import flops as flops_lib
from cookie_jax import sharding, step as step_lib
from cookie_jax.config import default_config, validate_config
# pylint: enable=g-import-not-at-top,wrong-import-position

# (batch, image size, steps per run) by platform and preset; image size 0 = the preset's.
# On the 2-core CPU, `small` runs at 64 px (16 patches of 16 px): its 224 px step takes
# about a minute per 16 pairs there.
SETTINGS = {
    'cpu': {'tiny': (128, 0, 10), 'small': (32, 64, 2), 'base': (8, 64, 1)},
    'gpu': {'tiny': (1024, 0, 20), 'small': (256, 0, 10), 'base': (256, 0, 10)},
}


def setting(preset: str, plat: str) -> tuple[int, int, int]:
  batch, image, steps = SETTINGS[plat].get(preset, (32, 0, 5))
  return (ARGS.batch_size or batch, ARGS.image_size or image, ARGS.steps or steps)


def bench_config(preset: str, plat: str):
  batch, image, _ = setting(preset, plat)
  config = default_config(preset)
  if image:
    config.model.vision.image_size = image
  config.model.dtype = ARGS.dtype if ARGS.dtype != 'auto' else (
      'bfloat16' if plat == 'gpu' else 'float32')
  config.data.max_len = ARGS.text_len
  if ARGS.losses == 'cookie':
    config.loss.visual.weight = 0.5
    config.loss.textual.weight = 0.5
  config.train.batch_size = batch
  config.optim.schedule = 'constant'
  config.optim.warmup_steps = 0
  config.mesh.data = 1
  return validate_config(config, num_devices=1)


def random_batch(config, seed: int = 0) -> dict:
  """Normalised-pixel-like images, token ids, and padding masks of varied lengths."""
  rng = np.random.default_rng(seed)
  b, s, t = config.train.batch_size, config.model.vision.image_size, config.data.max_len
  lengths = rng.integers(max(2, t // 4), t + 1, size=b)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  batch = {'image': rng.normal(size=(b, s, s, 3)).astype(np.float32),
           'input_ids': (rng.integers(5, config.model.text.vocab_size, size=(b, t))
                         * mask).astype(np.int32),
           'attention_mask': mask}
  if config.loss.visual.weight > 0:
    batch['image_view2'] = rng.normal(size=(b, s, s, 3)).astype(np.float32)
  return batch


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan')))


class JaxTrainer:
  """Our jitted train step on one device, state donated, on a fixed batch."""

  def __init__(self, config, batch: dict):
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    self.state, setup = step_lib.create_train_state(config, mesh)
    self.batch = sharding.to_global(mesh, batch)
    t0 = time.perf_counter()
    self.step_fn = step_lib.make_train_step(config, setup).lower(
        self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.xla_flops = xla_flops(self.step_fn)

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.state.params))

  def step(self):
    self.state, _ = self.step_fn(self.state, self.batch)

  def sync(self):
    jax.block_until_ready(self.state)


def gemm_rate(n: int = 2048, runs: int = 5) -> dict[str, float]:
  """Measured fp32 GEMM rate (FLOP/s) of an n x n x n matmul in JAX and PyTorch: the
  ceiling of a matmul-bound step on this machine, for CPUs, which have no listed peak."""
  x = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)

  def rate(matmul) -> float:
    matmul()  # warm-up (and compilation)
    times = []
    for _ in range(runs):
      t0 = time.perf_counter()
      matmul()
      times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)

  f, xj = jax.jit(lambda a: a @ a), jax.device_put(x)
  out = {'jax': rate(lambda: f(xj).block_until_ready())}
  if not ARGS.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    xt = torch.from_numpy(x)
    out['torch'] = rate(lambda: xt @ xt)
  return out


def timed(trainer, steps: int) -> tuple[float, float]:
  """(wall seconds, process CPU seconds, all threads) of `steps` steps."""
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    trainer.step()
  trainer.sync()
  return time.perf_counter() - t0, time.process_time() - c0


def summary(values) -> dict:
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values),
          'runs': list(values)}


def measure(preset: str, plat: str) -> dict:
  config = bench_config(preset, plat)
  batch_np = random_batch(config)
  _, _, steps = setting(preset, plat)
  b = config.train.batch_size
  trainers = {}
  out = {'preset': preset, 'batch_size': b, 'image_size': config.model.vision.image_size,
         'text_len': config.data.max_len, 'losses': ARGS.losses, 'dtype': config.model.dtype,
         'steps_per_run': steps}
  if not ARGS.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_peer  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(ARGS.torch_threads or os.cpu_count())
    compile_model = ARGS.torch_compile == 'on' or (ARGS.torch_compile == 'auto'
                                                   and plat == 'gpu')
    t0 = time.perf_counter()
    tt = torch_peer.TorchTrainer(config, torch_peer.torch_batch(batch_np),
                                 device='cuda' if plat == 'gpu' else 'cpu',
                                 dtype=config.model.dtype, compile_model=compile_model)
    for _ in range(2):
      tt.step()
    tt.sync()
    out.update(torch_warmup_s=time.perf_counter() - t0, torch_compile=compile_model,
               torch_threads=torch.get_num_threads(), torch_params=tt.num_params())
    trainers['torch'] = tt
  jx = JaxTrainer(config, batch_np)
  for _ in range(2):  # warm-up: first executions, allocator
    jx.step()
  jx.sync()
  trainers['jax'] = jx
  out.update(jax_compile_s=jx.compile_s, params=jx.num_params())
  if out.get('torch_params', out['params']) != out['params']:
    raise RuntimeError(f"Parameter counts differ: JAX {out['params']}, PyTorch "
                       f"{out['torch_params']}; the two models are not the same.")
  pairs = {name: [] for name in trainers}
  cpu_ms = {name: [] for name in trainers}
  for run in range(ARGS.runs):
    order = list(trainers) if run % 2 == 0 else list(reversed(trainers))
    for name in order:
      wall, cpu = timed(trainers[name], steps)
      pairs[name].append(steps * b / wall)
      cpu_ms[name].append(1e3 * cpu / steps)
    print(f'  {preset} run {run + 1}: ' + ', '.join(
        f'{n} {pairs[n][-1]:.1f} pairs/s ({cpu_ms[n][-1]:.0f} CPU ms/step)'
        for n in trainers), flush=True)
  flops = flops_lib.train_step_flops(config)
  peak = flops_lib.peak_flops_per_device(config.model.dtype, override=ARGS.peak_flops)
  out['flops_per_step'] = flops['total']
  out['xla_flops_per_step'] = jx.xla_flops
  for name, values in pairs.items():
    out[f'{name}_pairs_per_sec'] = summary(values)
    out[f'{name}_cpu_ms_per_step'] = summary(cpu_ms[name])
    use = flops_lib.utilisation(flops['total'], statistics.median(values) / b, 1, peak)
    out[f'{name}_model_tflops'] = use['tflops_per_device']
    if 'mfu' in use:
      out[f'{name}_mfu'] = use['mfu']
  if 'torch' in pairs:
    out['ratio'] = summary([j / t for j, t in zip(pairs['jax'], pairs['torch'])])
    # PyTorch's CPU time over ours: the same ratio, measured in work instead of time.
    out['cpu_ratio'] = summary([t / j for j, t in zip(cpu_ms['jax'], cpu_ms['torch'])])
  if preset in ARGS.loop.split(','):
    out['loop'] = measure_loop(config, preset, steps)
  return out


def measure_loop(config, preset: str, steps: int) -> dict:
  """Full loop (`train_and_evaluate`, synthetic data, eval off) vs the bare step."""
  from cookie_jax import train  # pylint: disable=g-import-not-at-top
  from cookie_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  cfg = config.copy_and_resolve_references()
  log_every = max(steps, 20)
  cfg.data.data_dir = os.path.join(ARGS.workdir, 'tfds')
  cfg.data.synthetic.train_images = 2048
  cfg.data.synthetic.eval_images = 16
  cfg.train.steps = log_every * (ARGS.loop_intervals + 1)
  cfg.train.log_every = log_every
  cfg.train.progress_bar = False
  cfg.eval.every = 0
  cfg.eval.test_at_end = False
  cfg.checkpoint.every = 0
  cfg.checkpoint.async_save = False
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  it = pipeline.TrainIterator(cfg.data, image_size=cfg.model.vision.image_size,
                              global_batch_size=cfg.train.batch_size, seed=cfg.seed,
                              mesh=mesh, second_view=cfg.loss.visual.weight > 0)
  # The train step takes the model's inputs; the loop logs bad_records itself.
  batches = [{k: v for k, v in next(it).items() if k != 'bad_records'}
             for _ in range(log_every)]
  del it  # its tf.data threads would compete with the timed steps
  state, setup = step_lib.create_train_state(cfg, mesh)
  fn = step_lib.make_train_step(cfg, setup)
  state, _ = fn(state, batches[0])
  jax.block_until_ready(state)
  bare = []

  def bare_runs(n):
    nonlocal state
    for _ in range(n):
      t0 = time.perf_counter()
      for batch in batches:
        state, _ = fn(state, batch)
      jax.block_until_ready(state)
      bare.append(log_every * cfg.train.batch_size / (time.perf_counter() - t0))

  def loop_run(tag):
    workdir = tempfile.mkdtemp(prefix=f'loop_{preset}_{tag}_', dir=ARGS.workdir)
    train.train_and_evaluate(cfg, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      rows = [json.loads(line) for line in f]
    # The first interval includes compilation and the input pipeline's start.
    return summary([r['train/pairs_per_sec'] for r in rows if 'train/pairs_per_sec' in r][1:])

  class InMemory:
    """TrainIterator's interface over the batches above, already on the device: the loop
    with no input work, so that what it loses against the bare step is its own."""

    def __init__(self, *unused_args, **unused_kwargs):
      self.i = 0

    def __next__(self):
      self.i += 1
      return batches[(self.i - 1) % len(batches)]

    def get_state(self):
      return {'i': self.i}

    def set_state(self, state):
      self.i = state['i']

  # Bare runs before, between and after the loops, so that a change in load hits all.
  bare_runs(ARGS.loop_intervals // 2)
  out = {'steps_per_interval': log_every, 'loop_pairs_per_sec': loop_run('tfdata')}
  bare_runs(ARGS.loop_intervals - ARGS.loop_intervals // 2)
  real = pipeline.TrainIterator
  pipeline.TrainIterator = InMemory
  try:
    out['loop_in_memory_pairs_per_sec'] = loop_run('memory')
  finally:
    pipeline.TrainIterator = real
  bare_runs(ARGS.loop_intervals // 2)
  out['bare_pairs_per_sec'] = bare_s = summary(bare)
  out['loop_over_bare'] = out['loop_pairs_per_sec']['median'] / bare_s['median']
  out['loop_in_memory_over_bare'] = (out['loop_in_memory_pairs_per_sec']['median']
                                     / bare_s['median'])
  return out


def environment(plat: str) -> dict:
  import flax, optax  # pylint: disable=g-import-not-at-top,multiple-imports
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  env = {'platform': plat, 'one_core': ARGS.one_core,
         'device_kind': jax.devices()[0].device_kind, 'cpu': cpu,
         'nproc': os.cpu_count(), 'python': platform.python_version(), 'jax': jax.__version__,
         'flax': flax.__version__, 'optax': optax.__version__, 'numpy': np.__version__,
         'xla_flags': os.environ.get('XLA_FLAGS', ''), 'loadavg_start': os.getloadavg()}
  if not ARGS.no_torch:
    import torch, transformers  # pylint: disable=g-import-not-at-top,multiple-imports
    env.update(torch=torch.__version__, transformers=transformers.__version__)
  return env


def fmt(s: dict, digits: int | None = None) -> str:
  if digits is None:  # three significant digits for small rates
    digits = 1 if s['median'] >= 10 else 2
  return f"**{s['median']:.{digits}f}** ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def main():
  plat = 'gpu' if jax.default_backend() == 'gpu' else 'cpu'
  if ARGS.device == 'gpu' and plat != 'gpu':
    raise SystemExit('--device gpu: JAX sees no GPU (jax.devices() = '
                     f'{jax.devices()}); install jax[cuda12] or use --device cpu.')
  presets = ARGS.presets.split(',') if ARGS.presets else (
      ['base'] if plat == 'gpu' else ['tiny', 'small'])
  jax.config.update('jax_compilation_cache_dir', os.path.join(ARGS.workdir, 'xla_cache'))
  env = environment(plat)
  if plat == 'cpu':
    if not ARGS.no_torch:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(ARGS.torch_threads or os.cpu_count())
    env['gemm_gflops'] = {k: v / 1e9 for k, v in gemm_rate().items()}
  print(json.dumps(env))
  results = []
  for preset in presets:
    print(f'{preset}: compiling and warming up ...', flush=True)
    results.append(measure(preset, plat))
    print(json.dumps(results[-1]), flush=True)
  env['loadavg_end'] = os.getloadavg()
  print('\n| preset | batch, image, text | JAX pairs/s | PyTorch pairs/s | JAX / PyTorch '
        '| CPU ms/step JAX, PyTorch | CPU-time ratio | model GFLOP/step (XLA) '
        '| JAX TFLOP/s | MFU |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in results:
    torch_s = fmt(r['torch_pairs_per_sec']) if 'torch_pairs_per_sec' in r else '–'
    ratio = fmt(r['ratio'], 2) if 'ratio' in r else '–'
    cpu = f"{r['jax_cpu_ms_per_step']['median']:.0f}"
    cpu += f", {r['torch_cpu_ms_per_step']['median']:.0f}" if 'ratio' in r else ''
    cpu_ratio = fmt(r['cpu_ratio'], 2) if 'ratio' in r else '–'
    mfu = f"{100 * r['jax_mfu']:.1f}%" if 'jax_mfu' in r else 'n/a'
    print(f"| {r['preset']} | {r['batch_size']}, {r['image_size']} px, {r['text_len']} "
          f"| {fmt(r['jax_pairs_per_sec'])} | {torch_s} | {ratio} | {cpu} | {cpu_ratio} "
          f"| {r['flops_per_step'] / 1e9:.1f} ({r['xla_flops_per_step'] / 1e9:.1f}) "
          f"| {r['jax_model_tflops']:.4f} | {mfu} |")
  if 'gemm_gflops' in env:
    gemm = env['gemm_gflops']
    print('fp32 GEMM 2048^3: ' + ', '.join(f'{k} {v:.1f} GFLOP/s' for k, v in gemm.items()))
    for r in results:
      print(f"{r['preset']}: model GFLOP/s JAX {1e3 * r['jax_model_tflops']:.1f}"
            + (f", PyTorch {1e3 * r['torch_model_tflops']:.1f}" if 'torch_model_tflops' in r
               else '') + f" = {1e3 * r['jax_model_tflops'] / gemm['jax']:.0%} of JAX's GEMM"
            + (f", {1e3 * r['torch_model_tflops'] / gemm['torch']:.0%} of PyTorch's"
               if 'torch_model_tflops' in r and 'torch' in gemm else ''))
  for r in results:
    if 'loop' in r:
      lp = r['loop']
      print(f"{r['preset']} loop (tf.data input): {fmt(lp['loop_pairs_per_sec'])} pairs/s, "
            f"loop (in-memory input): {fmt(lp['loop_in_memory_pairs_per_sec'])}, bare step "
            f"{fmt(lp['bare_pairs_per_sec'])}; loop / bare = {lp['loop_over_bare']:.3f} "
            f"(tf.data), {lp['loop_in_memory_over_bare']:.3f} (in memory)")
  print(f"load average {env['loadavg_start']} -> {env['loadavg_end']}")
  if ARGS.json:
    with open(ARGS.json, 'w', encoding='utf-8') as f:
      json.dump({'environment': env, 'args': vars(ARGS), 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
