"""A recipe compiled for a TPU slice on any host, and what the TPU compiler says of it.

`libtpu` describes every TPU topology on any host (`sharding.tpu_slice_devices`), and a
`jax.jit` over a mesh of those devices lowers and compiles the real TPU program on the
CPU, as MaxText's `train_compile.py` does. From the compiled program:

* **memory** per chip (`memory_analysis()`): arguments, outputs, temporaries and code,
  against the chip's HBM: whether the step fits, before a slice is reserved;
* **speed**, an *estimate* (`cost_analysis()`): the compiler's FLOPs, bytes accessed and
  `optimal_seconds`, its roofline estimate of the step on that chip. The MFU divides
  our own model FLOPs (`flops.py`), never the compiler's, by that time. A calibration on
  the same chip (a replicated 8192^3 bf16 matmul and a 1 GiB elementwise op) is reported
  beside it, so the reader sees what the cost model assumes of the chip;
* **collectives** of the TPU program, counted by `comm_audit` against the FSDP ideal;
* **evaluation's encoders** (`compile_eval_encoder`): the image and text jits that
  validation and `launch/eval.py` run, at `eval.batch_size`: memory against HBM and the
  cost model's images or texts per second per chip.

The compiled step can be saved for `train.compiled` (`compiled_step`). Nothing here is
measured on a TPU; every speed figure is labelled an estimate.
"""

import math
import re
import time

import jax
import jax.numpy as jnp
import ml_collections

from cookie_jax import comm_audit, compiled_step, flops as flops_lib, sharding
from cookie_jax.data.defaults import clip_frames, eval_data_config
from cookie_jax.errors import ConfigError
from cookie_jax.eval import protocol

GiB = 2**30

# HBM per chip (GiB), by libtpu's device kind.
HBM_GIB = {'TPU v4': 32, 'TPU v5 lite': 16, 'TPU v5': 95, 'TPU v6 lite': 32}


def chip_hbm_bytes(device) -> int:
  kind = device.device_kind
  if kind not in HBM_GIB:
    raise ConfigError(f'No HBM size is known for {kind!r}; known: {sorted(HBM_GIB)}.')
  return HBM_GIB[kind] * GiB


def memory(compiled) -> dict[str, int]:
  """Bytes per chip: what the program's buffers take, and their total."""
  m = compiled.memory_analysis()
  out = {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
         'aliased': m.alias_size_in_bytes, 'temporaries': m.temp_size_in_bytes,
         'code': m.generated_code_size_in_bytes}
  # Donated (aliased) outputs reuse their arguments' buffers.
  out['total'] = (out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries']
                  + out['code'])
  return out


