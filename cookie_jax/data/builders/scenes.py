"""Procedural scenes of a few coloured shapes and their captions (pure numpy + PIL).

A scene is one of three kinds, each stressing a different part of grounding:

* `single`: one object; colour, shape, size and which of nine regions it sits in.
* `pair`: two objects in a spatial relation ("a red circle to the left of a blue square").
* `count`: two to four identical objects, sometimes with one different distractor.

Scenes come in twins: scene 2k+1 is scene 2k with one binding changed (colours or shapes
swapped between the objects, the relation reversed, a count changed). Both twins land in
the same split, so "a red circle left of a blue square" and "a blue circle left of a red
square" compete in retrieval and bag-of-words matching cannot tell them apart.

Every scene is a function of (seed, split, index) alone, so any subset of a split can be
generated in any order, in parallel, and always comes out the same.
"""

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
COLOURS = {
    'red': (220, 40, 40), 'green': (40, 175, 60), 'blue': (50, 90, 235),
    'yellow': (235, 215, 40), 'purple': (150, 60, 205), 'orange': (245, 140, 30),
}
RADIUS = {'small': 0.10, 'large': 0.16}  # fraction of the image side
SIZE_WORDS = {'small': ('small', 'little', 'small'), 'large': ('large', 'big', 'large')}
NUMBERS = {1: 'one', 2: 'two', 3: 'three', 4: 'four'}
# Nine named regions on a 3x3 grid: (row, col) -> phrase.
REGIONS = {
    (0, 0): 'in the top left', (0, 1): 'at the top', (0, 2): 'in the top right',
    (1, 0): 'on the left', (1, 1): 'in the middle', (1, 2): 'on the right',
    (2, 0): 'in the bottom left', (2, 1): 'at the bottom', (2, 2): 'in the bottom right',
}
REGION_CENTRES = (0.2, 0.5, 0.8)
RELATIONS = {
    'left': ('to the left of', 'left of', 'on the left of'),
    'right': ('to the right of', 'right of', 'on the right of'),
    'above': ('above', 'over', 'higher than'),
    'below': ('below', 'under', 'beneath'),
}
CONVERSE = {'left': 'right', 'right': 'left', 'above': 'below', 'below': 'above'}
SPLIT_CODES = {'train': 0, 'val': 1, 'test': 2}
_SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges without a blur pass


@dataclasses.dataclass
class Obj:
  shape: str
  colour: str
  size: str
  x: float = 0.5  # centre, fraction of the width
  y: float = 0.5


@dataclasses.dataclass
class Scene:
  kind: str  # 'single' | 'pair' | 'count'
  objects: list  # pair: [A, B] with A <relation> B; count: group..., then distractor
  relation: str = ''  # pair only
  region: tuple = (1, 1)  # single only
  count: int = 1  # count only: size of the group of identical objects
  background: int = 40


def _plural(shape):
  return shape + ('es' if shape.endswith(('s', 'x')) else 's')


def _article(word):
  return 'an' if word[0] in 'aeiou' else 'a'


def _random_obj(rng, exclude_colour=None, exclude_shape=None):
  colours = [c for c in COLOURS if c != exclude_colour]
  shapes = [s for s in SHAPES if s != exclude_shape]
  return Obj(shape=str(rng.choice(shapes)), colour=str(rng.choice(colours)),
             size=str(rng.choice(list(RADIUS))))


def _sample_base(rng) -> Scene:
  kind = str(rng.choice(['single', 'pair', 'count'], p=[0.25, 0.45, 0.30]))
  bg = int(rng.integers(0, 100))
  if kind == 'single':
    region = (int(rng.integers(3)), int(rng.integers(3)))
    return Scene('single', [_random_obj(rng)], region=region, background=bg)
  if kind == 'pair':
    a = _random_obj(rng)
    # Different colour *and* shape, so that every swap makes a distinct, valid scene.
    b = _random_obj(rng, exclude_colour=a.colour, exclude_shape=a.shape)
    return Scene('pair', [a, b], relation=str(rng.choice(list(RELATIONS))), background=bg)
  group = _random_obj(rng)
  n = int(rng.integers(2, 5))
  objs = [dataclasses.replace(group) for _ in range(n)]
  if rng.random() < 0.5:
    objs.append(_random_obj(rng, exclude_colour=group.colour, exclude_shape=group.shape))
  return Scene('count', objs, count=n, background=bg)


