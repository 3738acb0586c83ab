"""Image bytes in, upright 8-bit RGB JPEG bytes out. PIL and numpy only (no TF), so
the builders' worker processes import it cheaply.

TF's `decode_jpeg` ignores EXIF, so a phone photo stored sideways with an orientation
tag would be trained on sideways: every image is made upright here, at build time.
"""

import io
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

_ORIENTATION = 0x0112  # EXIF tag; 1 = upright, 5-8 swap width and height
SWAPS_SIDES = (5, 6, 7, 8)
# What makes a stored image of each orientation upright (as PIL's exif_transpose does).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def to_rgb(img: Image.Image) -> Image.Image:
  """8-bit RGB; 16-bit scaled (not clipped) to 8 bits, transparency over white."""
  if img.mode.startswith('I;16') or img.mode in ('I', 'F'):
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith('I;16') or arr.max() > 255:
      arr = arr / 257.0
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), 'L')
  if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
    rgba = img.convert('RGBA')
    img = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
  return img if img.mode == 'RGB' else img.convert('RGB')


def exif_orientation(img: Image.Image) -> int | None:
  """The orientation tag of the image's own EXIF (1-8); None where it has none."""
  try:
    value = img.getexif().get(_ORIENTATION)
  except Exception:  # pylint: disable=broad-except  # a broken EXIF block: treat as upright
    return 1
  if value is None:
    return None
  return value if value in range(1, 9) else 1


def orientation(img: Image.Image) -> int:
  """The image's EXIF orientation, 1 (upright) where it has none."""
  return exif_orientation(img) or 1


class Upright(NamedTuple):
  jpeg: bytes
  height: int  # of the upright source, before any resize
  width: int
  orientation: int  # the EXIF orientation that was applied (1: none)


def upright_jpeg(data: bytes, max_side: int = 0, quality: int = 95, *,
                 fallback_orientation: int = 1) -> Upright:
  """The image upright, as RGB JPEG. Raises on an unreadable image.

  The image is rotated by its EXIF orientation (by `fallback_orientation` where its bytes
  carry none: img2dataset re-encodes without EXIF but keeps the orientation in its
  metadata), converted to RGB and, where its longer side exceeds `max_side` (0 = no
  limit), resized (Lanczos) so that it is `max_side`. An upright RGB JPEG that needs no
  resize is kept byte for byte: no second generation of JPEG loss. Bytes that carry an
  orientation are turned by it alone, so an image is never turned twice.
  """
  with Image.open(io.BytesIO(data)) as img:
    fmt, turn = img.format, exif_orientation(img)
    if turn is None:
      turn = fallback_orientation if fallback_orientation in _TRANSPOSE else 1
    w, h = img.size
    scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
    if fmt == 'JPEG' and scale < 1.0:
      # DCT-domain downscaling to at least the target size: much cheaper than a full
      # decode, and every byte is still entropy-decoded, so truncation is still caught.
      img.draft(img.mode if img.mode in ('RGB', 'L') else None,
                (math.ceil(w * scale), math.ceil(h * scale)))
    img.load()
    if turn in SWAPS_SIDES:
      w, h = h, w
    if fmt == 'JPEG' and img.mode == 'RGB' and turn == 1 and scale == 1.0:
      return Upright(data, h, w, turn)
    out = to_rgb(img.transpose(_TRANSPOSE[turn]) if turn != 1 else img)
  if scale < 1.0:
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = out.resize(size, Image.Resampling.LANCZOS)
  buf = io.BytesIO()
  out.save(buf, format='JPEG', quality=quality)
  return Upright(buf.getvalue(), h, w, turn)
