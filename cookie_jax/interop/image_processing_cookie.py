"""The image processor of a COOKIE export: cookie_jax's evaluation view, in numpy.

Remote code: `AutoImageProcessor.from_pretrained(OUT, trust_remote_code=True)` finds it
through `auto_map` in preprocessor_config.json. It needs transformers (>= 5) and numpy.

What cookie_jax's evaluation does (`cookie_jax/data/augment.py`, `eval_resize_crop`),
step for step: the shorter side is resized to `size['shortest_edge']` (the new longer
side rounded half to even), bilinearly with half-pixel centres and *no* antialiasing, as
TensorFlow's `tf.image.resize` does; then the centre crop of `crop_size`; then x / 255,
minus the training mean, over the training std. PIL's and torchvision's bilinear resizes
antialias when they shrink, which would give the model other pixels than it was trained
and evaluated on, hence this processor.
"""

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling


def _axis_weights(in_size: int, out_size: int):
  """(lower, upper, lerp) per output position; float32 arithmetic, as TensorFlow's
  ResizeBilinear with half_pixel_centers=True."""
  scale = np.float32(in_size) / np.float32(out_size)
  pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(pos)
  lower = np.maximum(floor, 0).astype(np.int64)
  upper = np.minimum(np.ceil(pos), in_size - 1).astype(np.int64)
  return lower, upper, (pos - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """float32 [C, height, width] from [C, h, w]: half-pixel bilinear, no antialiasing."""
  x = image.astype(np.float32)
  y0, y1, ly = _axis_weights(x.shape[1], height)
  x0, x1, lx = _axis_weights(x.shape[2], width)
  top_left, top_right = x[:, y0][:, :, x0], x[:, y0][:, :, x1]
  bottom_left, bottom_right = x[:, y1][:, :, x0], x[:, y1][:, :, x1]
  top = top_left + (top_right - top_left) * lx
  bottom = bottom_left + (bottom_right - bottom_left) * lx
  return top + (bottom - top) * ly[:, None]


def shorter_side_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """The size after resizing the shorter side to `shortest_edge`, as cookie_jax's eval."""
  hw = np.asarray([height, width], np.float32)
  scale = np.float32(shortest_edge) / hw.min()
  new = np.round(hw * scale).astype(np.int64)
  return int(max(new[0], shortest_edge)), int(max(new[1], shortest_edge))


class CookieImageProcessor(PilBackend):
  """Shorter side to `size['shortest_edge']`, centre crop `crop_size`, rescale, normalise.

  Inputs are PIL images or arrays ([H, W, C] or [C, H, W]); outputs `pixel_values`
  [B, 3, H, W] float32, what `CookieModel.get_image_features` takes.
  """

  model_input_names = ['pixel_values']
  resample = PILImageResampling.BILINEAR
  image_mean = [0.485, 0.456, 0.406]
  image_std = [0.229, 0.224, 0.225]
  size = {'shortest_edge': 224}
  crop_size = {'height': 224, 'width': 224}
  default_to_square = False
  do_resize = True
  do_center_crop = True
  do_rescale = True
  do_normalize = True
  do_convert_rgb = True

  def resize(self, image: np.ndarray, size, resample=None, **kwargs) -> np.ndarray:
    """[C, h, w] -> float32 [C, H, W] with the shorter side at `size.shortest_edge`
    (or exactly `size.height` x `size.width`)."""
    del resample, kwargs  # always TensorFlow's half-pixel bilinear
    if size.shortest_edge:
      height, width = shorter_side_size(image.shape[1], image.shape[2], size.shortest_edge)
    elif size.height and size.width:
      height, width = size.height, size.width
    else:
      raise ValueError(f"CookieImageProcessor: size must have 'shortest_edge' or "
                       f"'height' and 'width'; got {dict(size)}.")
    return resize_bilinear(image, height, width)

  def center_crop(self, image: np.ndarray, size, **kwargs) -> np.ndarray:
    """The centre crop, its corner rounded down as in cookie_jax (never padded)."""
    del kwargs
    top = (image.shape[1] - size.height) // 2
    left = (image.shape[2] - size.width) // 2
    if top < 0 or left < 0:
      raise ValueError(f'CookieImageProcessor: cannot crop {size.height}x{size.width} from '
                       f'an image of {image.shape[1]}x{image.shape[2]}; resize first.')
    return image[:, top:top + size.height, left:left + size.width]

  def rescale(self, image: np.ndarray, scale: float, **kwargs) -> np.ndarray:
    del kwargs
    return image.astype(np.float32) * np.float32(scale)

  def normalize(self, image: np.ndarray, mean, std, **kwargs) -> np.ndarray:
    del kwargs
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    return ((image.astype(np.float32) - mean) / std).astype(np.float32)


__all__ = ['CookieImageProcessor']
