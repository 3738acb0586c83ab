"""Image decoding and augmentation as TF ops, random only through explicit inputs.

Every random choice takes a `[2]` seed tensor, or uniform numbers, that the input
pipeline derives from (config seed, global position of the row) (see `order.py`), never
TF's stateful generators, so the same position gives the same crop on any run, at any
parallelism, on any number of processes, after any restart.
"""

import math

from cookie_jax.data.tf_env import tf

_WHOLE_IMAGE = [[[0.0, 0.0, 1.0, 1.0]]]


def _crop_window(shape, seed, area_range, aspect_ratio_range):
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant(_WHOLE_IMAGE), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=aspect_ratio_range, area_range=area_range, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return begin, size


def decode_random_crop(image_bytes, seed, *, area_range, aspect_ratio_range):
  """uint8 [h, w, 3]: a random crop of `area_range` of the image, `aspect_ratio_range`."""

  def jpeg():
    # Decode only the crop window: for large photos most of the decoding is skipped.
    shape = tf.io.extract_jpeg_shape(image_bytes)
    begin, size = _crop_window(shape, seed, area_range, aspect_ratio_range)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    begin, size = _crop_window(tf.shape(image), seed, area_range, aspect_ratio_range)
    return tf.slice(image, begin, size)

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  return tf.ensure_shape(image, [None, None, 3])


def train_view(image_bytes, seed, *, size, area_range, aspect_ratio_range, flip):
  """float32 [size, size, 3] in [0, 255]: random resized crop, optional horizontal flip."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = decode_random_crop(image_bytes, crop_seed, area_range=area_range,
                             aspect_ratio_range=aspect_ratio_range)
  # Plain bilinear, as in big_vision's inception crop: an antialiased resize costs as much
  # as the JPEG decode itself, and the random crop scale already varies the blur.
  image = tf.image.resize(image, [size, size], method='bilinear')
  if flip:
    coin = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(coin, lambda: tf.image.flip_left_right(image), lambda: image)
  return image


def batch_train_view(images, seed=None, *, size, area_range, aspect_ratio_range, flip,
                     uniforms=None):
  """float32 [B, size, size, 3] in [0, 255] from equal-sized uint8 images [B, H, W, 3].

  The random numbers are `uniforms` (float [B, 5] in [0, 1), one row per image or clip:
  area, ratio, top, left, flip), or drawn from `seed` when it is None.

  The same augmentation as `train_view`, in a handful of ops for the whole batch instead
  of dozens per image: for small images (the synthetic set) per-op overhead, not pixels,
  is the cost. Bilinear, like `train_view`.

  Clips [B, T, H, W, 3] give [B, T, size, size, 3]: one crop and flip per clip, the same
  for all of its frames, so that motion stays what it was.
  """
  if images.shape.rank == 5:
    clip_shape = tf.shape(images)
    frames = tf.reshape(images, tf.concat([[-1], clip_shape[2:]], 0))
    u = _uniforms(seed, uniforms, clip_shape[0])
    out = _batch_view(frames, u, size=size, area_range=area_range,
                      aspect_ratio_range=aspect_ratio_range, flip=flip,
                      frames_per_clip=clip_shape[1])
    return tf.reshape(out, tf.concat([clip_shape[:2], [size, size, 3]], 0))
  return _batch_view(images, _uniforms(seed, uniforms, tf.shape(images)[0]), size=size,
                     area_range=area_range, aspect_ratio_range=aspect_ratio_range,
                     flip=flip)


def _uniforms(seed, uniforms, n):
  if uniforms is None:
    return tf.random.stateless_uniform([n, 5], seed)
  return tf.cast(uniforms, tf.float32)


def _batch_view(images, u, *, size, area_range, aspect_ratio_range, flip,
                frames_per_clip=1):
  """`batch_train_view` of [N, H, W, 3] with random numbers `u` [N / frames_per_clip, 5];
  consecutive groups of `frames_per_clip` images share one random crop and flip."""
  shape = tf.shape(images)
  aspect = tf.cast(shape[1], tf.float32) / tf.cast(shape[2], tf.float32)  # H / W
  area = area_range[0] + (area_range[1] - area_range[0]) * u[:, 0]
  lo, hi = math.log(aspect_ratio_range[0]), math.log(aspect_ratio_range[1])
  ratio = tf.exp(lo + (hi - lo) * u[:, 1])  # width / height in pixels
  width = tf.minimum(tf.sqrt(area * ratio * aspect), 1.0)  # fractions of W and H
  height = tf.minimum(tf.sqrt(area / ratio / aspect), 1.0)
  top = u[:, 2] * (1.0 - height)
  left = u[:, 3] * (1.0 - width)
  boxes = tf.stack([top, left, top + height, left + width], axis=-1)
  boxes = tf.repeat(boxes, frames_per_clip, axis=0)
  out = tf.image.crop_and_resize(images, boxes, tf.range(shape[0]), [size, size])
  if flip:
    coin = tf.repeat(u[:, 4] < 0.5, frames_per_clip, axis=0)
    out = tf.where(coin[:, None, None, None], tf.reverse(out, axis=[2]), out)
  return out


def decode_frames(frames_bytes, shape):
  """uint8 [T, H, W, 3] from T encoded frames of a clip whose stored shape is `shape`."""
  frames = tf.map_fn(lambda b: tf.io.decode_image(b, channels=3, expand_animations=False),
                     frames_bytes, fn_output_signature=tf.uint8)
  return tf.ensure_shape(frames, shape)


def eval_clip(frames_bytes, *, size):
  """float32 [T, size, size, 3] in [0, 255]: `eval_view` of every frame of a clip."""
  return tf.map_fn(lambda b: eval_view(b, size=size), frames_bytes,
                   fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))


def eval_view(image_bytes, *, size):
  """float32 [size, size, 3] in [0, 255]: shorter side resized to `size`, centre crop."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  return eval_resize_crop(image, size=size)


def eval_resize_crop(image, *, size):
  """`eval_view` of a decoded image [h, w, 3] (any numeric dtype, values in [0, 255]):
  the shorter side resized to `size` (bilinear, half-pixel centres, no antialiasing; the
  new longer side rounded half to even), then the centre `size` x `size` crop."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.cast(size, tf.float32) / tf.reduce_min(hw)
  new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), size)
  image = tf.image.resize(image, new_hw, method='bilinear')  # as in training
  top = (new_hw[0] - size) // 2
  left = (new_hw[1] - size) // 2
  image = tf.slice(image, tf.stack([top, left, 0]), [size, size, 3])
  return tf.ensure_shape(image, [size, size, 3])


def normalize(image, mean, std):
  """[0, 255] -> (x / 255 - mean) / std per channel, float32."""
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std
