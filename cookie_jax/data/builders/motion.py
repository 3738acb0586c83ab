"""Procedural video clips of coloured shapes that move, appear or change, with captions
that say so (pure numpy + PIL; the shapes and colours of `scenes.py`).

A clip has T frames and one of three events, each needing time to be told apart:

* `move`: an object crosses the frame left to right, right to left, up or down.
* `appear` / `disappear`: an object is absent in the first half and present in the
  second, or the other way round, in one of nine regions.
* `change`: an object changes colour from X to Y halfway through.

Half of the clips also hold a second, still object that some captions mention.

Clips come in twins: clip 2k+1 is clip 2k played backwards (the same frames in reverse
order), so its event is the opposite one: right to left instead of left to right,
disappear instead of appear, Y to X instead of X to Y. Both twins land in the same split.
A bag of frames (mean pooling, any order-blind model) sees the two twins as one clip and
can get at most one of each pair right, so retrieval needs the order of frames.

Every clip is a function of (seed, split, index) alone, as in `scenes.py`.
"""

import dataclasses
import io

import numpy as np
from PIL import Image

from cookie_jax.data.builders import scenes

KINDS = ('move', 'appear', 'disappear', 'change')
DIRECTIONS = {  # direction: (from, to, towards)
    'right': ('left', 'right', 'to the right'),
    'left': ('right', 'left', 'to the left'),
    'up': ('bottom', 'top', 'up'),
    'down': ('top', 'bottom', 'down'),
}
OPPOSITE = {'right': 'left', 'left': 'right', 'up': 'down', 'down': 'up',
            'appear': 'disappear', 'disappear': 'appear'}
NUM_PHRASINGS = 6


@dataclasses.dataclass
class Clip:
  kind: str  # one of KINDS
  obj: scenes.Obj  # the object the event happens to (its colour is the first colour)
  companion: scenes.Obj | None = None  # a still second object, or None
  direction: str = ''  # move: a key of DIRECTIONS
  region: tuple = (1, 1)  # appear / disappear / change: (row, col) of scenes.REGIONS
  colours: tuple = ('', '')  # change: (from, to)
  background: int = 40


def _sample_base(rng) -> Clip:
  kind = str(rng.choice(['move', 'appear', 'change'], p=[0.45, 0.25, 0.30]))
  obj = scenes._random_obj(rng)  # pylint: disable=protected-access
  clip = Clip(kind, obj, background=int(rng.integers(0, 100)))
  if kind == 'move':
    clip.direction = str(rng.choice(list(DIRECTIONS)))
  else:
    clip.region = (int(rng.integers(3)), int(rng.integers(3)))
  if kind == 'change':
    to = str(rng.choice([c for c in scenes.COLOURS if c != obj.colour]))
    clip.colours = (obj.colour, to)
  if rng.random() < 0.5:
    clip.companion = scenes._random_obj(  # pylint: disable=protected-access
        rng, exclude_colour=obj.colour, exclude_shape=obj.shape)
  return clip


def _place_companion(clip: Clip, rng) -> None:
  """The still object away from where the event happens (no overlap)."""
  c = clip.companion
  if clip.kind == 'move':
    horizontal = clip.direction in ('left', 'right')
    lane = clip.obj.y if horizontal else clip.obj.x
    other = 0.8 if lane < 0.5 else 0.2
    along = float(rng.uniform(0.25, 0.75))
    c.x, c.y = (along, other) if horizontal else (other, along)
    return
  r, col = clip.region
  # The region diagonally opposite, or a corner when the event is in the middle.
  r2, c2 = (2 - r, 2 - col) if (r, col) != (1, 1) else (0, 0)
  c.x = scenes.REGION_CENTRES[c2] + float(rng.uniform(-0.03, 0.03))
  c.y = scenes.REGION_CENTRES[r2] + float(rng.uniform(-0.03, 0.03))


def _place(clip: Clip, rng) -> None:
  o = clip.obj
  if clip.kind == 'move':
    lane = float(rng.uniform(0.25, 0.4) if rng.random() < 0.5 else rng.uniform(0.6, 0.75))
    if clip.direction in ('left', 'right'):
      o.y = lane
    else:
      o.x = lane
  else:
    r, col = clip.region
    o.x = scenes.REGION_CENTRES[col] + float(rng.uniform(-0.03, 0.03))
    o.y = scenes.REGION_CENTRES[r] + float(rng.uniform(-0.03, 0.03))
  if clip.companion is not None:
    _place_companion(clip, rng)


def frame_objects(clip: Clip, num_frames: int) -> list[list[scenes.Obj]]:
  """The objects visible in each frame, in drawing order (the still one first)."""
  frames = []
  for t in range(num_frames):
    o = dataclasses.replace(clip.obj)
    late = t >= num_frames // 2
    if clip.kind == 'move':
      frm, to = (0.18, 0.82) if clip.direction in ('right', 'down') else (0.82, 0.18)
      pos = frm + (to - frm) * t / (num_frames - 1)
      if clip.direction in ('left', 'right'):
        o.x = pos
      else:
        o.y = pos
    if clip.kind == 'change':
      o.colour = clip.colours[1] if late else clip.colours[0]
    visible = {'appear': late, 'disappear': not late}.get(clip.kind, True)
    objs = [] if clip.companion is None else [clip.companion]
    frames.append(objs + ([o] if visible else []))
  return frames


