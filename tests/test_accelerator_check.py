"""benchmarks/accelerator_check.py in its CPU version, at the smallest settings, so that the
one command prepared for a GPU/TPU host cannot rot: every part runs and is reported."""

import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import accelerator_check  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow
def test_cpu_version_measures_every_part(tmp_path):
  args = accelerator_check.parse_args([
      '--small', '--out', str(tmp_path), '--start_batch', '8', '--max_batch', '16',
      '--image_size', '16', '--text_len', '8', '--steps', '1', '--runs', '2',
      '--photos', '4', '--pipeline_batch', '4', '--pipeline_steps', '1',
      '--gallery', '3000', '--queries', '50', '--search_runs', '1'])
  result = accelerator_check.main(args)
  t = result['train']
  # The batch search: 8 and 16 compiled, 16 (the cap) fits in the 1 GB budget.
  assert t['batch_per_device'] == 16 and 0 < t['compiled_memory_gib'] < 0.9
  assert t['jax_pairs_per_sec'] > 0 and t['torch_pairs_per_sec'] > 0
  assert t['params'] == t['torch_params']
  assert t['jax_over_torch'] > 0 and t['flops_per_step'] > 0
  # The CPU compiler gives no step-time estimate; a TPU's would sit beside the measurement.
  assert t['measured_step_s'] > 0 and t['estimated_step_s'] is None
  assert result['pipeline']['pairs_per_sec'] > 0
  s = result['search']
  assert s['gallery'] == 3000 and s['jax_exact']['median_s'] > 0
  if 'faiss_flat_ip' in s:
    assert s['exact_sets_equal_faiss']
  with open(tmp_path / 'accelerator_check.json', encoding='utf-8') as f:
    assert json.load(f)['train']['batch_per_device'] == 16
  table = (tmp_path / 'accelerator_check.md').read_text()
  assert '| JAX / PyTorch |' in table and 'Input pipeline' in table and 'Search 3,000' in table
  assert os.path.exists(tmp_path / 'pipeline')
