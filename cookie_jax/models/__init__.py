"""Pure Flax NNX modules: arrays in, arrays out."""

from cookie_jax.models.cookie import CookieModel, l2_normalize
from cookie_jax.models.presets import PRESETS, model_config