def render(clip: Clip, num_frames: int, size: int, seed_words) -> list[np.ndarray]:
  """uint8 [size, size, 3] frames. The colour jitter is drawn afresh but identically for
  every frame, so an object keeps its exact colour through the clip."""
  out = []
  for objs in frame_objects(clip, num_frames):
    jitter = np.random.default_rng(seed_words)
    # The still object is drawn first, so it takes the same jitter in every frame; the
    # event's object the second draw (present or not, the first draw is the same).
    scene = scenes.Scene('single', objs, background=clip.background)
    out.append(scenes.render(scene, size, jitter))
  return out


def reverse(clip: Clip) -> Clip:
  """The description of the clip played backwards."""
  r = dataclasses.replace(clip, obj=dataclasses.replace(clip.obj))
  if clip.kind == 'move':
    r.direction = OPPOSITE[clip.direction]
  elif clip.kind in ('appear', 'disappear'):
    r.kind = OPPOSITE[clip.kind]
  else:
    r.colours = (clip.colours[1], clip.colours[0])
    r.obj.colour = r.colours[0]
  return r


def _a(phrase: str) -> str:
  return f'{scenes._article(phrase)} {phrase}'  # pylint: disable=protected-access


def _noun(o: scenes.Obj, colour: str, rng) -> str:
  words = [colour, o.shape]
  if rng.random() < 0.4:
    words.insert(0, str(rng.choice(scenes.SIZE_WORDS[o.size])))
  return ' '.join(words)


def _phrasings(clip: Clip, rng) -> list[str]:
  o = clip.obj
  n = lambda: _a(_noun(o, o.colour, rng))
  where = scenes.REGIONS[clip.region]
  if clip.kind == 'move':
    frm, to, towards = DIRECTIONS[clip.direction]
    return [f'{n()} moves from the {frm} to the {to}',
            f'{n()} moving {towards}',
            f'{n()} starts at the {frm} and ends at the {to}',
            f'the {o.colour} {o.shape} slides {towards}',
            f'{n()} travels from {frm} to {to}',
            f'a {o.shape} that is {o.colour} goes {towards}']
  if clip.kind == 'appear':
    return [f'{n()} appears {where}',
            f'{n()} shows up {where}',
            f'at first nothing, then {n()} appears {where}',
            f'{where} {n()} comes into view',
            f'the {o.colour} {o.shape} pops up {where}',
            f'{n()} is not there at first and then appears {where}']
  if clip.kind == 'disappear':
    return [f'{n()} disappears {where}',
            f'{n()} vanishes {where}',
            f'at first there is {n()} {where}, then it is gone',
            f'{where} {n()} goes out of view',
            f'the {o.colour} {o.shape} {where} vanishes',
            f'{n()} is there at first and then disappears {where}']
  c1, c2 = clip.colours
  return [f'a {o.shape} turns from {c1} to {c2}',
          f'{_a(_noun(o, c1, rng))} changes colour to {c2}',
          f'the {o.shape} is {c1} at first and {c2} at the end',
          f'{_a(_noun(o, c1, rng))} becomes {c2}',
          f'a {o.shape} changes from {c1} to {c2} {where}',
          f'{_a(f"{c1} {o.shape}")} that turns {c2}']


def captions(clip: Clip, k: int, rng) -> list[str]:
  """`k` distinct true captions; some mention the still object, if there is one."""
  if not 1 <= k <= NUM_PHRASINGS:
    raise ValueError(f'{k} captions per clip asked for; there are {NUM_PHRASINGS} '
                     'phrasings, so use 1 to 6.')
  pool = _phrasings(clip, rng)
  c = clip.companion
  out = []
  for i in rng.permutation(len(pool))[:k]:
    cap = pool[i]
    if c is not None and rng.random() < 0.4:
      other = _a(f'{c.colour} {c.shape}')
      cap += str(rng.choice([f', next to {other}', f' while {other} stays still']))
    out.append(cap)
  return out


def sample_clip(seed: int, split: str, index: int) -> Clip:
  """The clip's description (index 2k+1 is the reverse of 2k; see the module doc)."""
  code = scenes.SPLIT_CODES[split]
  clip = _sample_base(np.random.default_rng([seed, code, index // 2, 0]))
  _place(clip, np.random.default_rng([seed, code, index // 2, 2]))
  return reverse(clip) if index % 2 else clip


def example(seed: int, split: str, index: int, num_frames: int, size: int,
            num_captions: int):
  """([png bytes per frame], captions, clip); a pure function of its arguments."""
  code = scenes.SPLIT_CODES[split]
  base = index - index % 2
  frames = render(sample_clip(seed, split, base), num_frames, size, [seed, code, base, 4])
  if index % 2:
    frames = frames[::-1]  # exactly the twin's frames backwards
  clip = sample_clip(seed, split, index)
  caps = captions(clip, num_captions, np.random.default_rng([seed, code, index, 3]))
  pngs = []
  for frame in frames:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format='PNG')
    pngs.append(buf.getvalue())
  return pngs, caps, clip


def examples(seed: int, split: str, num_frames: int, size: int, num_captions: int,
             start: int, stop: int) -> list:
  """[(index, [png per frame], captions, kind)] for indices start..stop-1."""
  out = []
  for i in range(start, stop):
    pngs, caps, clip = example(seed, split, i, num_frames, size, num_captions)
    out.append((i, pngs, caps, clip.kind))
  return out