def _twin(scene: Scene, rng) -> Scene:
  """The scene with one binding changed; it keeps all words but means something else."""
  objs = [dataclasses.replace(o) for o in scene.objects]
  s = dataclasses.replace(scene, objects=objs)
  if scene.kind == 'single':
    o = objs[0]
    edit = rng.integers(3)
    if edit == 0:
      s.region = (2 - s.region[0], 2 - s.region[1]) if s.region != (1, 1) else (0, 0)
    elif edit == 1:
      o.colour = str(rng.choice([c for c in COLOURS if c != o.colour]))
    else:
      o.shape = str(rng.choice([x for x in SHAPES if x != o.shape]))
  elif scene.kind == 'pair':
    a, b = objs
    edit = rng.integers(3)
    if edit == 0:
      a.colour, b.colour = b.colour, a.colour
    elif edit == 1:
      a.shape, b.shape = b.shape, a.shape
    else:
      s.relation = CONVERSE[s.relation]
  else:
    has_distractor = len(objs) > scene.count
    if has_distractor and rng.random() < 0.5:
      d = objs[-1]
      gc, dc = objs[0].colour, d.colour
      for o in objs[:-1]:
        o.colour = dc
      d.colour = gc
    else:
      n = scene.count + (1 if scene.count < 4 and (scene.count == 2 or rng.random() < 0.5)
                         else -1)
      group = objs[:scene.count]
      s.objects = [dataclasses.replace(group[0]) for _ in range(n)] + objs[scene.count:]
      s.count = n
  return s


def place(scene: Scene, rng):
  """Object centres that make the caption true with a margin, without overlaps."""
  objs = scene.objects
  if scene.kind == 'single':
    r, c = scene.region
    objs[0].x = REGION_CENTRES[c] + rng.uniform(-0.04, 0.04)
    objs[0].y = REGION_CENTRES[r] + rng.uniform(-0.04, 0.04)
    return
  if scene.kind == 'pair':
    # The relation axis separates the centres by >= 0.4; the other axis differs by < 0.12,
    # so the perpendicular relation is never also (arguably) true.
    lo, hi = rng.uniform(0.18, 0.3), rng.uniform(0.7, 0.82)
    across = rng.uniform(0.3, 0.7)
    off = rng.uniform(-0.06, 0.06)
    first, second = (lo, hi) if scene.relation in ('left', 'above') else (hi, lo)
    a, b = objs
    if scene.relation in ('left', 'right'):
      a.x, b.x, a.y, b.y = first, second, across + off, across - off
    else:
      a.y, b.y, a.x, b.x = first, second, across + off, across - off
    return
  placed = []
  for o in objs:
    rad = RADIUS[o.size]
    for _ in range(200):
      x, y = rng.uniform(rad + 0.02, 1 - rad - 0.02, size=2)
      if all((x - p.x) ** 2 + (y - p.y) ** 2 > (rad + RADIUS[p.size] + 0.03) ** 2
             for p in placed):
        break
    o.x, o.y = float(x), float(y)
    placed.append(o)


def sample_scene(seed: int, split: str, index: int) -> Scene:
  base_rng = np.random.default_rng([seed, SPLIT_CODES[split], index // 2, 0])
  scene = _sample_base(base_rng)
  if index % 2:
    scene = _twin(scene, np.random.default_rng([seed, SPLIT_CODES[split], index, 1]))
  place(scene, np.random.default_rng([seed, SPLIT_CODES[split], index, 2]))
  return scene


def render(scene: Scene, size: int, rng) -> np.ndarray:
  """uint8 [size, size, 3]; colours jitter a little so colour names cover a range."""
  big = size * _SUPERSAMPLE
  img = Image.new('RGB', (big, big), (scene.background,) * 3)
  draw = ImageDraw.Draw(img)
  for o in scene.objects:
    rgb = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[o.colour])
    cx, cy, r = o.x * big, o.y * big, RADIUS[o.size] * big
    if o.shape == 'circle':
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif o.shape == 'square':
      h = r * 0.88  # about the circle's area
      draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    elif o.shape == 'triangle':
      draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75),
                    (cx - r * 0.95, cy + r * 0.75)], fill=rgb)
    elif o.shape == 'diamond':
      draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    else:  # cross
      w = r * 0.36
      draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
      draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
  return np.asarray(img.resize((size, size), Image.Resampling.BOX))


def _noun(o: Obj, rng, size_p=0.4) -> str:
  words = [o.colour, o.shape]
  if rng.random() < size_p:
    words.insert(0, str(rng.choice(SIZE_WORDS[o.size])))
  return ' '.join(words)


