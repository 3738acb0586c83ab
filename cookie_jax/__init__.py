"""cookie_jax: COOKIE vision-language pre-training in JAX/Flax."""

__version__ = "0.1.0"
