"""Where the TPU compiler's estimate of a train step goes: each op of the compiled TPU
program at our roofline (FLOPs at the chip's matmul rate, bytes at its memory rate), by
kind of op, by the JAX op that made it, and the layout copies.

The compiler's own `optimal_seconds` is a total; this splits the program the same way
by hand from its optimised HLO, to find what to change. Bytes are each op's operands
plus its outputs (tiling padding not counted); FLOPs are counted for convolutions (the
TPU's form of every dot), inside fusions too; a Pallas kernel counts the FLOPs and bytes
it declares (`cookie_jax/models/attention.py`), as the compiler does; a while loop's body
counts as many times as its known trip count. Estimates, not measurements. Usage:

    python benchmarks/tpu_step_profile.py --config configs/base.py:base --topology v5p-32
        [--hlo-out step.hlo]
    python benchmarks/tpu_step_profile.py --hlo step.hlo [--peak 394e12 --bandwidth 2.35e12]
"""

import argparse
import collections
import importlib.util
import json
import math
import re

from cookie_jax import comm_audit

HEADER = re.compile(r'^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$')
INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$')
FREE = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'after-all',
        'partition-id', 'replica-id', 'opt-barrier', 'copy-done', 'all-gather-done',
        'all-reduce-done', 'collective-permute-done', 'async-done', 'send-done',
        'recv-done'}


def _args():
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--config', default='configs/base.py:base')
  p.add_argument('--topology', default='v5p-32')
  p.add_argument('--hlo', default='', help='read this optimised HLO text, compile nothing')
  p.add_argument('--hlo-out', default='', help='write the compiled HLO text here')
  p.add_argument('--peak', type=float, default=0.0,
                 help='FLOP/s (default: the calibrated rate of the topology\'s chip; '
                 'with --hlo, v5p\'s 394e12)')
  p.add_argument('--bandwidth', type=float, default=0.0,
                 help='bytes/s (likewise; with --hlo, v5p\'s 2.35e12)')
  p.add_argument('--top', type=int, default=15)
  return p.parse_args()


def nbytes(text: str) -> int:
  return sum(comm_audit.shape_bytes(text))


def dims(text: str) -> list[int]:
  m = comm_audit.SHAPE.search(text)
  return [int(x) for x in m.group(2).split(',') if x] if m else []


