"""Which record fills each row of each global batch: pure functions of (seed, step).

Pure numpy, no TensorFlow and no state: the training input asks this module, for the rows
this process holds, which record each one reads and which random numbers it uses.

* Row r of global batch k is global position g = k * B + r.
* One dataset of N records: position g is index i = g mod N of epoch e = g div N, and
  reads record `permute(i, N, key(seed, 0, e))`. `permute` is a keyed bijection of
  [0, N) (a Feistel network on the next power of 4, cycle-walked back into range), so
  every epoch visits every record exactly once, in an order no buffer limits (a true
  global shuffle), and costs O(1) memory and O(1) time per row, at any epoch.
* A weighted mixture of datasets (`Mixture`): positions come in blocks of `BLOCK`; a
  block holds exactly n_j positions of dataset j (the weights apportioned over the
  block), placed at slots that a permutation keyed on (seed, block) scatters. Position g
  is then the k-th visit of dataset j, for a k computed in O(1), and dataset j runs its
  own epochs as above, keyed on (seed, j, epoch).
* Everything random about a row (which caption, the crops) is keyed on (seed, g), never
  on the process, so any number of processes sees the same global batches.

We wrote the permutation rather than take one from a library (Grain has a C++
`index_shuffle`) because the data order of a resumed run depends on it bit for bit: it
must not change with a dependency's version, and here it is vectorised over a batch.
"""

import math

import numpy as np

# Slots per block of a mixture: realised proportions are exact per block up to rounding
# (1/BLOCK), and a weight below 1/(2 * BLOCK) of the total is an error.
BLOCK = 4096
_ROUNDS = 6
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection of uint64 that scrambles every bit."""
  with np.errstate(over='ignore'):
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash64(*parts) -> np.ndarray:
  """uint64 hash of integer arrays (broadcast together); order matters."""
  h = np.full(np.broadcast(*[np.asarray(p) for p in parts]).shape, 0x243F6A8885A308D3,
              np.uint64)
  with np.errstate(over='ignore'):
    for p in parts:
      h = _mix(h ^ (np.asarray(p).astype(np.int64).astype(np.uint64) + _GOLDEN))
  return h


def _feistel(x, keys, half_bits):
  mask = np.uint64((1 << half_bits) - 1)
  left, right = x >> np.uint64(half_bits), x & mask
  for r in range(_ROUNDS):
    left, right = right, left ^ (_mix(right ^ keys[r]) & mask)
  return (left << np.uint64(half_bits)) | right


def permute(index, n: int, key) -> np.ndarray:
  """int64: position `index` (in [0, n)) of the permutation of [0, n) keyed by `key`
  (uint64, one per index or one for all)."""
  index = np.asarray(index, np.int64)
  shape, index = index.shape, index.reshape(-1)
  if n <= 1:
    return np.zeros(shape, np.int64)
  half_bits = max(1, math.ceil(int(n - 1).bit_length() / 2))
  key = np.broadcast_to(np.asarray(key, np.uint64), shape).reshape(-1)
  keys = [hash64(key.view(np.int64), r) for r in range(_ROUNDS)]
  out = _feistel(index.astype(np.uint64), keys, half_bits)
  todo = out >= np.uint64(n)
  while todo.any():  # cycle-walking: a bijection of [0, 4^h) restricted to [0, n)
    out[todo] = _feistel(out[todo], [k[todo] for k in keys], half_bits)
    todo = out >= np.uint64(n)
  return out.astype(np.int64).reshape(shape)


def uniforms(seed: int, positions, stream: int, count: int) -> np.ndarray:
  """float64 [len(positions), count] in [0, 1), a pure function of (seed, g, stream)."""
  g = np.asarray(positions, np.int64)[:, None]
  bits = hash64(seed, g, stream, np.arange(count)[None, :]) >> np.uint64(11)
  return bits.astype(np.float64) * 2.0**-53


def tf_seeds(seed: int, positions, stream: int) -> np.ndarray:
  """int64 [len(positions), 2]: seeds for TF's stateless ops, keyed on (seed, g, stream)."""
  g = np.asarray(positions, np.int64)[:, None]
  return (hash64(seed, g, stream, np.arange(2)[None, :]) >> np.uint64(1)).astype(np.int64)


def apportion(weights, total: int) -> np.ndarray:
  """Integers summing to `total`, proportional to `weights` (largest remainder)."""
  w = np.asarray(weights, np.float64)
  exact = w / w.sum() * total
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind='stable')
  counts[order[:total - counts.sum()]] += 1
  return counts


def check_weights(weights, key: str = 'config.data.mixture') -> np.ndarray:
  """The weights as floats, or ValueError naming `key` when they cannot be used."""
  try:
    w = np.asarray([float(x) for x in weights], np.float64)
  except (TypeError, ValueError):
    raise ValueError(f'{key}: weights {list(weights)!r} are not numbers; give each entry as '
                     '(overrides, weight) with a weight > 0, e.g. ({...}, 0.5).') from None
  if not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
    raise ValueError(f'{key}: weights {w.tolist()} must be finite, >= 0 and sum to a '
                     'positive number, e.g. (0.7, 0.3).')
  small = [i for i, x in enumerate(w) if 0 < x < w.sum() / (2 * BLOCK)]
  if small:
    raise ValueError(f'{key}[{small[0]}]: weight {w[small[0]]} is below 1/{2 * BLOCK} of the '
                     f'total {w.sum()}; it would never be drawn. Raise it or drop the entry.')
  return w


class Mixture:
  """Global position g -> (dataset j, visit k of dataset j); one dataset: (0, g)."""

  def __init__(self, weights, seed: int):
    w = check_weights(weights)
    self.seed = int(seed)
    self.counts = apportion(w, BLOCK)
    self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
    self.size = len(w)

  def locate(self, positions):
    g = np.asarray(positions, np.int64)
    if self.size == 1:
      return np.zeros_like(g, np.int32), g
    block, offset = np.divmod(g, BLOCK)
    slot = permute(offset, BLOCK, hash64(self.seed, -1, block))
    j = np.searchsorted(self.starts, slot, side='right') - 1
    return j.astype(np.int32), block * self.counts[j] + (slot - self.starts[j])


def record(seed: int, dataset, visit, size: int, attempt=0, group: int = 1) -> np.ndarray:
  """The record read at visit `visit` of dataset `dataset` (of `size` records).

  `attempt` a > 0 is the a-th stand-in for a record that failed to decode: the record
  a places further on in the same epoch's permutation (so deterministic, and a fixed
  batch size).

  `group` k > 1: the permutation runs over the ceil(size / k) groups of k consecutive
  records, and visits k*q .. k*q + k-1 read the members of one group in order. An epoch
  is ceil(size / k) * k visits; when k does not divide `size`, the last, shorter group
  is read round (its records once or twice an epoch), so every record is still read
  each epoch. Group 1 is the plain per-record permutation (every group one record)."""
  groups = -(-size // group)
  epoch, index = np.divmod(np.asarray(visit, np.int64), groups * group)
  slot, member = np.divmod(index, group)
  slot = (slot + np.asarray(attempt, np.int64)) % groups
  first = permute(slot, groups, hash64(seed, dataset, epoch)) * group
  return first + member % np.minimum(group, size - first)
