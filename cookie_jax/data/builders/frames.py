"""Uniform frame sampling from video files with PyAV (FFmpeg's decoders, from PyPI wheels).

`sample_frames(path, n, size)` returns n JPEG-encoded square frames: the frame at the
centre of each of n equal segments of the video (TSN's and CLIP4Clip's uniform sampling),
shorter side resized to `size`, centre-cropped. Only the chosen frames are converted to
RGB; the others are decoded and dropped, and decoding stops after the last one chosen.
"""

import io

import numpy as np
from PIL import Image


class UnreadableVideo(ValueError):
  """A file that is not a decodable video, or one with no frames."""


def segment_centres(total: int, n: int) -> list[int]:
  """Indices of the centre frames of n equal segments of `total` frames (repeats when
  total < n)."""
  return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def _open(path: str):
  import av  # pylint: disable=g-import-not-at-top  # only the video builders need it
  try:
    container = av.open(path)
  except Exception as e:  # pylint: disable=broad-except  # FFmpeg's many error types
    raise UnreadableVideo(f'{path}: {type(e).__name__}: {e}') from None
  if not container.streams.video:
    container.close()
    raise UnreadableVideo(f'{path}: no video stream')
  stream = container.streams.video[0]
  stream.thread_type = 'AUTO'  # FFmpeg's own frame threads
  return container, stream


def declared_frames(path: str) -> int:
  """The frame count the container declares (0 when it does not say)."""
  container, stream = _open(path)
  try:
    return int(stream.frames or 0)
  finally:
    container.close()


def _decoded(path: str):
  """The decoded frames of the first video stream; the file closes when they end."""
  container, stream = _open(path)
  try:
    yield from container.decode(stream)
  except Exception as e:  # pylint: disable=broad-except
    raise UnreadableVideo(f'{path}: {type(e).__name__}: {e}') from None
  finally:
    container.close()


def count_frames(path: str) -> int:
  """The number of frames that actually decode."""
  return sum(1 for _ in _decoded(path))


def _pick(path: str, wanted: list[int]) -> dict[int, np.ndarray]:
  want, last, out = set(wanted), max(wanted), {}
  frames = _decoded(path)
  for i, frame in enumerate(frames):
    if i in want:
      out[i] = frame.to_ndarray(format='rgb24')
    if i >= last:
      frames.close()
      break
  return out


def square_jpeg(frame: np.ndarray, size: int, quality: int = 90) -> bytes:
  """Shorter side resized to `size` (antialiased), centre crop, JPEG."""
  img = Image.fromarray(frame)
  w, h = img.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  img = img.resize((nw, nh), Image.Resampling.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  buf = io.BytesIO()
  img.crop((left, top, left + size, top + size)).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def sample_frames(path: str, num_frames: int, size: int) -> list[bytes]:
  """`num_frames` JPEG frames spread uniformly over the video; UnreadableVideo if none."""
  declared = declared_frames(path)
  total = declared if declared > 0 else count_frames(path)
  picked = _pick(path, segment_centres(total, num_frames)) if total else {}
  if total and len(picked) < len(set(segment_centres(total, num_frames))):
    # The container declared more frames than decode (a truncated file): count them.
    total = count_frames(path)
    picked = _pick(path, segment_centres(total, num_frames)) if total else {}
  if not total:
    raise UnreadableVideo(f'{path}: no frames decode')
  return [square_jpeg(picked[i], size) for i in segment_centres(total, num_frames)]


def clip_features(frames: int, image_size: int, encoding_format: str, **extra):
  """The tfds features of a video-text example: `frames` square frames of `image_size`,
  the captions and the clip's integer id, then the builder's own `extra` features."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # builders only
  return tfds.features.FeaturesDict({
      'frames': tfds.features.Video(shape=(frames, image_size, image_size, 3),
                                    encoding_format=encoding_format),
      'captions': tfds.features.Sequence(tfds.features.Text()),
      'image_id': tfds.features.Scalar(dtype=np.int64),
      **extra})
