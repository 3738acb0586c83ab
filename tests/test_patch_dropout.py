"""Patch dropout (FLIP, `model.vision.patch_dropout`): the kept-token count is exact, the
kept set is a function of (seed, step) through the real train step, evaluation drops
nothing, the frames of a clip share one subset, and bad rates are refused.

8 devices = 1 with patch dropout on is pinned for the whole train step by
tests/test_sigmoid_loss.py::test_sigmoid_train_step_with_patch_dropout_on_8_devices_equals_one.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cookie_jax import sharding, step
from cookie_jax.config import ConfigError, default_config, validate_config
from cookie_jax.models import vit

from test_train_step import _batches  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_config(rate, image_size=32):
  """The tiny model: patch 8, so 32 x 32 images have N = 16 patch tokens."""
  config = default_config('tiny')
  config.model.vision.image_size = image_size
  config.model.vision.patch_dropout = rate
  return config


def _images(b=4, size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(b, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize('rate,image_size,kept', [
    (0.5, 32, 8), (0.75, 32, 4), (0.25, 32, 12),
    (0.3, 32, 11),    # 16 * 0.7 = 11.2: floor
    (0.95, 32, 1),    # 16 * 0.05 = 0.8: at least one patch
    (0.9, 80, 10),    # 100 * (1 - 0.9) is 9.999999999999998 in floats: still 10
])
def test_kept_token_count_is_cls_plus_keep_count(rate, image_size, kept):
  config = _model_config(rate, image_size)
  tower = step.init_model(config.model, 0).vision
  n = (image_size // 8) ** 2
  assert tower.keep_count(n) == kept
  images = _images(size=image_size)
  assert tower(images, rng=jax.random.key(0)).shape == (4, 1 + kept, 32)
  assert tower(images).shape == (4, 1 + n, 32)  # no rng (evaluation): all tokens


def _recording(kept_sets):
  """A `ViT.drop_patches` that also reports, through a debug callback (it runs inside
  the jitted step), the patch positions it keeps: it drops from a tensor whose tokens
  are their own indices, with the same rng."""
  original = vit.ViT.drop_patches

  def drop_patches(self, x, rng, group=1):
    index = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.float32)[None, :, None],
                             (x.shape[0], x.shape[1], 1))
    kept = original(self, index, rng, group)[:, 1:, 0].astype(jnp.int32) - 1
    jax.debug.callback(lambda k: kept_sets.append(np.asarray(k)), kept)
    return original(self, x, rng, group)
  return drop_patches


def _step_config(seed):
  config = _model_config(0.5)
  config.loss.visual.weight = config.loss.textual.weight = 0.0  # one image encoding
  config.model.vision.depth = config.model.text.depth = 1  # a quicker compile
  config.train.batch_size, config.train.steps, config.optim.warmup_steps = 16, 10, 2
  config.mesh.data = 1
  config.seed = seed
  return config


def _kept_per_step(train_step, state, mesh, batch, steps, kept_sets):
  """The kept positions of each of `steps` real train steps, all on the same batch."""
  out = []
  for _ in range(steps):
    state, _ = train_step(state, sharding.to_global(mesh, batch))
    jax.effects_barrier()
    assert len(kept_sets) == 1, len(kept_sets)  # one image encoding per step
    out.append(kept_sets.pop())
  return out


@pytest.fixture(scope='module')
def kept_by_seed_and_step():
  batch = _batches(1)[0]
  batch['image'] = np.repeat(np.repeat(batch['image'], 2, axis=1), 2, axis=2)  # 32 x 32
  config = _step_config(0)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  validate_config(config, num_devices=1)
  state, setup = step.create_train_state(config, mesh)
  init = jax.device_get(state)  # the step donates the state
  fresh = lambda: jax.device_put(init, setup.state_shardings)
  kept_sets = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(vit.ViT, 'drop_patches', _recording(kept_sets))
    train_step = step.make_train_step(config, setup)
    seed0 = _kept_per_step(train_step, fresh(), mesh, batch, 3, kept_sets)
    again = _kept_per_step(train_step, fresh(), mesh, batch, 3, kept_sets)
    # The step of config.seed=1 (the kept set depends on the seed through step_rng only).
    seed1 = _kept_per_step(step.make_train_step(_step_config(1), setup), fresh(), mesh,
                           batch, 1, kept_sets)
  return seed0, again, seed1


def test_kept_set_changes_with_the_step_and_repeats_for_the_same_seed_and_step(
    kept_by_seed_and_step):
  seed0, again, seed1 = kept_by_seed_and_step
  for kept in seed0:
    assert kept.shape == (16, 8)
    for row in kept:  # 8 distinct patch positions of 16, in their original order
      assert np.all(np.diff(row) > 0) and row[0] >= 0 and row[-1] < 16, row
    assert len({tuple(r) for r in kept}) >= 14  # each image draws its own subset
  for a, b in zip(seed0, again):  # (seed, step) alone decides, from a fresh state
    np.testing.assert_array_equal(a, b)
  # The same batch at the next step, or under another seed, keeps other patches.
  for a, b in ((seed0[0], seed0[1]), (seed0[1], seed0[2]), (seed0[0], seed1[0])):
    assert np.mean(np.any(a != b, axis=1)) >= 0.75


def test_evaluation_is_unaffected():
  images = _images(b=8)
  dropped = step.init_model(_model_config(0.5).model, 0)
  plain = step.init_model(_model_config(0.0).model, 0)
  np.testing.assert_array_equal(dropped.encode_image(images), plain.encode_image(images))
  np.testing.assert_array_equal(dropped.vision(images), plain.vision(images))
  # With an rng (training) the same model does drop: the embeddings move.
  trained = dropped.encode_image(images, rng=jax.random.key(0))
  assert np.abs(np.asarray(trained) - np.asarray(plain.encode_image(images))).max() > 1e-3


def test_the_frames_of_a_clip_keep_the_same_positions_and_clips_differ():
  config = _model_config(0.5)
  config.model.video.num_frames = 4
  model = step.init_model(config.model, 0)
  b, t = 6, 4
  clips = np.random.default_rng(1).normal(size=(b, t, 32, 32, 3)).astype(np.float32)
  kept_sets = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(vit.ViT, 'drop_patches', _recording(kept_sets))
    embedding = model.embed_image(clips, rng=jax.random.key(3))
  jax.effects_barrier()
  assert embedding.shape == (b, 32) and len(kept_sets) == 1
  kept = kept_sets[0].reshape(b, t, 8)
  np.testing.assert_array_equal(kept, np.broadcast_to(kept[:, :1], kept.shape))
  assert len({tuple(k[0]) for k in kept}) == b  # every clip its own subset
  # Evaluation of clips drops nothing either.
  plain_config = _model_config(0.0)
  plain_config.model.video.num_frames = 4
  plain = step.init_model(plain_config.model, 0)
  np.testing.assert_array_equal(model.embed_image(clips), plain.embed_image(clips))


@pytest.mark.parametrize('rate', [1.0, -0.1])
def test_rates_outside_0_1_are_refused_naming_key_value_and_fix(rate):
  config = _model_config(rate)
  with pytest.raises(ConfigError) as e:
    validate_config(config)
  assert str(e.value) == (
      f'config.model.vision.patch_dropout={rate!r}: must be in [0, 1): the fraction of '
      'patch tokens dropped in training, e.g. 0.5 (FLIP); 0 = off.')


@pytest.mark.parametrize('value,message', [
    ('a', "error: --config.model.vision.patch_dropout=a: could not convert string to "
          "float: 'a'; config.model.vision.patch_dropout takes a number, e.g. "
          "--config.model.vision.patch_dropout=0.0."),
    ('1.0', 'error: config.model.vision.patch_dropout=1.0: must be in [0, 1): the fraction '
            'of patch tokens dropped in training, e.g. 0.5 (FLIP); 0 = off.'),
])
def test_the_launcher_refuses_a_bad_rate_in_one_line(tmp_path, value, message):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
       f'--config={os.path.join(ROOT, "configs", "base.py")}:tiny',
       f'--config.model.vision.patch_dropout={value}', f'--workdir={tmp_path}'],
      capture_output=True, text=True, cwd=ROOT, timeout=120,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == message, result.stderr
