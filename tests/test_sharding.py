"""The sharding room: mesh sizes, logical-axis rules, fallbacks and the batch layout."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cookie_jax import sharding


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
  assert sharding.process_rows(mesh, 16) == (0, 16)  # one process holds every row
  batch = sharding.to_global(mesh, {'x': np.arange(16, dtype=np.float32)})
  assert batch['x'].sharding.spec == P(('data', 'fsdp'))
  np.testing.assert_array_equal(np.asarray(batch['x']), np.arange(16))
  assert len(batch['x'].addressable_shards) == jax.device_count()
