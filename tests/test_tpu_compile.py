"""The train step compiled for a real multi-host TPU topology on this CPU host (libtpu's
compiler, no TPU): memory, cost estimate and collectives are reported and sane."""

import importlib.metadata
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cookie_jax import sharding, tpu_compile
from cookie_jax.config import ConfigError, default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                reason='libtpu is not installed (pip install -e ".[tpu]")')


def test_tiny_step_compiles_for_two_v5p_hosts_with_memory_cost_and_collectives(tmp_path):
  config = default_config('tiny')
  config.train.batch_size = 64
  config.mesh.update(dict(data=-1, fsdp=4))
  save = str(tmp_path / 'step.bin')
  report = tpu_compile.compile_for_slice(config, 'v5p-16', fit_batch=False,
                                         calibrate=False, save=save)
  assert (report['chips'], report['hosts']) == (8, 2)
  assert report['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  mem = report['memory']
  assert report['hbm'] == 95 * 2**30 and report['fits']
  # The arguments hold at least this chip's quarter of the fp32 parameters and their
  # two Adam moments, and everything is far below a v5p chip's HBM.
  params = 91_000  # the tiny model, about 91k parameters
  assert 3 * 4 * params / 4 * 0.9 < mem['arguments'] < 2**30
  assert 0 < mem['temporaries'] and mem['total'] < 2**30
  est = report['estimate']
  assert est['optimal_seconds'] > 0 and est['compiler_flops'] > 0
  assert 0 < est['mfu'] < 1 and est['pairs_per_sec_per_chip'] > 0
  # No loop whose body the cost model would count once (tpu_compile.COMPILER_OPTIONS).
  assert est['while_loops'] == 0
  # FSDP over 4 chips: the TPU program gathers the parameters and reduces the gradients.
  counts = report['collectives']['counts']
  assert counts['all-gather'] > 0 and counts['all-reduce'] + counts['reduce-scatter'] > 0
  assert 0.3 < report['collectives']['ratio'] < 5
  text = tpu_compile.table(report)
  assert 'estimate (TPU compiler cost model, not a measurement)' in text
  assert 'fits' in text
  _check_eval_encoders(report, text, config)
  _check_saved(report, save, config)


def _check_eval_encoders(report, text, config):
  """Evaluation's encoders at eval.batch_size (64: 8 per chip), from the same compile."""
  from cookie_jax.models import attention  # pylint: disable=g-import-not-at-top
  embed_dim, m = config.model.embed_dim, config.model

  def pad(t, stack):  # what a stack's kernels declare beyond its attention's FLOPs
    dim = stack.width // stack.heads
    return stack.depth * (attention.declared_flops(8, t, stack.heads, dim) -
                          8 * stack.heads * 4 * t * t * dim)
  image_t = (m.vision.image_size // m.vision.patch_size)**2 + 1
  padding = {'image': pad(image_t, m.vision) + pad(image_t, m.shared),
             'text': pad(config.data.max_len, m.text) + pad(config.data.max_len, m.shared)}
  for side, items in (('image', 'images'), ('text', 'texts')):
    enc = report['eval'][side]
    assert (enc['batch'], enc['per_chip_batch'], enc['fits']) == (64, 8, True)
    mem, est = enc['memory'], enc['estimate']
    # Every chip gets all 64 embeddings and their int32 mask; all of it far below HBM.
    assert 64 * embed_dim * 4 + 64 * 4 <= mem['outputs'] and mem['total'] < 2**30
    assert mem['arguments'] > 0 and mem['temporaries'] > 0
    # The compiler's FLOPs of the forward pass are our model FLOPs within 20 %, once the
    # attention kernels' padding is taken out (they declare the MXU's whole 128-wide
    # tiles: tiny's heads are 16 wide, its sequences 17 and 16 long); the estimate is a
    # time (the bool mask gave none), and the rate is per chip.
    assert 1.0 <= (est['compiler_flops'] - padding[side]) / est['model_flops'] < 1.2, est
    assert est['batch_seconds'] == est['optimal_seconds'] > 0
    assert est['per_sec_per_chip'] == pytest.approx(8 / est['batch_seconds'])
    line = next(l for l in text.splitlines() if l.startswith(f'eval {side} encoder: '))
    assert line.startswith(f'eval {side} encoder: batch 64 (8 per chip), HBM per chip: ')
    assert f'{items}/s per chip' in line and 'not a measurement' in line


def _check_saved(report, save, config):
  """The saved executable's record says what it was compiled for, and this CPU host,
  which is not that machine, refuses it in one line."""
  from cookie_jax import compiled_step  # pylint: disable=g-import-not-at-top
  assert report['saved']['bytes'] == pathlib.Path(save).stat().st_size > 2**20
  meta = json.loads(pathlib.Path(compiled_step.meta_path(save)).read_text())
  assert (meta['platform'], meta['device_kind'], meta['devices'], meta['processes']) == (
      'tpu', 'TPU v5', 8, 2)
  assert meta['libtpu'] == importlib.metadata.version('libtpu')
  assert meta['compiler_options'] == tpu_compile.COMPILER_OPTIONS
  assert f'--config.train.compiled={save}' in tpu_compile.table(report)
  with pytest.raises(ConfigError, match=r'was compiled for 8 x TPU v5; this run has 8 x cpu;'
                     ) as refused:
    compiled_step.load_train_step(save, config, sharding.make_mesh(config.mesh))
  assert '\n' not in str(refused.value)


def test_the_cost_model_counts_a_loop_body_once():
  """Why the estimate is compiled without windowed-einsum loops: a loop of 8 matmuls
  reports the FLOPs of one."""
  device = sharding.tpu_slice_devices('v5p-8')[0]
  x = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16,
                           sharding=jax.sharding.SingleDeviceSharding(device))
  one = jax.jit(lambda a, b: a @ b)
  eight = jax.jit(lambda a, b: jax.lax.fori_loop(0, 8, lambda i, c: c @ b, a))
  flops = [tpu_compile.cost(f.lower(x, x).compile())['flops'] for f in (one, eight)]
  assert flops[0] == 2 * 1024**3 and flops[1] == flops[0]


def test_bad_topologies_and_meshes_are_one_line():
  with pytest.raises(ConfigError, match=r"Unknown TPU slice 'v5p-33'; known: .*v5p-32"):
    tpu_compile.compile_for_slice(default_config('tiny'), 'v5p-33')
  config = default_config('tiny')
  config.mesh.fsdp = 3
  with pytest.raises(ConfigError, match=r'mesh.fsdp sizes that build are \[1, 2, 4, 8\]'):
    tpu_compile.compile_for_slice(config, 'v5p-16')
  config = default_config('tiny')
  config.eval.batch_size = 12  # 8 batch shards on v5p-16
  with pytest.raises(ConfigError, match=r'^config.eval.batch_size=12: the batch is split over '
                     r'the 8 batch shards of mesh .*; use a multiple of 8, or leave the '
                     r'encoders out \(--noeval\).$'):
    tpu_compile.compile_for_slice(config, 'v5p-16')
  out = subprocess.run(
      [sys.executable, str(ROOT / 'launch' / 'compile.py'),
       f'--config={ROOT / "configs" / "base.py"}:tiny', '--topology=v5p-33', '--noeval',
       '--save=/nonexistent/step.bin'],
      capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert "error: Unknown TPU slice 'v5p-33'" in out.stderr


def test_the_slice_names_are_libtpus_topologies():
  assert sharding.TPU_SLICES['v5p-32'] == 'v5p:2x2x4'
  assert sharding.TPU_SLICES['v5e-256'] == 'v5e:16x16'
  assert len(sharding.tpu_slice_devices('v6e-16')) == 16


def test_a_step_traced_for_a_tpu_mesh_on_a_cpu_host_is_the_tpu_program():
  """The model reads its target from the mesh it is traced for, not from the host's
  default backend: the CPU-only custom-VJP matmul (layers._matmul) is left out of a
  step traced here for TPU devices, and kept for CPU devices."""
  from cookie_jax.models import layers  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  w = jnp.ones((8, 4), jnp.float32)

  def jaxpr_for(devices):
    mesh = Mesh(np.asarray(devices[:1]), ('data',))
    with sharding.activation_sharding(mesh):
      platform = layers.target_platform()
      text = str(jax.make_jaxpr(jax.grad(lambda w: layers.dense_dot_general(
          jnp.ones((2, 8)), w, layers._dense_dims(jnp.ones((2, 8)))).sum()))(w))
    return platform, text

  tpu_platform, tpu_text = jaxpr_for(sharding.tpu_slice_devices('v5p-8'))
  cpu_platform, cpu_text = jaxpr_for(jax.devices('cpu'))
  assert (tpu_platform, cpu_platform) == ('tpu', 'cpu')
  assert 'custom_vjp_call' not in tpu_text and 'custom_vjp_call' in cpu_text
  assert layers.target_platform() == jax.default_backend()  # unset outside a trace


def test_an_optimal_seconds_that_is_not_a_time_gives_no_estimate():
  """libtpu 0.0.42.1's v6e cost model gave -291.6 s for `base` with remat: the report
  says there is no estimate instead of printing a negative step time and MFU."""
  assert tpu_compile.usable_seconds(0.35) == 0.35
  assert [tpu_compile.usable_seconds(x) for x in (-291.6, 0.0, float('nan'))] == [None] * 3
  est = {'optimal_seconds': -291.6, 'step_seconds': None, 'pairs_per_sec_per_chip': None,
         'mfu': None, 'model_flops': 8.3e13, 'compiler_flops': 1.05e14,
         'bytes_accessed': 7.4e11, 'while_loops': 0}
  report = {'slice': 'v6e-16', 'slices': 1, 'chips': 16, 'device_kind': 'TPU v6 lite',
            'hosts': 4, 'mesh': {'data': 2, 'fsdp': 8, 'tensor': 1}, 'batch': 4096,
            'per_chip_batch': 256, 'hbm': 32 * 2**30, 'fits': True, 'compile_seconds': 822,
            'memory': {'arguments': 0, 'temporaries': 0, 'outputs': 0, 'total': 0},
            'estimate': est,
            'collectives': {'counts': {}, 'bytes': 0, 'ratio': 0.83}}
  line = next(l for l in tpu_compile.table(report).splitlines() if l.startswith('estimate'))
  assert 'none: the cost model gave optimal_seconds = -291.6, not a time' in line
  assert 'MFU' not in line and ' ms,' not in line and 'pairs/s' not in line
  # The roofline from the same counts at the calibrated rates still gives a figure:
  # 7.4e11 bytes at 0.74 TB/s (v5e-like rates) outweigh 1.05e14 FLOPs at 918 TFLOP/s.
  est['peak_flops'] = 918e12
  report['calibration'] = {'matmul_tflops': 918.0, 'elementwise_tbps': 0.74}
  report['roofline'] = r = tpu_compile.roofline(report)
  assert r['bound'] == 'memory' and abs(r['seconds'] - 7.4e11 / 0.74e12) < 1e-9
  assert abs(r['mfu'] - 8.3e13 / r['seconds'] / 918e12) < 1e-12
  assert any(l.startswith('roofline (our arithmetic') and '1000.0 ms' in l
             and 'memory-bound' in l for l in tpu_compile.table(report).splitlines())


def test_an_encoder_the_compiler_refuses_or_gives_no_time_is_said_in_its_line():
  refused = {'batch': 65536, 'per_chip_batch': 2048, 'hbm': 16 * 2**30, 'fits': False,
             'needed': 20 * 2**30, 'compile_seconds': 40.0}
  assert tpu_compile._encoder_line('image', refused) == (
      'eval image encoder: batch 65536 (2048 per chip), does not fit: the compiler asks '
      'for 20.00 GiB of temporaries per chip, the chip has 16.00 GiB; lower '
      'eval.batch_size (compile 40 s)')
  no_time = {'batch': 64, 'per_chip_batch': 8, 'hbm': 32 * 2**30, 'fits': True,
             'compile_seconds': 1.5,
             'memory': {'arguments': 2**20, 'temporaries': 2**21, 'outputs': 2**10,
                        'total': 2**30},
             'estimate': {'compiler_flops': 1e7, 'bytes_accessed': 2e7, 'model_flops': 9e6,
                          'optimal_seconds': -1.0, 'batch_seconds': None,
                          'per_sec_per_chip': None}}
  line = tpu_compile._encoder_line('text', no_time)
  assert 'total 1.00 GiB of 32.00 GiB: fits; compile 1.5 s;' in line
  assert 'none: optimal_seconds = -1, not a time' in line and 'texts/s' not in line


def _step_profile():
  spec = importlib.util.spec_from_file_location(
      'tpu_step_profile', ROOT / 'benchmarks' / 'tpu_step_profile.py')
  profile = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(profile)
  return profile


def test_the_step_profile_counts_the_compilers_flops():
  # benchmarks/tpu_step_profile.py splits a compiled TPU program by op. On a small
  # program for one v5p chip, its FLOPs (convolutions, inside fusions too) are exactly
  # the two matmuls', which are the cost model's FLOPs but for the ReLU's.
  profile = _step_profile()
  device = sharding.tpu_slice_devices('v5p-8', 1)[0]
  single = jax.sharding.SingleDeviceSharding(device)

  def step(x, w1, w2):
    h = jnp.maximum(jnp.einsum('btd,df->btf', x, w1), 0)
    out = jnp.einsum('btf,fd->btd', h, w2)
    return jnp.swapaxes(out, 0, 1) * 2  # [T, B, D]: another layout than the matmul's
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=single)
          for s in ((64, 200, 256), (256, 1024), (1024, 256))]
  compiled = jax.jit(step).lower(*args).compile()
  rows = profile.profile(compiled.as_text(), 394e12, 2.35e12)
  flops = sum(r['flops'] for r in rows)
  assert flops == 2 * 2 * 64 * 200 * 256 * 1024
  assert flops == pytest.approx(tpu_compile.cost(compiled)['flops'], rel=0.02)
  assert sum(r['seconds'] for r in rows) > 0
  assert all(r['bytes'] > 0 for r in rows)


