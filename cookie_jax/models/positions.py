"""Learned position tables resized to another patch grid, as transformers resizes them.

DINOv2 keeps its table at the pre-training grid (37 x 37 for 518-pixel images at patch
14) and `Dinov2Model` resizes it to each input's grid with PyTorch's
`interpolate(mode='bicubic', align_corners=False)`; `Dinov2WithRegistersModel` passes
`antialias=True` as well. Both are separable linear maps, so each is one [new, old]
matrix per axis, built here in numpy from PyTorch's own formulas (a = -0.75 for plain
bicubic, a = -0.5 and a support widened by the scale for the antialiased one) and
applied as two small matmuls. tests/test_interop_vision.py checks them against
`torch.nn.functional.interpolate`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('bicubic', 'bicubic_antialias')


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _bicubic(old: int, new: int) -> np.ndarray:
  """aten's upsample_bicubic2d along one axis: 4 taps, edge indices clamped."""
  scale = old / new
  src = scale * (np.arange(new) + 0.5) - 0.5
  base = np.floor(src)
  t = src - base
  out = np.zeros((new, old))
  for k in range(-1, 3):
    idx = np.clip(base + k, 0, old - 1).astype(int)
    np.add.at(out, (np.arange(new), idx), _cubic(t - k, -0.75))
  return out


def _bicubic_antialias(old: int, new: int) -> np.ndarray:
  """aten's _upsample_bicubic2d_aa along one axis (PIL's resampling filter)."""
  scale = old / new
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  out = np.zeros((new, old))
  for i in range(new):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), old)
    j = np.arange(lo, hi)
    w = _cubic((j - center + 0.5) * invscale, -0.5)
    out[i, lo:hi] = w / w.sum()
  return out


@functools.lru_cache(maxsize=64)
def resize_matrix(old: int, new: int, method: str) -> np.ndarray:
  """[new, old] float32: the 1-D resize of `method` (one of METHODS) as a matrix."""
  if method not in METHODS:
    raise ValueError(f'position_interpolation={method!r}; use one of {METHODS}.')
  m = _bicubic(old, new) if method == 'bicubic' else _bicubic_antialias(old, new)
  return m.astype(np.float32)


def resize_grid(table: jax.Array, grid: int, new_hw: tuple[int, int],
                method: str) -> jax.Array:
  """[1, grid * grid, d] positions of a square grid -> [1, h * w, d] for the grid
  (h, w), the identity (no arithmetic at all) when the grid is already (h, w)."""
  h, w = new_hw
  if (h, w) == (grid, grid):
    return table
  d = table.shape[-1]
  if grid * grid != table.shape[1] or math.isqrt(table.shape[1]) != grid:
    raise ValueError(f'a position table of {table.shape[1]} rows is not a {grid}x{grid} '
                     'grid.')
  rows = jnp.asarray(resize_matrix(grid, h, method))
  cols = jnp.asarray(resize_matrix(grid, w, method))
  x = table.reshape(grid, grid, d).astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('hg,gkd->hkd', rows, x, precision=hi)
  x = jnp.einsum('wk,hkd->hwd', cols, x, precision=hi)
  return x.reshape(1, h * w, d)
