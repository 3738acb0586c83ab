"""Pure Flax NNX modules: arrays in, arrays out."""

from cookie_jax.models.cookie import CookieModel, abstract_model, init_model, l2_normalize
from cookie_jax.models.presets import PRESETS, model_config