def _a(phrase):
  return f'{_article(phrase)} {phrase}'


def _single_captions(s: Scene, rng):
  o = s.objects[0]
  where = REGIONS[s.region]
  size = str(rng.choice(SIZE_WORDS[o.size]))
  return [
      f'{_a(f"{size} {o.colour} {o.shape}")} {where}',
      f'{_a(f"{o.colour} {o.shape}")} {where}',
      f'{where} there is {_a(_noun(o, rng))}',
      f'{_a(o.shape)} that is {o.colour}, {where}',
      f'a single {size} {o.colour} {o.shape} placed {where}',
      f'the picture shows {_a(_noun(o, rng))} {where}',
      f'one {o.colour} {o.shape} {where} of the image',
  ]


def _pair_captions(s: Scene, rng):
  a, b = s.objects
  rel, conv = s.relation, CONVERSE[s.relation]
  na, nb = _noun(a, rng), _noun(b, rng)
  side = {'left': ('left', 'right'), 'right': ('right', 'left'),
          'above': ('top', 'bottom'), 'below': ('bottom', 'top')}[rel]
  its = {'left': 'on its left', 'right': 'on its right', 'above': 'above it',
         'below': 'below it'}[rel]
  return [
      f'{_a(na)} {rng.choice(RELATIONS[rel])} {_a(nb)}',
      f'{_a(nb)} {rng.choice(RELATIONS[conv])} {_a(na)}',
      f'there is {_a(_noun(a, rng))} {rng.choice(RELATIONS[rel])} {_a(_noun(b, rng))}',
      f'{_a(nb)} with {_a(na)} {its}',
      f'two shapes: {_a(na)} on the {side[0]} and {_a(nb)} on the {side[1]}',
      f'{_a(a.colour + " " + a.shape)} and {_a(b.colour + " " + b.shape)}, '
      f'the {a.shape} is {RELATIONS[rel][1]} the {b.shape}',
      f'the {b.colour} {b.shape} is {RELATIONS[conv][0]} the {a.colour} {a.shape}',
  ]


def _count_captions(s: Scene, rng):
  g = s.objects[0]
  n = NUMBERS[s.count]
  many = _plural(g.shape)
  d = s.objects[-1] if len(s.objects) > s.count else None
  extra = f' and {_a(_noun(d, rng, 0.0))}' if d else ''
  caps = [
      f'{n} {g.colour} {many}{extra}',
      f'there are {n} {g.colour} {many}{extra}',
      f'{n} {many}, all of them {g.colour}{extra}',
      f'a group of {n} {str(rng.choice(SIZE_WORDS[g.size]))} {g.colour} {many}{extra}',
      f'{s.count} {g.colour} {many}{extra}',
  ]
  if d:
    caps += [f'{_a(_noun(d, rng))} and {n} {g.colour} {many}',
             f'{_a(d.colour + " " + d.shape)} next to {n} {many} that are {g.colour}']
  else:
    caps += [f'exactly {n} {g.colour} {many} and nothing else',
             f'the image shows {n} {g.colour} {many}']
  return caps


def captions(scene: Scene, k: int, rng) -> list[str]:
  """`k` distinct captions, each a full, true description in a different phrasing."""
  make = {'single': _single_captions, 'pair': _pair_captions, 'count': _count_captions}
  pool = list(dict.fromkeys(make[scene.kind](scene, rng)))
  if len(pool) < k:
    raise ValueError(f'Only {len(pool)} caption phrasings for a {scene.kind} scene; '
                     f'asked for {k}. Use at most 7 captions per image.')
  order = rng.permutation(len(pool))[:k]
  return [pool[i] for i in order]


def example(seed: int, split: str, index: int, image_size: int, num_captions: int):
  """(png bytes, captions, scene) of one image; a pure function of its arguments."""
  scene = sample_scene(seed, split, index)
  rng = np.random.default_rng([seed, SPLIT_CODES[split], index, 3])
  buf = io.BytesIO()
  Image.fromarray(render(scene, image_size, rng)).save(buf, format='PNG')
  return buf.getvalue(), captions(scene, num_captions, rng), scene


def examples(seed: int, split: str, image_size: int, num_captions: int, start: int,
             stop: int) -> list:
  """[(index, png, captions, kind, num_objects)] for indices start..stop-1."""
  out = []
  for i in range(start, stop):
    png, caps, scene = example(seed, split, i, image_size, num_captions)
    out.append((i, png, caps, scene.kind, len(scene.objects)))
  return out