def cost(compiled) -> dict[str, float]:
  """The compiler's estimate per chip: FLOPs, bytes accessed, optimal_seconds."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return {k: float(analysis.get(k, float('nan')))
          for k in ('flops', 'bytes accessed', 'optimal_seconds')}


def usable_seconds(seconds: float) -> float | None:
  """`optimal_seconds` where it is a time, else None: NaN where a backend gives none, and
  a negative value seen from libtpu 0.0.42.1's v6e cost model for `base` with remat
  (-291.6 on v6e-16; the same program's v5p estimate is positive)."""
  return seconds if math.isfinite(seconds) and seconds > 0 else None


# The TPU compiler's cost analysis counts the body of a while loop once, not once per
# trip: a loop of 8 bf16 2048^3 matmuls on v5p reports the FLOPs of one. Its SPMD
# partitioner turns FSDP's weight all-gathers and gradient reduce-scatters into such
# loops ("windowed einsums", one matmul slice per step of the ring), so with them the
# estimate leaves out most of those matmuls' FLOPs and bytes. Compiled without them,
# the collectives are plain all-gathers and reduce-scatters beside whole matmuls that the
# cost model counts in full; `while_loops` in the report says how many loops are left.
COMPILER_OPTIONS = {'xla_tpu_enable_windowed_einsum_for_all_gather': False,
                    'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False}


def compile_train_step(config: ml_collections.ConfigDict, mesh):
  """(compiled train step, seconds to lower and compile it, its lowering) of `config` over
  `mesh`, compiled with `COMPILER_OPTIONS`; the lowering identifies the program of a
  saved executable (`compiled_step`)."""
  start = time.perf_counter()
  lowered = compiled_step.lower_train_step(config, mesh)
  compiled = lowered.compile(compiler_options=COMPILER_OPTIONS)
  return compiled, time.perf_counter() - start, lowered


# What each evaluation encoder embeds, for its rate.
ENCODED = {'image': 'images', 'text': 'texts'}


def compile_eval_encoder(config: ml_collections.ConfigDict, mesh, side: str) -> dict:
  """The report of evaluation's `side` ('image' or 'text') encoder over `mesh`: the
  program validation and `launch/eval.py` run (`protocol.abstract_encoder`), at
  `eval.batch_size`, compiled with `COMPILER_OPTIONS`. Per chip: memory against HBM,
  and the compiler's estimate of a batch's time and so of the items encoded per second;
  a program the compiler refuses for want of HBM gives what it said it needs."""
  fn, args = protocol.abstract_encoder(config, mesh, side)
  batch, devices = int(config.eval.batch_size), mesh.devices.size
  out = {'batch': batch, 'per_chip_batch': batch / devices,
         'hbm': chip_hbm_bytes(mesh.devices.flat[0])}
  start = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile(compiler_options=COMPILER_OPTIONS)
  except jax.errors.JaxRuntimeError as e:
    needed = _required_bytes(e)
    if needed is None:
      raise
    return {**out, 'fits': False, 'needed': needed,
            'compile_seconds': time.perf_counter() - start}
  seconds = time.perf_counter() - start
  mem, est = memory(compiled), cost(compiled)
  batch_s = usable_seconds(est['optimal_seconds'])
  return {**out, 'memory': mem, 'fits': mem['total'] <= out['hbm'],
          'compile_seconds': seconds,
          'estimate': {'compiler_flops': est['flops'], 'bytes_accessed': est['bytes accessed'],
                       'optimal_seconds': est['optimal_seconds'], 'batch_seconds': batch_s,
                       'model_flops': _encoder_flops(config, side) / devices,
                       'per_sec_per_chip': batch / devices / batch_s if batch_s else None}}


def _encoder_flops(config, side: str) -> int:
  """Our model FLOPs of one eval batch through the `side` encoder (`flops.py`)."""
  model, rows = config.model, config.eval.batch_size
  data_cfg = eval_data_config(config.data, config.eval.data)
  parts = (flops_lib.embed_image_flops(model, rows, clip_frames(data_cfg) or 0)
           if side == 'image' else flops_lib.embed_text_flops(model, rows, data_cfg.max_len))
  return sum(parts.values())


def calibration(device) -> dict[str, float]:
  """What the cost model assumes of one chip: TFLOP/s of a replicated 8192^3 bf16 matmul
  and TB/s of a 1 GiB elementwise op, each from its `optimal_seconds`."""
  single = jax.sharding.SingleDeviceSharding(device)

  def estimate(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=single) for s in shapes]
    return cost(jax.jit(fn).lower(*args).compile())['optimal_seconds']

  n = 8192
  matmul = estimate(jnp.matmul, (n, n), (n, n))
  elems = GiB // 2  # bf16: 1 GiB read, 1 GiB written
  elementwise = estimate(lambda x: x * 2 + 1, (elems,))
  return {'matmul_tflops': 2 * n**3 / matmul / 1e12,
          'elementwise_tbps': 2 * GiB / elementwise / 1e12}


def _per_chip_report(config, mesh, compiled, seconds) -> dict:
  devices = mesh.devices.size
  device = mesh.devices.flat[0]
  hbm = chip_hbm_bytes(device)
  mem = memory(compiled)
  est = cost(compiled)
  model_flops = flops_lib.train_step_flops(config)['total'] / devices
  peak = flops_lib.peak_flops_per_device(config.model.dtype, device)
  step_s = usable_seconds(est['optimal_seconds'])
  text = compiled.as_text()
  audit = comm_audit.audit(config, mesh, {'partitioned': None, 'optimised': text})
  return {
      'batch': int(config.train.batch_size),
      'per_chip_batch': config.train.batch_size / devices,
      'memory': mem, 'hbm': hbm, 'fits': mem['total'] <= hbm,
      'compile_seconds': seconds,
      'estimate': {
          'compiler_flops': est['flops'], 'bytes_accessed': est['bytes accessed'],
          'optimal_seconds': est['optimal_seconds'], 'step_seconds': step_s,
          'model_flops': model_flops,
          'pairs_per_sec_per_chip': (config.train.batch_size / devices / step_s
                                     if step_s else None),
          'mfu': model_flops / step_s / peak if peak and step_s else None,
          'peak_flops': peak,
          'while_loops': len(re.findall(r'\swhile\(', text)),
      },
      'collectives': {'bytes': audit['bytes'], 'ideal': audit['ideal'],
                      'ratio': audit['ratio'],
                      'counts': {k: r['count'] for k, r in audit['rows'].items()}},
  }


def _required_bytes(error: Exception) -> int | None:
  """What the TPU compiler says a program that does not fit needs, in bytes."""
  m = re.search(r'RESOURCE_EXHAUSTED: .*?\(([\d.]+)([KMGT])\) exceeds', str(error))
  if not m:
    return None
  return int(float(m.group(1)) * 1024 ** ('KMGT'.index(m.group(2)) + 1))


def compiled_total(config, mesh) -> tuple[int, bool]:
  """(bytes per chip, whether the compiler accepted it) of `config`'s step over `mesh`;
  a program the compiler refuses for want of HBM gives what it said it needs."""
  try:
    return memory(compile_train_step(config, mesh)[0])['total'], True
  except jax.errors.JaxRuntimeError as e:
    needed = _required_bytes(e)
    if needed is None:
      raise
    return needed, False


def largest_batch(config, mesh, first: dict, budget: float = 0.9, tries: int = 3) -> dict:
  """The largest global batch (a multiple of the batch shards) whose step fits in
  `budget` of HBM: memory = fixed + per_pair * batch from two compiles (the configured
  batch and twice it), extrapolated, then compiled to check and refitted, at most
  `tries` times."""
  shards, hbm = sharding.batch_shards(mesh), first['hbm']
  b1, m1 = config.train.batch_size, first['memory']['total']

  def at(batch):
    trial = config.copy_and_resolve_references()
    trial.train.batch_size = batch
    return compiled_total(trial, mesh)

  m2, _ = at(2 * b1)
  per_pair = max((m2 - m1) / b1, 1.0)
  fixed = m1 - per_pair * b1
  best, compiles = (b1 if m1 <= budget * hbm else 0), 1
  guess = int((budget * hbm - fixed) / per_pair) // shards * shards
  for _ in range(tries):
    if guess <= best:
      break
    total, accepted = at(guess)
    compiles += 1
    if accepted and total <= budget * hbm:
      best = guess
      break
    # Refit the line through (b1, m1) and this point, and aim below it.
    per_pair = max((total - m1) / (guess - b1), 1.0)
    guess = int((budget * hbm - m1) / per_pair + b1) // shards * shards
  return {'batch': best, 'per_chip_batch': best / mesh.devices.size,
          'compiles': compiles + 1}


def compile_for_slice(config: ml_collections.ConfigDict, slice_name: str, *,
                      slices: int = 1, fit_batch: bool = True, calibrate: bool = True,
                      eval_encoders: bool = True, save: str = '') -> dict:
  """The train step of `config` compiled for `slices` TPU slices of type `slice_name`
  (e.g. 'v5p-32'), with the mesh a run there would use, and evaluation's image and text
  encoders unless `eval_encoders` is False. Returns the report (see the module doc);
  speed figures are the TPU compiler's estimates. `save`: a path to write the step's
  executable to, with its metadata record beside it (`compiled_step.save_compiled`), for
  `train.compiled` on that slice."""
  devices = sharding.tpu_slice_devices(slice_name, slices)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.process_rows(mesh, config.train.batch_size, 0)  # a batch the mesh divides
  shards = sharding.batch_shards(mesh)
  if eval_encoders and config.eval.batch_size % shards:
    raise ConfigError(f'config.eval.batch_size={config.eval.batch_size}: the batch is split '
                      f'over the {shards} batch shards of mesh {dict(mesh.shape)}; use a '
                      f'multiple of {shards}, or leave the encoders out (--noeval).')
  try:
    compiled, seconds, lowered = compile_train_step(config, mesh)
  except jax.errors.JaxRuntimeError as e:
    needed = _required_bytes(e)
    if needed is None:
      raise
    hbm = chip_hbm_bytes(devices[0])
    raise ConfigError(
        f'{slice_name}: the train step at train.batch_size={config.train.batch_size} needs '
        f'{needed / GiB:.1f} GiB of temporaries per chip, the chip has {hbm / GiB:.0f} GiB: '
        f'it does not fit, by at least {(needed - hbm) / GiB:.1f} GiB. Lower '
        'train.batch_size, set model.remat=True, or raise mesh.fsdp.') from None
  report = {'slice': slice_name, 'slices': slices, 'chips': len(devices),
            'hosts': len({d.process_index for d in devices}),
            'device_kind': devices[0].device_kind, 'mesh': dict(mesh.shape),
            'jax': jax.__version__, **_per_chip_report(config, mesh, compiled, seconds)}
  if save:
    meta = compiled_step.metadata(lowered, mesh, config, COMPILER_OPTIONS)
    report['saved'] = {'path': save, 'meta': compiled_step.meta_path(save),
                       'bytes': compiled_step.save_compiled(compiled, save, meta)}
  if eval_encoders:
    report['eval'] = {side: compile_eval_encoder(config, mesh, side) for side in ENCODED}
  if calibrate:
    report['calibration'] = calibration(devices[0])
    report['roofline'] = roofline(report)
  if fit_batch:
    report['largest_batch'] = largest_batch(config, mesh, report)
  return report


def roofline(report: dict) -> dict:
  """Our own arithmetic on the compiler's counts: the step's FLOPs at the calibrated
  matmul rate or its bytes at the calibrated elementwise rate, whichever is slower, with
  nothing for collectives or imperfect overlap. A cross-check of `optimal_seconds`, and
  the only speed figure where the cost model gives none (v5e and v6e with libtpu
  0.0.42.1: docs/BENCHMARKS.md, "TPU compile")."""
  est, cal = report['estimate'], report['calibration']
  compute = est['compiler_flops'] / (cal['matmul_tflops'] * 1e12)
  memory_s = est['bytes_accessed'] / (cal['elementwise_tbps'] * 1e12)
  seconds = max(compute, memory_s)
  peak = est['peak_flops']
  return {'seconds': seconds, 'bound': 'memory' if memory_s > compute else 'compute',
          'pairs_per_sec_per_chip': report['per_chip_batch'] / seconds,
          'mfu': est['model_flops'] / seconds / peak if peak else None}


def _encoder_line(side: str, r: dict) -> str:
  """One line of an evaluation encoder's report (`compile_eval_encoder`)."""
  g = lambda b: f'{b / GiB:.2f} GiB'
  head = f'eval {side} encoder: batch {r["batch"]} ({r["per_chip_batch"]:g} per chip), '
  if 'needed' in r:
    return (head + f'does not fit: the compiler asks for {g(r["needed"])} of temporaries '
            f'per chip, the chip has {g(r["hbm"])}; lower eval.batch_size '
            f'(compile {r["compile_seconds"]:.0f} s)')
  mem, est = r['memory'], r['estimate']
  verdict = 'fits' if r['fits'] else f'does not fit, by {g(mem["total"] - r["hbm"])}'
  speed = (f'{est["batch_seconds"] * 1e3:.3g} ms a batch, {est["per_sec_per_chip"]:.0f} '
           f'{ENCODED[side]}/s per chip' if est['batch_seconds'] else
           f'none: optimal_seconds = {est["optimal_seconds"]:.4g}, not a time')
  return (head + f'HBM per chip: arguments {g(mem["arguments"])}, temporaries '
          f'{g(mem["temporaries"])}, outputs {g(mem["outputs"])}, total {g(mem["total"])} '
          f'of {g(r["hbm"])}: {verdict}; compile {r["compile_seconds"]:.1f} s; estimate (TPU '
          f'compiler cost model, not a measurement): {speed} (model FLOPs '
          f'{est["model_flops"]:.3g} per chip; compiler FLOPs {est["compiler_flops"]:.3g}, '
          f'bytes {est["bytes_accessed"]:.3g})')


def table(report: dict) -> str:
  """The report as a few lines of text; speed figures marked as estimates."""
  mem, est = report['memory'], report['estimate']
  g = lambda b: f'{b / GiB:.2f} GiB'
  verdict = ('fits' if report['fits'] else
             f'does not fit, by {g(mem["total"] - report["hbm"])}')
  lines = [
      f'{report["slice"]} x {report["slices"]}: {report["chips"]} chips '
      f'({report["device_kind"]}) on {report["hosts"]} hosts, mesh {report["mesh"]}, '
      f'batch {report["batch"]} ({report["per_chip_batch"]:g} per chip)',
      f'HBM per chip: arguments {g(mem["arguments"])}, temporaries '
      f'{g(mem["temporaries"])}, outputs {g(mem["outputs"])}, total {g(mem["total"])} '
      f'of {g(report["hbm"])}: {verdict}',
      f'compile: {report["compile_seconds"]:.0f} s',
      'estimate (TPU compiler cost model, not a measurement): '
      + (f'step {est["step_seconds"] * 1e3:.1f} ms, {est["pairs_per_sec_per_chip"]:.0f} '
         f'pairs/s per chip, MFU ' + (f'{est["mfu"]:.1%}' if est['mfu'] is not None else 'n/a')
         if est['step_seconds'] else
         f'none: the cost model gave optimal_seconds = {est["optimal_seconds"]:.4g}, not '
         'a time, for this program')
      + f' (model FLOPs {est["model_flops"]:.3g} per chip; compiler FLOPs '
      f'{est["compiler_flops"]:.3g}, bytes {est["bytes_accessed"]:.3g}'
      + (f'; {est["while_loops"]} while loops, each body counted once' if
         est['while_loops'] else '') + ')',
      f'collectives: {report["collectives"]["counts"]}, '
      f'{report["collectives"]["bytes"] / 2**20:.1f} MiB per chip = '
      f'{report["collectives"]["ratio"]:.2f}x the FSDP ideal',
  ]
  for side, encoder in report.get('eval', {}).items():
    lines.append(_encoder_line(side, encoder))
  if 'saved' in report:
    saved = report['saved']
    lines.append(f'saved the train step: {saved["path"]} ({saved["bytes"] / 2**20:.1f} MiB) '
                 f'and {saved["meta"]}; on that slice run with '
                 f'--config.train.compiled={saved["path"]}')
  if 'calibration' in report:
    c = report['calibration']
    lines.append(f'calibration (same cost model): 8192^3 bf16 matmul '
                 f'{c["matmul_tflops"]:.0f} TFLOP/s, 1 GiB elementwise '
                 f'{c["elementwise_tbps"]:.2f} TB/s')
  if 'roofline' in report:
    r = report['roofline']
    lines.append(
        f'roofline (our arithmetic: compiler FLOPs and bytes at those rates, nothing for '
        f'collectives or overlap): step {r["seconds"] * 1e3:.1f} ms, '
        f'{r["pairs_per_sec_per_chip"]:.0f} pairs/s per chip, MFU '
        + (f'{r["mfu"]:.1%}' if r['mfu'] is not None else 'n/a') + f', {r["bound"]}-bound')
  if 'largest_batch' in report:
    lb = report['largest_batch']
    lines.append(f'largest batch in 90% of HBM: {lb["batch"]} '
                 f'({lb["per_chip_batch"]:g} per chip), from {lb["compiles"]} compiles')
  return '\n'.join(lines)