def parse(text: str):
  """({computation: [(name, type, opcode, rest of line, line)]}, entry name)."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    header = HEADER.match(line)
    if header:
      cur = header.group(2)
      comps[cur] = []
      entry = cur if header.group(1) else entry
    elif cur and line.strip() == '}':
      cur = None
    elif cur:
      m = INSTRUCTION.match(line)
      if m:
        comps[cur].append((m.group(1), m.group(2), m.group(3), m.group(4), line))
  return comps, entry


def _contracted(line: str, lhs: list[int]) -> int:
  """The size of a convolution's contraction: lhs's input-feature dim times the window
  taps that land on real input in each spatial dim (XLA writes batched and broadcast
  dots as convolutions whose windows are mostly padding or input dilation)."""
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', line)
  if not labels or not lhs:
    return 0
  lhs_labels = labels.group(1)
  k = lhs[lhs_labels.index('f')]
  window = re.search(r'window=\{size=([\dx]+)', line)
  if window:
    sizes = [int(x) for x in window.group(1).split('x')]
    dilate = re.search(r'lhs_dilate=([\dx]+)', line)
    dilate = [int(x) for x in dilate.group(1).split('x')] if dilate else [1] * len(sizes)
    for i, (size, dil) in enumerate(zip(sizes, dilate)):
      extent = lhs[lhs_labels.index(str(i))]
      k *= max(1, min(size, extent) // dil)
  return k


# The cost a Pallas kernel declares (pl.CostEstimate), in its custom call's backend config.
DECLARED = re.compile(r'"cost_estimate":\{"flops":"(\d+)","transcendentals":"\d+",'
                      r'"bytes_accessed":"(\d+)"')


def profile(text: str, peak: float, bandwidth: float) -> list[dict]:
  """One row per op that runs: its bytes, FLOPs and roofline seconds (times trips)."""
  comps, entry = parse(text)
  shapes = {c: {n: t for n, t, *_ in ins} for c, ins in comps.items()}

  def conv_flops(comp, line, rest, typ):
    operands = re.findall(r'%([\w.\-]+)', rest.split(')')[0])
    lhs = dims(shapes[comp].get(operands[0], '')) if operands else []
    return 2 * math.prod(dims(typ)) * _contracted(line, lhs)

  def fused_flops(comp):
    total = 0
    for _, typ, op, rest, line in comps.get(comp, []):
      if op == 'convolution':
        total += conv_flops(comp, line, rest, typ)
      for callee in re.findall(r'calls=%([\w.\-]+)', line):
        total += fused_flops(callee)
    return total

  rows = []

  def walk(comp, trips):
    for _, typ, op, rest, line in comps[comp]:
      if op == 'while':
        body = re.search(r'body=%([\w.\-]+)', line).group(1)
        n = comm_audit.TRIPS.search(line)
        walk(body, trips * (int(n.group(1)) if n else 1))
        continue
      if op in ('call', 'conditional'):
        for callee in re.findall(r'%([\w.\-]+)', line.split(op + '(', 1)[1]):
          if callee in comps and callee != comp:
            walk(callee, trips)
        continue
      if op in FREE:
        continue
      operands = re.findall(r'%([\w.\-]+)', rest.split('), ')[0])
      moved = nbytes(typ) + sum(nbytes(shapes[comp].get(o, '')) for o in operands)
      declared = DECLARED.search(line) if op == 'custom-call' else None
      if declared:  # a Pallas kernel: its own declared cost, as the cost model takes it
        work, moved = int(declared.group(1)), int(declared.group(2))
      elif op == 'convolution':
        work = conv_flops(comp, line, rest, typ)
      elif op == 'fusion' and 'calls=' in line:
        work = fused_flops(re.search(r'calls=%([\w.\-]+)', line).group(1))
      else:
        work = 0
      kind = re.search(r'kind=(\w+)', line)
      name = re.search(r'op_name="([^"]*)"', line)
      bound = 'matmul-bound' if work / peak > moved / bandwidth else 'memory-bound'
      rows.append({'op': op + ('/' + kind.group(1) if kind else ''), 'bound': bound,
                   'jax_op': _jax_op(name.group(1) if name else ''),
                   'type': typ.split('{')[0], 'bytes': moved * trips,
                   'flops': work * trips,
                   'seconds': trips * max(work / peak, moved / bandwidth)})
  walk(entry, 1)
  return rows


def _jax_op(name: str) -> str:
  name = re.sub(r'^jit\([\w]+\)/', '', name)
  return re.sub(r'\b(jvp|transpose)\(|\)', '', name) or '(none)'


def _table(rows, key, top):
  groups = collections.defaultdict(lambda: [0.0, 0, 0, 0])
  for r in rows:
    g = groups[key(r)]
    g[0] += r['seconds']
    g[1] += r['bytes']
    g[2] += r['flops']
    g[3] += 1
  total = sum(r['seconds'] for r in rows)
  for name, (s, b, f, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
    print(f'  {s * 1e3:8.2f} ms {100 * s / total:5.1f}%  {b:9.3e} B  {f:9.3e} FLOPs  '
          f'{n:5d} ops  {name}')


def main():
  args = _args()
  peak, bandwidth = args.peak, args.bandwidth
  if args.hlo:
    text = open(args.hlo, encoding='utf-8').read()
    peak, bandwidth = peak or 394e12, bandwidth or 2.35e12  # v5p, tpu_compile.calibration
  else:
    from cookie_jax import sharding, tpu_compile  # pylint: disable=g-import-not-at-top
    path, _, variant = args.config.partition(':')
    spec = importlib.util.spec_from_file_location('recipe', path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.get_config(variant or None)
    devices = sharding.tpu_slice_devices(args.topology, 1)
    mesh = sharding.make_mesh(config.mesh, devices)
    compiled, seconds, _ = tpu_compile.compile_train_step(config, mesh)
    report = tpu_compile._per_chip_report(config, mesh, compiled, seconds)  # pylint: disable=protected-access
    print(json.dumps({'estimate': report['estimate'], 'compile_seconds': seconds},
                     default=str))
    rates = tpu_compile.calibration(devices[0])
    peak = peak or rates['matmul_tflops'] * 1e12
    bandwidth = bandwidth or rates['elementwise_tbps'] * 1e12
    text = compiled.as_text()
    if args.hlo_out:
      with open(args.hlo_out, 'w', encoding='utf-8') as f:
        f.write(text)
  rows = profile(text, peak, bandwidth)
  total = sum(r['seconds'] for r in rows)
  print(f'{len(rows)} ops, {sum(r["bytes"] for r in rows):.3e} bytes, '
        f'{sum(r["flops"] for r in rows):.3e} FLOPs: {total * 1e3:.1f} ms at '
        f'{peak / 1e12:.0f} TFLOP/s and {bandwidth / 1e12:.2f} TB/s (our roofline per op, '
        'an estimate)')
  print('by kind of op:')
  _table(rows, lambda r: f'{r["op"]} ({r["bound"]})', args.top)
  print('by JAX op:')
  _table(rows, lambda r: r['jax_op'][:80], args.top)
  print('layout copies, by shape:')
  _table([r for r in rows if r['op'] == 'copy'], lambda r: f'{r["type"]} {r["jax_op"][:50]}',
         args.top)


if __name__ == '__main__':
  main()
