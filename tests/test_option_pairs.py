"""Every pair of the switches users combine either trains or is refused in one line.

A pairwise (all-pairs) design: each training group turns on several switches at once,
and `test_the_groups_cover_every_pair_that_is_not_refused` checks that together they hold
every pair the config does not refuse; the refused pairs are pinned and each refusal is
one line naming both keys. Each group trains two steps of `tiny` (one layer per tower, as
tests/test_video.py: depth is covered elsewhere) on 8 CPU devices with finite losses.
"""

import itertools

import jax
import numpy as np
import pytest

from cookie_jax import sharding, step
from cookie_jax.config import ConfigError, validate_config

from test_methods import _config, _constants  # pylint: disable=g-bad-import-order

B, T, IMG, FRAMES = 16, 8, 16, 2

# switch -> the config values that turn it on; the first key is the one a refusal names.
SWITCHES = {
    'captions': {'loss.hard_negatives.captions': True},
    'images': {'loss.hard_negatives.images': True},
    'accum': {'train.accum_steps': 2},
    'chunk': {'loss.chunk_size': 8},
    'queue': {'loss.momentum.queue_size': 2 * B, 'loss.momentum.momentum': 0.9},
    'diversity': {'loss.cross_modal.negative_weighting': 'diversity',
                  'loss.cross_modal.diversity_beta': 3.0},
    'cluster': {'loss.cluster.weight': 0.2, 'model.num_prototypes': 8},
    'concept': {'loss.concept.weight': 0.3, 'model.concept_gcn_depth': 1},
    'sigmoid': {'loss.cross_modal.form': 'sigmoid', 'model.logit_bias': True,
                'model.temperature_init': 0.1, 'model.logit_bias_init': -10.0},
    'freeze': {'train.freeze': ('vision',)},
    'patch_dropout': {'model.vision.patch_dropout': 0.5},
    'unfused': {'loss.fuse_views': 'off'},  # 'auto' fuses on 8 devices
    'video': {'model.video.num_frames': FRAMES, 'model.video.temporal': 'transformer'},
    'bf16': {'model.dtype': 'bfloat16'},
    'remat': {'model.remat': True},
}

# The pairs the config refuses (each with a one-line error naming both keys).
REFUSED = {frozenset(p) for p in [
    ('chunk', 'captions'), ('chunk', 'images'), ('chunk', 'queue'), ('chunk', 'diversity'),
    ('sigmoid', 'captions'), ('sigmoid', 'images'), ('sigmoid', 'queue'),
    ('sigmoid', 'diversity'), ('sigmoid', 'concept'), ('video', 'images')]}

# Training groups. Four is the least: chunk x concept and chunk x sigmoid need two groups
# (sigmoid refuses concept), captions x images a third (chunk and sigmoid refuse both),
# and video x captions a fourth (video refuses images).
SMALL = ('captions', 'images', 'accum')  # issue 33: GradCache differentiated the masks
GROUPS = {
    'methods': ('captions', 'images', 'accum', 'queue', 'diversity', 'cluster', 'concept',
                'freeze', 'patch_dropout', 'unfused', 'bf16', 'remat'),
    'cost_levers': ('chunk', 'sigmoid', 'video', 'accum', 'cluster', 'freeze',
                    'patch_dropout', 'unfused', 'bf16', 'remat'),
    'video_methods': ('video', 'captions', 'queue', 'diversity'),
    'chunk_concept': ('chunk', 'concept', 'video'),
}


def _switched(names):
  config = _config(**{k: v for name in names for k, v in SWITCHES[name].items()})
  config.model.vision.depth = config.model.text.depth = 1
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 2, 1
  return config


def _batches(n, video, seed=0):
  rng = np.random.default_rng(seed)
  shape = (B, FRAMES, IMG, IMG, 3) if video else (B, IMG, IMG, 3)
  out = []
  for _ in range(n):
    mask = (np.arange(T)[None] < rng.integers(3, T + 1, size=B)[:, None]).astype(np.int32)
    ids = rng.integers(5, 40, size=(B, T))  # plenty of swappable tokens 5..10
    out.append(dict(image=rng.normal(size=shape).astype(np.float32),
                    input_ids=(ids * mask).astype(np.int32), attention_mask=mask))
  return out


def _train_two_steps(names):
  config = _switched(names)
  validate_config(config, num_devices=8)
  mesh = sharding.make_mesh(config.mesh)
  state, setup = step.create_train_state(config, mesh)
  train_step = step.make_train_step(config, setup, _constants())
  history = []
  for batch in _batches(2, video='video' in names):
    state, metrics = train_step(state, sharding.to_global(mesh, batch))
    history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  assert int(state.step) == 2
  for i, metrics in enumerate(history):
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    assert not bad and metrics['nonfinite_step'] == -1, (names, i, bad)
  return history


def test_refused_pairs_are_pinned_and_each_is_one_line_naming_both_keys():
  refused = set()
  for a, b in itertools.combinations(SWITCHES, 2):
    try:
      validate_config(_switched((a, b)), num_devices=8)
    except ConfigError as e:
      refused.add(frozenset((a, b)))
      message = str(e)
      assert '\n' not in message, message
      for name in (a, b):
        assert next(iter(SWITCHES[name])) in message, (name, message)
  assert refused == REFUSED


def test_the_groups_cover_every_pair_that_is_not_refused():
  covered = {frozenset(p) for group in GROUPS.values()
             for p in itertools.combinations(group, 2)}
  wanted = {frozenset(p) for p in itertools.combinations(SWITCHES, 2)} - REFUSED
  assert not covered & REFUSED
  assert wanted <= covered, sorted(tuple(sorted(p)) for p in wanted - covered)
  for group in GROUPS.values():
    validate_config(_switched(group), num_devices=8)


def test_accumulation_with_hard_negatives_trains():
  """The crash of issue 33: GradCache differentiated the boolean `valid` masks."""
  _train_two_steps(SMALL)


@pytest.mark.slow  # four compiles of many switches on 8 devices: minutes on 2 cores
@pytest.mark.parametrize('group', sorted(GROUPS))
def test_every_group_trains_two_steps_with_finite_losses(group):
  history = _train_two_steps(GROUPS[group])
  for name in ('cross_modal', 'cluster', 'concept'):
    if f'loss/{name}' in history[0]:
      assert history[0][f'loss/{name}'] > 0, name
