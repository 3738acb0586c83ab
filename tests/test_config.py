"""Config schema: unknown keys and impossible values fail with key, value and fix."""

import importlib.util
import json
import pathlib

import pytest

from cookie_jax.config import ConfigError, config_from_dict, default_config, validate_config
from cookie_jax.models import presets
from cookie_jax.models.presets import VISION_PRESETS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('variant', _load('base').VARIANTS)
def test_every_variant_validates(variant):
  config = _load('base').get_config(variant)
  if config.data.builder in ('karpathy', 'msrvtt', 'img2dataset'):
    # The recipe leaves the user's tokenizer to the command line. manual_dir (the raw
    # files) is not required: a copy built in data_dir opens without it.
    with pytest.raises(ConfigError, match=r'config\.data\.tokenizer'):
      validate_config(config)
    config.data.tokenizer = '/data/bert-base-uncased'
  small = variant in ('tiny', 'demo', 'vldeformer', 'coder', 'video_demo', 'lit', 'lit_clip')
  validate_config(config, num_devices=8 if small else 256)


def test_base_variant_is_the_pretraining_recipe():
  config = _load('base').get_config('base')
  assert config.train.batch_size == 4096
  assert (config.model.vision.width, config.model.vision.depth,
          config.model.vision.patch_size) == (768, 12, 16)
  assert (config.model.text.width, config.model.text.depth) == (768, 12)
  assert config.model.shared.depth > 0


def test_web_pretraining_recipes_validate_on_coco():
  for variant, steps in (('cc3m', 19_775), ('cc12m', 63_720)):
    config = _load('base').get_config(variant)
    assert (config.data.builder, config.train.batch_size) == ('img2dataset', 4096)
    assert config.train.steps == steps and config.model.vision.width == 768
    assert config.eval.data.to_dict() == {'builder': 'karpathy', 'karpathy_dataset': 'coco',
                                      'manual_dir': ''}


@pytest.mark.parametrize('vision', list(VISION_PRESETS))
def test_every_vision_preset_validates(vision):
  # So400m/14 is SigLIP's 384-pixel tower of 14-pixel patches: a 27 x 27 grid, the
  # trailing 6 pixels dropped (as transformers' patch conv drops them).
  validate_config(default_config('base', vision=vision))


def test_unknown_variant():
  with pytest.raises(ValueError, match="Unknown variant 'nope'.*tiny"):
    _load('base').get_config('nope')


def test_unknown_key_names_it_and_suggests_the_right_one():
  config = default_config()
  config.model.vision.unlock()
  config.model.vision.widht = 64
  with pytest.raises(ConfigError, match=r"'model\.vision\.widht'.*'model\.vision\.width'"):
    validate_config(config)


def test_unknown_top_level_section():
  config = default_config()
  config.unlock()
  config.trian = {'steps': 3}
  with pytest.raises(ConfigError, match=r"Unknown config key 'trian'.*'train'"):
    validate_config(config)


def test_batch_not_divisible_by_batch_shards():
  config = default_config()
  config.train.batch_size = 20
  config.mesh.data, config.mesh.fsdp = 2, 4
  with pytest.raises(ConfigError, match=r'train\.batch_size=20.*data\*fsdp = 8.*multiple of 8'):
    validate_config(config, num_devices=8)


def test_shared_width_not_fitting_heads():
  config = default_config()
  config.model.shared.width = 30
  config.model.shared.heads = 4
  with pytest.raises(ConfigError, match=r'model\.shared\.heads=4.*width 30.*divisible'):
    validate_config(config)


def test_mesh_that_does_not_fit_the_devices():
  config = default_config()
  config.mesh.data, config.mesh.fsdp = 3, 1
  with pytest.raises(ValueError, match='needs 3 devices but 8'):
    validate_config(config, num_devices=8)


def test_external_partner_needs_its_width():
  config = default_config()
  config.loss.visual.weight = 1.0
  config.loss.visual.partner = 'external'
  with pytest.raises(ConfigError, match=r'model\.image_partner_dim=0'):
    validate_config(config)


def test_bad_choice_values():
  config = default_config()
  config.optim.schedule = 'cosin'
  with pytest.raises(ConfigError, match=r"optim\.schedule='cosin'.*'cosine'"):
    validate_config(config)
  config = default_config()
  config.loss.fuse_views = 'yes'
  with pytest.raises(ConfigError, match=r"loss\.fuse_views='yes': use 'auto', 'on' or 'off'"):
    validate_config(config)
  config = default_config()
  config.model.remat_policy = 'dot'
  with pytest.raises(ConfigError, match=r"model\.remat_policy='dot'.*'dots'"):
    validate_config(config)
  config.model.remat_policy = 'dots'  # without model.remat=True it would do nothing
  with pytest.raises(ConfigError, match=r"remat_policy='dots': has no effect without "
                     r"model\.remat=True"):
    validate_config(config)
  config.model.remat = True
  validate_config(config)