def test_the_attention_kernel_compiles_for_tpu_and_declares_its_cost():
  # Mosaic compiles the attention kernel and its backward for a v5p chip at ViT-B/16's
  # shapes (197 tokens: no tile multiple; 12 heads of 64 sliced in VMEM). Each declares
  # what the hardware does and the cost model takes it: the MXU's padded tiles for every
  # [197, 64] x [64, 197] and [197, 197] x [197, 64] matmul, and its blocks' bytes in
  # HBM's tiled layout.
  from cookie_jax.models import attention  # pylint: disable=g-import-not-at-top
  device = sharding.tpu_slice_devices('v5p-8', 1)[0]
  single = jax.sharding.SingleDeviceSharding(device)
  b, t, heads, dim = 8, 197, 12, 64
  x = jax.ShapeDtypeStruct((b, t, heads * dim), jnp.bfloat16, sharding=single)

  def step(q, k, v, do):
    out, vjp = jax.vjp(lambda *a: attention.fused_attention(*a, None, heads=heads), q, k, v)
    return out, vjp(do)
  compiled = jax.jit(step).lower(x, x, x, x).compile()
  declared = [tuple(int(n) for n in m) for m in re.findall(
      r'"cost_estimate":\{"flops":"(\d+)","transcendentals":"(\d+)","bytes_accessed":"(\d+)"',
      compiled.as_text())]
  tile_matmul = 2 * 200 * 128 * 256  # 197 rows -> 200, 64 -> 128, 197 -> 256
  block = b * 208 * heads * dim * 2  # bf16 [197, 768] in (16, 128) tiles
  lse = b * 16 * 256 * 4  # f32 [12, 197] in (8, 128) tiles
  scores = b * heads * t * t
  # forward: q @ k.T, p @ v; reads q, k, v, writes out and the log-sum-exp.
  # backward: q @ k.T, do @ v.T, p.T @ do, ds @ k, ds.T @ q; reads q, k, v, out, lse,
  # do, writes dq, dk, dv.
  assert sorted(declared) == sorted([(b * heads * 2 * tile_matmul, scores, 4 * block + lse),
                                     (b * heads * 5 * tile_matmul, scores, 8 * block + lse)])
  # The layout copies around the kernels have no FLOPs: the cost model's are the kernels'.
  assert tpu_compile.cost(compiled)['flops'] == sum(f for f, _, _ in declared)
  # benchmarks/tpu_step_profile.py prices the kernels as declared.
  kernels = [r for r in _step_profile().profile(compiled.as_text(), 394e12, 2.35e12)
             if r['op'] == 'custom-call']
  assert sorted((r['flops'], r['bytes']) for r in kernels) == sorted(
      (f, n) for f, _, n in declared)


