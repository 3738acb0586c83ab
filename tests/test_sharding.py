"""The sharding room: mesh sizes, logical-axis rules, fallbacks and the batch layout."""

import importlib.util
import logging
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cookie_jax import sharding
from cookie_jax.config import ConfigError, default_config, validate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh({'data': data, 'fsdp': fsdp, 'tensor': tensor})


def test_mesh_shape_resolves_the_free_axis_and_names_bad_sizes():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 1}, 8) == {
      'data': 4, 'fsdp': 2, 'tensor': 1}
  with pytest.raises(ValueError, match=r'at most one axis may be -1'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match=r'needs 6 devices but 8 are available'):
    sharding.mesh_shape({'data': 3, 'fsdp': 2, 'tensor': 1}, 8)


def test_rules_place_logical_axes_on_the_mesh():
  mesh = _mesh(1, 4, 2)
  assert sharding.logical_to_spec(('embed', 'mlp'), (16, 32), mesh) == P('fsdp', 'tensor')
  assert sharding.logical_to_spec(('vocab', 'embed'), (64, 16), mesh) == P('tensor', 'fsdp')
  assert sharding.logical_to_spec(('length', 'embed'), (5, 16), mesh) == P(None, 'fsdp')
  assert sharding.logical_to_spec((None, 'embed'), (3, 16), mesh) == P(None, 'fsdp')
  assert sharding.logical_to_spec((), (), mesh) == P()
  # Activations: the batch over data x fsdp, the width never over fsdp.
  assert sharding.logical_to_spec(('batch', 'length', 'embed'), (8, 5, 16), mesh,
                                  sharding.ACTIVATION_RULES) == P('fsdp', None, None)


def test_an_unknown_logical_axis_raises_naming_the_array():
  with pytest.raises(ValueError, match=r"vision/kernel: unknown logical axis 'embd'.*'embed'"):
    sharding.logical_to_spec(('embd', 'mlp'), (16, 32), _mesh(1, 4, 2), what='vision/kernel')
  # 'batch' is an activation axis, not a parameter axis.
  with pytest.raises(ValueError, match=r"unknown logical axis 'batch'"):
    sharding.logical_to_spec(('batch',), (8,), _mesh(8, 1, 1))


def test_an_undivided_dimension_stays_replicated_and_is_logged_once(caplog):
  mesh = _mesh(1, 4, 2)
  caplog.set_level(logging.INFO)
  for _ in range(3):
    spec = sharding.logical_to_spec(('embed', 'mlp'), (6, 32), mesh, what='odd/kernel')
    assert spec == P(None, 'tensor')
  lines = [r.getMessage() for r in caplog.records if 'odd/kernel' in r.getMessage()]
  assert len(lines) == 1, lines
  assert "logical axis 'embed' (size 6) stays replicated" in lines[0]
  assert '4 does not divide 6' in lines[0]


def test_a_mesh_axis_of_size_one_is_no_fallback(caplog):
  caplog.set_level(logging.INFO)
  assert sharding.logical_to_spec(('embed',), (6,), _mesh(8, 1, 1), what='one/bias') == P(None)
  assert not [r for r in caplog.records if 'one/bias' in r.getMessage()]


def test_batch_specs_and_process_rows():
  mesh = _mesh(2, 4, 1)
  assert sharding.batch_spec() == P(('data', 'fsdp'))
  assert sharding.batch_spec(stacked=True) == P(None, ('data', 'fsdp'))
  assert sharding.batch_shards(mesh) == 8
  assert sharding.gallery_spec(mesh) == P(('data', 'fsdp', 'tensor'))
  # One process holds every row.
  np.testing.assert_array_equal(sharding.process_rows(mesh, 16), np.arange(16))
  batch = sharding.to_global(mesh, {'x': np.arange(16, dtype=np.float32)})
  assert batch['x'].sharding.spec == P(('data', 'fsdp'))
  np.testing.assert_array_equal(np.asarray(batch['x']), np.arange(16))
  assert len(batch['x'].addressable_shards) == jax.device_count()


# -- real TPU slices, as libtpu describes them on this CPU host (no TPU, no compile) ----