def _flag_error(argv, with_config=True):
  """What a launcher prints for `argv`: real absl + ml_collections parsing, fresh flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  if with_config:
    config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                    lock_config=True)
  flags.DEFINE_string('workdir', None, 'workdir', flag_values=values)
  flags.DEFINE_integer('step', -1, 'step', flag_values=values)
  argv = ['launcher', *argv]
  with pytest.raises(Exception) as error:  # whatever absl and ml_collections raise
    values(argv)
  return cli.flag_error(error.value, argv, has_config=with_config)


TINY = f'--config={ROOT / "configs" / "base.py"}:tiny'


@pytest.mark.parametrize('override, message', [
    # The three: each one line, with the full key and the nearest valid one.
    ('--config.train.stepz=10', "Unknown config key 'train.stepz' "
     "(--config.train.stepz=10). Did you mean 'train.steps'?"),
    ('--config.optim.learning_rate=abc', "Unknown config key 'optim.learning_rate' "
     "(--config.optim.learning_rate=abc). Did you mean 'optim.lr'?"),
    ('--config.train.total_steps=50', "Unknown config key 'train.total_steps' "
     "(--config.train.total_steps=50). Did you mean 'train.steps'?"),
    ('--config.train.lr=0.1', "Unknown config key 'train.lr' (--config.train.lr=0.1). Did "
     "you mean 'optim.lr'?"),
    ('--noconfig.train.progress_barr', "Unknown config key 'train.progress_barr' "
     "(--noconfig.train.progress_barr). Did you mean 'train.progress_bar'?"),
    ('--config.train.zzz=1', "Unknown config key 'train.zzz' (--config.train.zzz=1). Keys "
     f"of train: {sorted(default_config().train.keys())}."),
])
def test_bad_override_is_one_line_with_the_full_key_and_the_nearest(override, message):
  assert _flag_error([TINY, override, '--workdir=/tmp/x']) == message


def test_wrong_type_override_says_what_the_key_takes():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  # absl's own words for it (a private FlagValues does not register ml_collections'
  # override flags, so this one is written out; tests/test_train.py runs the launcher).
  error = flags.IllegalFlagValueError(
      "flag --config.train.steps=1.5: invalid literal for int() with base 10: '1.5'")
  assert cli.flag_error(error, ['train.py', TINY, '--config.train.steps=1.5']) == (
      "--config.train.steps=1.5: invalid literal for int() with base 10: '1.5'; "
      'config.train.steps takes an integer, e.g. --config.train.steps=100.')


def test_bad_flags_of_launchers_without_a_config_are_one_line():
  # launch/export_torch.py has no --config: the run's saved config is what it exports.
  assert _flag_error(['--config.train.steps=5'], with_config=False) == (
      "--config.train.steps=5: this launcher takes no --config, so there is nothing to "
      "override; it uses the run's saved config.")
  assert _flag_error(['--wokdir=/tmp'], with_config=False) == (
      'Unknown flag --wokdir. Did you mean --workdir?')
  assert _flag_error(['--step=abc'], with_config=False) == (
      "--step=abc: invalid literal for int() with base 10: 'abc'")
  # launch/eval.py without --config uses the run's config: an override has nothing to set.
  assert _flag_error(['--config.train.steps=5']) == (
      '--config.train.steps=5: --config.* overrides apply to a config file; add '
      '--config=FILE (e.g. configs/base.py:demo).')


def test_a_saved_config_with_a_retired_key_loads_and_a_new_one_is_refused():
  saved = json.loads(default_config('tiny').to_json())
  saved['data']['shuffle_buffer'] = 10_000  # written by versions before the global shuffle
  config = config_from_dict(saved)
  assert 'shuffle_buffer' not in config.data
  validate_config(config)
  given = default_config('tiny')
  with given.data.unlocked():
    given.data.shuffle_buffer = 5
  with pytest.raises(ConfigError, match=r"'data.shuffle_buffer' was removed: .*Drop it"):
    validate_config(given)


def test_a_hand_built_config_without_the_layout_options_takes_their_defaults():
  config = default_config()
  for key in ('registers', 'pooler', 'final_norm', 'layer_scale', 'position_grid'):
    del config.model.vision[key]
  for key in ('positions', 'hf_class', 'pad_token_id', 'layer_norm_eps'):
    del config.model.text[key]
  del config.model['vision_preset']
  validate_config(config)


def test_vision_preset_and_layouts_no_transformers_class_computes_are_refused():
  config = default_config()
  config.model.vision_preset = 'B/14'
  with pytest.raises(ConfigError, match=r"model\.vision_preset='B/14': use '', 'B/32'"):
    validate_config(config)
  # CLIP's layout with a patch bias: no transformers class computes it, so a run of it
  # could never be exported; refused before training, not at export.
  config = default_config()
  config.model.vision.update(presets.CLIP_LAYOUT, patch_bias=True)
  with pytest.raises(ConfigError, match=r'model\.vision=.*no transformers vision tower '
                     r'computes') as error:
    validate_config(config)
  assert '\n' not in str(error.value)