@pytest.mark.slow  # (about 10 s each) test_attention.py checks the rule's effect by default
@pytest.mark.parametrize('heads', [6, 12, 16])
def test_the_longest_sequence_the_kernel_accepts_fits_vmem(heads):
  # `attention.fits` is what keeps a too-long sequence on XLA's attention instead of a
  # kernel Mosaic refuses (ViT-L/14 at 336 px: 577 tokens of 1024 do not fit its scoped
  # VMEM). The longest sequence it accepts at widths 384, 768 and 1024 compiles for v5p,
  # forward and backward, and the next 16 tokens are refused.
  from cookie_jax.models import attention  # pylint: disable=g-import-not-at-top
  width = heads * 64
  t = max(n for n in range(64, 2048) if attention.fits(n, width, jnp.bfloat16))
  assert not attention.fits(t + 16, width, jnp.bfloat16)
  single = jax.sharding.SingleDeviceSharding(sharding.tpu_slice_devices('v5p-8', 1)[0])
  x = jax.ShapeDtypeStruct((2, t, width), jnp.bfloat16, sharding=single)
  mask = jax.ShapeDtypeStruct((2, t), jnp.bool_, sharding=single)

  def step(q, k, v, do, m):
    out, vjp = jax.vjp(lambda *a: attention.fused_attention(*a, m, heads=heads), q, k, v)
    return out, vjp(do)
  compiled = jax.jit(step).lower(x, x, x, x, mask).compile()
  assert compiled.as_text().count('tpu_custom_call') == 2
