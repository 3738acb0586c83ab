"""Image bytes in, upright 8-bit RGB JPEG bytes out. PIL and numpy only (no TF), so
the builders' worker processes import it cheaply.

TF's `decode_jpeg` ignores EXIF, so a phone photo stored sideways with an orientation
tag would be trained on sideways: every image is made upright here, at build time.
"""

import io
import math

import numpy as np
from PIL import Image, ImageOps

_ORIENTATION = 0x0112  # EXIF tag; 1 = upright, 5-8 swap width and height
_SWAPS_SIDES = (5, 6, 7, 8)


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


def orientation(img: Image.Image) -> int:
  try:
    value = img.getexif().get(_ORIENTATION, 1)
  except Exception:  # pylint: disable=broad-except  # a broken EXIF block: treat as upright
    return 1
  return value if value in range(1, 9) else 1


def upright_jpeg(data: bytes, max_side: int = 0, quality: int = 95) -> tuple[bytes, int, int]:
  """(JPEG bytes, height, width of the upright source). Raises on an unreadable image.

  The image is rotated by its EXIF orientation, converted to RGB and, where its longer
  side exceeds `max_side` (0 = no limit), resized (Lanczos) so that it is `max_side`.
  An upright RGB JPEG that needs no resize is kept byte for byte: no second generation
  of JPEG loss. Height and width are those before the resize.
  """
  with Image.open(io.BytesIO(data)) as img:
    fmt, turn = img.format, orientation(img)
    w, h = img.size
    scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
    if fmt == 'JPEG' and scale < 1.0:
      # DCT-domain downscaling to at least the target size: much cheaper than a full
      # decode, and every byte is still entropy-decoded, so truncation is still caught.
      img.draft(img.mode if img.mode in ('RGB', 'L') else None,
                (math.ceil(w * scale), math.ceil(h * scale)))
    img.load()
    if turn in _SWAPS_SIDES:
      w, h = h, w
    if fmt == 'JPEG' and img.mode == 'RGB' and turn == 1 and scale == 1.0:
      return data, h, w
    out = to_rgb(ImageOps.exif_transpose(img) if turn != 1 else img)
  if scale < 1.0:
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = out.resize(size, Image.Resampling.LANCZOS)
  buf = io.BytesIO()
  out.save(buf, format='JPEG', quality=quality)
  return buf.getvalue(), h, w
