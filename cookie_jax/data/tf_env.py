"""The one import of TensorFlow, which must never claim an accelerator.

JAX owns the GPUs/TPUs; if TF initialised them first it would reserve most of their memory
for nothing, since tf.data only runs on the host. Every module of `cookie_jax.data` that
needs TF imports it from here, so the devices are hidden before any TF op runs.
"""

import tensorflow as tf

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  # Raised only when TF already initialised its devices (someone imported and used TF
  # first); then it is too late to hide them, and failing here would not help.
  pass

__all__ = ['tf']