SLICES = ('v5e-16', 'v5e-256', 'v5p-32', 'v5p-128', 'v6e-16', 'v6e-256')
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')


def _recipe(variant):
  spec = importlib.util.spec_from_file_location('base', ROOT / 'configs' / 'base.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _rows_placed_on(mesh, global_batch, process_index):
  """The batch rows on a host's devices, read off the mesh's device grid directly: the
  batch is split over data x fsdp, row-major, so the device at grid position (i, j, t)
  holds shard i * fsdp + j."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  per = global_batch // shards
  rows = set()
  for (i, j, _), device in np.ndenumerate(mesh.devices):
    if device.process_index == process_index:
      k = i * mesh.shape['fsdp'] + j
      rows.update(range(k * per, (k + 1) * per))
  return np.array(sorted(rows))


@needs_libtpu
@pytest.mark.parametrize('variant', ['base', 'cc3m'])
@pytest.mark.parametrize('name', SLICES)
def test_recipe_meshes_build_on_real_tpu_slices_and_each_host_reads_its_rows(name, variant):
  devices = sharding.tpu_slice_devices(name)
  config = _recipe(variant)
  mesh = sharding.make_mesh(config.mesh, devices)
  assert mesh.devices.size == len(devices)
  batch = config.train.batch_size
  hosts = sorted({d.process_index for d in devices})
  owned = []
  for p in hosts:
    rows = sharding.process_rows(mesh, batch, p)
    np.testing.assert_array_equal(rows, _rows_placed_on(mesh, batch, p))
    assert len(rows) == batch // len(hosts)
    owned.append(rows)
  np.testing.assert_array_equal(np.sort(np.concatenate(owned)), np.arange(batch))


@needs_libtpu
def test_on_v5p_32_the_hosts_rows_interleave():
  """The case a per-host contiguous block got wrong: on v5p-32 the torus order puts each
  of the 4 hosts' rows in 4 separate runs (16 runs in all)."""
  mesh = sharding.make_mesh(_recipe('base').mesh, sharding.tpu_slice_devices('v5p-32'))
  runs = [1 + int(np.sum(np.diff(sharding.process_rows(mesh, 4096, p)) != 1))
          for p in range(4)]
  assert runs == [4, 4, 4, 4]


@needs_libtpu
def test_several_slices_split_the_batch_over_dcn_data():
  devices = sharding.tpu_slice_devices('v5e-16', slices=2)
  config = _recipe('base')
  config.mesh.dcn_data = 2
  mesh = sharding.make_mesh(config.mesh, devices)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 8, 'tensor': 1}
  # Slice s holds the s-th half of the batch: the gradient all-reduce crosses DCN once.
  for s in (0, 1):
    hosts = {d.process_index for d in devices if d.slice_index == s}
    rows = np.concatenate([sharding.process_rows(mesh, 4096, p) for p in sorted(hosts)])
    np.testing.assert_array_equal(np.sort(rows), np.arange(s * 2048, (s + 1) * 2048))
  for dcn, fix in ((1, 'mesh.dcn_data=2'), (3, 'mesh.dcn_data=2')):
    config.mesh.dcn_data = dcn
    with pytest.raises(ConfigError, match=r'^config\.mesh\.dcn_data=%d: .*%s' % (dcn, fix)):
      sharding.make_mesh(config.mesh, devices)


@needs_libtpu
def test_a_mesh_or_batch_the_slice_cannot_hold_is_one_line():
  devices = sharding.tpu_slice_devices('v5p-32')
  with pytest.raises(ConfigError) as e:
    sharding.make_mesh({'data': -1, 'fsdp': 3, 'tensor': 1}, devices)
  assert 'config.mesh=' in str(e.value) and '\n' not in str(e.value)
  assert 'does not divide the 16 devices' in str(e.value)
  config = default_config('tiny')
  config.mesh.update(_recipe('base').mesh)
  config.train.batch_size = 100
  with pytest.raises(ConfigError, match=r'config\.train\.batch_size=100: .*multiple of 16'):
    validate_config(config, num_devices=len(devices))
  with pytest.raises(ConfigError, match=r"Unknown TPU slice 'v5p-31'; known: .*v5p-32"):
    sharding.tpu_slice_devices('v5p-31')
