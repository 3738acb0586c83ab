"""Nearest-neighbour search and exact ground-truth ranks over a gallery sharded across
every device of a mesh, computed block by block.

Why blocks: 25k COCO captions against a 1M-image gallery is a 100 GB score matrix. Here
each device holds 1/D of the gallery (rows split over *all* mesh axes, zero-padded to equal
shards) and walks through it `block_size` rows at a time, so a device never holds more
than `query_block_size x block_size` scores. It keeps a running top-k (search) or a
running max and count (ranks); devices meet once at the end, in one all-gather (top-k)
or one pmax / psum (ranks). The exact top-k selects once per superblock of many blocks
(`superblock_topk`: group maxima fused with the dot products, then the best groups
rescored), not once per block. Queries are replicated and sent in chunks of
`query_block_size`, the last chunk padded so that one compiled program serves them all.

Ties, which do happen (duplicate captions, a collapsed model):

* `sharded_topk` orders equal scores by ascending gallery index, like a stable sort.
* `positive_ranks` is pessimistic: a negative that scores exactly as high as the best
  positive is ranked before it. A model that maps everything to one point therefore gets
  the worst rank, not R@1 = 100. Positives tied with each other do not matter, since
  only the best positive counts.

Scores are fp32 dot products at `Precision.HIGHEST` (TPUs would otherwise use bf16
passes), so ranks are exact up to fp32 rounding of the dot products.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
import numpy as np

from cookie_jax import sharding

DEFAULT_BLOCK_SIZE = 4096
DEFAULT_QUERY_BLOCK_SIZE = 1024
_NO_LABEL = -1  # the label of padding rows; real labels are >= 0


def single_device_mesh() -> Mesh:
  """The mesh used when none is given: the first device alone."""
  return jax.make_mesh((1,), ('gallery',), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))


def _global(mesh: Mesh, spec, host: np.ndarray) -> jax.Array:
  # make_array_from_callback works in multi-process runs, where every process holds the
  # same host copy and each device takes its own slice.
  return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec),
                                      lambda index: host[index])


def to_numpy(x: jax.Array) -> np.ndarray:
  """A replicated result to numpy (the local copy; works when not fully addressable)."""
  return np.asarray(x.addressable_data(0))


def as_embeddings(x, name: str) -> np.ndarray:
  """Checks an [N, D] embedding matrix and returns it as fp32 numpy."""
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f'{name} must be a matrix [N, D]; got shape {x.shape}.')
  if not np.isfinite(x).all():
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    raise ValueError(f'{name} has non-finite values in rows {bad[:10].tolist()} '
                     f'({len(bad)} rows); check the model outputs (NaN weights or inputs).')
  return x


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a gallery's rows live; hashable, so compiled programs are cached by it (and
  not by the arrays, which the cache would otherwise keep alive)."""
  mesh: Mesh
  size: int  # number of real rows
  rows_per_device: int  # a multiple of block_size
  block_size: int

  @property
  def padded_size(self) -> int:
    return self.rows_per_device * self.mesh.devices.size


@dataclasses.dataclass(frozen=True)
class Gallery:
  """A gallery placed on a mesh: rows split over all mesh axes, padded to equal shards."""
  embeddings: jax.Array  # [padded_size, dim], zero rows as padding
  labels: jax.Array  # [padded_size] int32, _NO_LABEL on padding
  layout: Layout

  @property
  def size(self) -> int:
    return self.layout.size

  @property
  def mesh(self) -> Mesh:
    return self.layout.mesh

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]


def prepare_gallery(embeddings, mesh: Mesh | None = None, *, labels=None,
                    block_size: int = DEFAULT_BLOCK_SIZE) -> Gallery:
  """Pads and shards `embeddings` [M, D] (numpy, identical in every process) over `mesh`.

  Do this once and pass the `Gallery` to many searches: it is the only host->device copy.
  """
  mesh = single_device_mesh() if mesh is None else mesh
  emb = as_embeddings(embeddings, 'gallery embeddings')
  size = emb.shape[0]
  if size == 0:
    raise ValueError('The gallery is empty (0 rows); there is nothing to search.')
  if block_size < 1:
    raise ValueError(f'block_size={block_size} must be >= 1.')
  lab = np.zeros(size, np.int32) if labels is None else np.asarray(labels, np.int32)
  if lab.shape != (size,):
    raise ValueError(f'Gallery labels have shape {lab.shape}; expected ({size},).')
  devices = mesh.devices.size
  per_device = math.ceil(size / devices)
  block = min(block_size, per_device)
  rows = math.ceil(per_device / block) * block
  total = rows * devices
  if total != size:
    emb = np.concatenate([emb, np.zeros((total - size, emb.shape[1]), np.float32)])
    lab = np.concatenate([lab, np.full(total - size, _NO_LABEL, np.int32)])
  spec = sharding.gallery_spec(mesh)
  return Gallery(embeddings=_global(mesh, spec, emb), labels=_global(mesh, spec, lab),
                 layout=Layout(mesh, size, rows, block))


def _block_scores(q, blk):
  return jnp.dot(q, blk.T, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)


def _varying(tree, axes):
  # A scan carry that starts as a constant but picks up this device's rows must be typed
  # as varying over the mesh axes from the start (shard_map's VMA check).
  return jax.tree.map(lambda x: jax.lax.pcast(x, axes, to='varying'), tree)


def _local_blocks(layout: Layout, g, g_lab):
  """This device's rows as [num_blocks, block, ...] plus their global indices."""
  nb, block = layout.rows_per_device // layout.block_size, layout.block_size
  base = jax.lax.axis_index(layout.mesh.axis_names) * layout.rows_per_device
  index = base + jnp.arange(layout.rows_per_device, dtype=jnp.int32)
  return (g.reshape(nb, block, g.shape[-1]), g_lab.reshape(nb, block),
          index.reshape(nb, block))


def group_size(block: int, k: int) -> int:
  """Rows per group of the two-stage block top-k: a divisor of `block` near
  sqrt(block / k), which balances its two selections (block / g group maxima, then
  k * g candidates)."""
  target = max(1, int(math.sqrt(block / k)))
  return next(g for g in range(min(target, block), 0, -1) if block % g == 0)


def block_topk(s, idx, k: int, group: int):
  """The k best of each row of scores `s` [N, B] with their `idx` [B], exactly, ties by
  ascending index; for `idx` ascending along the block.

  Two stages instead of a top-k over all B columns: the maximum of each group of `group`
  consecutive columns, then the k best groups by maximum, then the k best of those
  groups' k * group scores. Exact: a group whose maximum is below the k-th best group
  maximum holds nothing above that value, and each of the k best groups holds at least
  one element at or above it. Ties stay exact because groups are contiguous ranges of
  ascending index and equal maxima are taken lower group first, and the chosen groups
  are put back in index order before the last selection.
  """
  n, b = s.shape
  if group == 1 or b // group < k:
    top_s, pos = jax.lax.top_k(s, min(k, b))
    return top_s, jnp.take_along_axis(jnp.broadcast_to(idx[None], s.shape), pos, axis=1)
  grouped = s.reshape(n, b // group, group)
  _, best = jax.lax.top_k(jnp.max(grouped, axis=2), k)
  best = jnp.sort(best, axis=1)  # index order, for the tie rule
  cand_s = jnp.take_along_axis(grouped, best[:, :, None], axis=1).reshape(n, k * group)
  cand_i = (idx.reshape(b // group, group)[best]).reshape(n, k * group)
  top_s, pos = jax.lax.top_k(cand_s, k)
  return top_s, jnp.take_along_axis(cand_i, pos, axis=1)


# Exact top-k keeps group maxima of up to this many bytes (queries x groups, fp32) per
# superblock, and gathers up to this many bytes of candidate rows (queries x k * group x
# dim, fp32; `_row_scores` may hold as many again of queries broadcast beside them) per
# superblock; beyond either, or with fewer than MIN_SUPERBLOCK blocks per
# superblock, it selects block by block (`block_topk`). Gathering and rescoring the
# candidates is a fixed cost that a few dozen blocks' selections must outweigh: with 1,000
# queries, D = 256 and k = 10 on a 2-core CPU, 100k rows (25 blocks) took 0.65 s in one
# superblock against 0.51 s block by block, 1M rows (245 blocks) 3.8 against 5.0 s
# (docs/BENCHMARKS.md, "Retrieval search").
MAXIMA_BYTES = 256 * 2**20
CANDIDATE_BYTES = 512 * 2**20
MIN_SUPERBLOCK = 64


def superblock_size(layout: Layout, k: int, group: int, queries: int, dim: int) -> int:
  """Blocks per superblock of the exact search, or 0 to select block by block: the
  device's blocks in as few superblocks as `MAXIMA_BYTES` of group maxima allow, all of
  this size but the last, which takes the remaining blocks too (fewer than the count)."""
  groups = layout.block_size // group
  blocks = layout.rows_per_device // layout.block_size
  cap = min(blocks, MAXIMA_BYTES // max(1, queries * groups * 4))
  size = blocks // math.ceil(blocks / cap) if cap else 0
  if (size < MIN_SUPERBLOCK or size * groups < k
      or queries * k * group * dim * 4 > CANDIDATE_BYTES):
    return 0
  return size


def superblock_topk(q, blocks, index, start, num: int, k: int, group: int, size: int,
                    padded, axes=()):
  """The k best rows of blocks[start : start + num] (of `blocks` [B, block, D] with
  global `index` [B, block] ascending) for each query, exactly, ties by ascending index;
  rows at index >= `size` are padding and never win. `padded(index)` says whether a block
  holds padding; `axes` are the mesh axes the blocks vary over, inside shard_map.

  One pass of fused dot products and group maxima over the blocks (the scores are never
  stored), one top-k of the k best groups over the whole superblock, then the k * group
  rows of those groups scored again and the k best taken. Exact by the argument of
  `block_topk`. The second scoring takes each candidate row's product with its query on
  its own (`_row_scores`), so equal rows score equal wherever they sit and equal scores come in
  index order; it may differ in the last bits (fp32 rounding) from the dot product that
  chose the group. Compared with a top-k per block this removes all per-block selection
  (on CPU, a single-threaded top-k between two multi-threaded GEMMs; on TPU, a sort)."""
  n, (_, block, dim) = q.shape[0], blocks.shape
  groups = block // group

  def maxima(scores):
    return jnp.max(scores.reshape(n, groups, group), axis=2)

  def one_block(buf, j):
    # One block at a time out of the whole gallery: no copy of the superblock.
    blk, idx = blocks[start + j], index[start + j]
    # Only blocks with padding mask their scores; the rest fuse dot and max.
    m = jax.lax.cond(padded(idx),
                     lambda b, i: maxima(jnp.where(i[None] < size, _block_scores(q, b),
                                                   -jnp.inf)),
                     lambda b, i: maxima(_block_scores(q, b)), blk, idx)
    return jax.lax.dynamic_update_slice(buf, m, (0, j * groups)), None

  buf = jnp.full((n, num * groups), -jnp.inf, jnp.float32)
  buf = _varying(buf, axes) if axes else buf
  buf, _ = jax.lax.scan(one_block, buf, jnp.arange(num, dtype=jnp.int32))
  _, best = jax.lax.top_k(buf, k)
  best = jnp.sort(best, axis=1)  # index order, for the tie rule
  rows = start * block + (best[:, :, None] * group
                          + jnp.arange(group, dtype=jnp.int32)).reshape(n, -1)
  cand_i = index.reshape(-1)[rows]
  cand_s = _row_scores(q, blocks.reshape(-1, dim)[rows])
  cand_s = jnp.where(cand_i < size, cand_s, -jnp.inf)
  top_s, pos = jax.lax.top_k(cand_s, k)
  return top_s, jnp.take_along_axis(cand_i, pos, axis=1)


def _row_scores(q, rows):
  """q [N, D] against rows [N, C, D], fp32: N * C separate [1, D] x [D, 1] products, so
  that equal rows score equal wherever they sit. A batched einsum over C does not
  (XLA:CPU gave the tail of 404 candidates other low bits than the rest), and a multiply
  and sum does but took 3x as long (1,024 x 160 x 256: 296 against 104 ms)."""
  n, c, d = rows.shape
  q = jnp.broadcast_to(q[:, None, :], (n, c, d)).reshape(n * c, 1, d)
  out = jax.lax.batch_matmul(q.astype(jnp.float32), rows.reshape(n * c, d, 1).astype(
      jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.reshape(n, c)


def _merge(top_s, top_i, s, idx, k: int):
  """The k best of a running top-k and new candidates of higher index."""
  # Earlier (lower-index) candidates come first, so lax.top_k's lower-position-first
  # rule keeps ties in gallery-index order.
  s = jnp.concatenate([top_s, s], axis=1)
  idx = jnp.concatenate([top_i, idx], axis=1)
  top_s, pos = jax.lax.top_k(s, k)
  return top_s, jnp.take_along_axis(idx, pos, axis=1)


@functools.lru_cache(maxsize=64)
def _topk_program(layout: Layout, k: int, approx: bool, recall_target: float):
  axes = layout.mesh.axis_names
  group = group_size(layout.block_size, k)

  def local(q, g, g_lab):
    blocks = _local_blocks(layout, g, g_lab)
    n = q.shape[0]
    padded = lambda idx: idx[-1] >= layout.size

    def best_of_block(s, idx):
      if approx:
        top_s, pos = jax.lax.approx_max_k(
            s, min(k, s.shape[1]), recall_target=recall_target,
            reduction_input_size_override=layout.padded_size)
        return top_s, jnp.take_along_axis(jnp.broadcast_to(idx[None], s.shape), pos, axis=1)
      return block_topk(s, idx, k, group)

    def best_of_padded_block(s, idx):
      return best_of_block(jnp.where(idx[None] < layout.size, s, -jnp.inf), idx)

    def step(carry, xs):
      blk, _, idx = xs
      # Only the last blocks hold padding rows; masking every block's scores would cost
      # another pass over them.
      s, idx = jax.lax.cond(padded(idx), best_of_padded_block, best_of_block,
                            _block_scores(q, blk), idx)
      return _merge(*carry, s, idx, k), None

    top = _varying((jnp.full((n, k), -jnp.inf, jnp.float32),
                    jnp.full((n, k), -1, jnp.int32)), axes)
    per = 0 if approx else superblock_size(layout, k, group, n, q.shape[1])
    if per:
      # Every block goes through superblocks (none block by block), so every candidate
      # is scored by _row_scores and equal rows compare equal across superblocks.
      blk, _, idx = blocks
      count = blk.shape[0] // per
      search_in = lambda start, num: superblock_topk(q, blk, idx, start, num, k, group,
                                                     layout.size, padded, axes)

      def superblock(carry, i):
        return _merge(*carry, *search_in(i * per, per), k), None

      top, _ = jax.lax.scan(superblock, top, jnp.arange(count - 1, dtype=jnp.int32))
      top_s, top_i = _merge(*top, *search_in((count - 1) * per,
                                              blk.shape[0] - (count - 1) * per), k)
    else:
      (top_s, top_i), _ = jax.lax.scan(step, top, blocks)
    # Merge over devices into [N, devices * k] candidates in device order: device d's all
    # have lower indices than device d+1's, so lax.top_k keeps the tie order here too.
    # A psum of one-hot-placed slots rather than an all_gather: its result is typed as
    # replicated, which out_specs=P() needs under both Auto and Explicit meshes.
    devices = layout.mesh.devices.size
    slot = jax.lax.axis_index(axes)
    cand_s = jax.lax.psum(jnp.zeros((devices, n, k), jnp.float32).at[slot].set(top_s), axes)
    cand_i = jax.lax.psum(jnp.zeros((devices, n, k), jnp.int32).at[slot].set(top_i), axes)
    cand_s = cand_s.transpose(1, 0, 2).reshape(n, devices * k)
    cand_i = cand_i.transpose(1, 0, 2).reshape(n, devices * k)
    top_s, pos = jax.lax.top_k(cand_s, k)
    return top_s, jnp.take_along_axis(cand_i, pos, axis=1)

  rows, rep = sharding.gallery_spec(layout.mesh), sharding.REPLICATED
  return jax.jit(jax.shard_map(local, mesh=layout.mesh, in_specs=(rep, rows, rows),
                               out_specs=(rep, rep)))


@functools.lru_cache(maxsize=64)
def _ranks_program(layout: Layout):
  axes = layout.mesh.axis_names

  def local(q, q_lab, q_self, g, g_lab):
    blocks = _local_blocks(layout, g, g_lab)

    def masks(lab, idx):
      valid = (idx < layout.size)[None]
      same = q_lab[:, None] == lab[None]
      return same & valid & (idx[None] != q_self[:, None]), ~same & valid

    def best_positive(best, xs):
      blk, lab, idx = xs
      pos, _ = masks(lab, idx)
      s = jnp.where(pos, _block_scores(q, blk), -jnp.inf)
      return jnp.maximum(best, jnp.max(s, axis=1)), None

    best, _ = jax.lax.scan(
        best_positive, _varying(jnp.full(q.shape[:1], -jnp.inf, jnp.float32), axes), blocks)
    best = jax.lax.pmax(best, axes)

    def count_above(count, xs):
      blk, lab, idx = xs
      _, neg = masks(lab, idx)
      # The same _block_scores on the same shapes as the first pass, so a negative that
      # equals the best positive compares equal bit for bit (the pessimistic tie rule).
      above = neg & (_block_scores(q, blk) >= best[:, None])
      return count + jnp.sum(above, axis=1, dtype=jnp.int32), None

    count, _ = jax.lax.scan(count_above, _varying(jnp.zeros(q.shape[:1], jnp.int32), axes),
                            blocks)
    count = jax.lax.psum(count, axes)
    return jnp.where(best > -jnp.inf, count + 1, 0)

  return jax.jit(jax.shard_map(
      local, mesh=layout.mesh, in_specs=(sharding.REPLICATED,) * 3 +
      (sharding.gallery_spec(layout.mesh),) * 2, out_specs=sharding.REPLICATED))


def _query_chunks(n: int, query_block_size: int):
  if query_block_size < 1:
    raise ValueError(f'query_block_size={query_block_size} must be >= 1.')
  chunk = min(query_block_size, n)
  return chunk, [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]


def _padded(x: np.ndarray, rows: int, fill) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.full((rows - x.shape[0],) + x.shape[1:], fill, x.dtype)
  return np.concatenate([x, pad])


def _gallery(gallery, mesh, block_size) -> Gallery:
  if isinstance(gallery, Gallery):
    if mesh is not None and mesh != gallery.mesh:
      raise ValueError('The Gallery was prepared on another mesh than the one given; '
                       'prepare it with the same mesh or pass mesh=None.')
    return gallery
  return prepare_gallery(gallery, mesh, block_size=block_size)


def sharded_topk(queries, gallery, k: int, *, mesh: Mesh | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE, approx: bool = False,
                 recall_target: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """The k highest dot products of each query over the gallery.

  Args:
    queries: [N, D] numpy.
    gallery: [M, D] numpy, or a `Gallery` from `prepare_gallery` (reused across calls).
    k: 1 <= k <= M.
    mesh: devices to shard the gallery over (all of its axes); None = one device.
    approx: take each block's top-k with `jax.lax.approx_max_k` (fast on TPU; on CPU and
      GPU XLA computes it exactly), then merge exactly.
  Returns:
    (scores fp32 [N, k] descending, gallery indices int32 [N, k]); equal scores are
    ordered by ascending gallery index in exact mode.
  """
  g = _gallery(gallery, mesh, block_size)
  q = as_embeddings(queries, 'queries')
  if q.shape[1] != g.dim:
    raise ValueError(f'Queries have dimension {q.shape[1]} but the gallery has {g.dim}.')
  if not 1 <= k <= g.size:
    raise ValueError(f'k={k} must be between 1 and the gallery size {g.size}.')
  if q.shape[0] == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  program = _topk_program(g.layout, int(k), bool(approx), float(recall_target))
  chunk, spans = _query_chunks(q.shape[0], query_block_size)
  scores, indices = [], []
  for lo, hi in spans:
    qc = _global(g.mesh, sharding.REPLICATED, _padded(q[lo:hi], chunk, 0.0))
    s, i = program(qc, g.embeddings, g.labels)
    scores.append(to_numpy(s)[:hi - lo])
    indices.append(to_numpy(i)[:hi - lo])
  return np.concatenate(scores), np.concatenate(indices)


def positive_ranks(queries, query_labels, gallery: Gallery, *, exclude_self: bool = False,
                   query_block_size: int = DEFAULT_QUERY_BLOCK_SIZE) -> np.ndarray:
  """The 1-based rank of each query's best positive in the gallery, exactly.

  A gallery item is a positive of query i when its label equals `query_labels[i]`; with
  `exclude_self`, query i is gallery item i and is neither positive nor negative. The
  rank is 1 + the number of negatives scoring >= the best positive's score (ties are
  pessimistic, see the module doc). Queries without any positive get rank 0.
  """
  q = as_embeddings(queries, 'queries')
  q_lab = np.asarray(query_labels, np.int32)
  if q_lab.shape != (q.shape[0],):
    raise ValueError(f'query_labels have shape {q_lab.shape}; expected ({q.shape[0]},).')
  if q.shape[1] != gallery.dim:
    raise ValueError(f'Queries have dimension {q.shape[1]} but the gallery has '
                     f'{gallery.dim}.')
  if exclude_self and q.shape[0] != gallery.size:
    raise ValueError(f'exclude_self needs the queries to be the gallery itself, but there '
                     f'are {q.shape[0]} queries and {gallery.size} gallery rows.')
  if q.shape[0] == 0:
    return np.zeros(0, np.int64)
  q_self = (np.arange(q.shape[0], dtype=np.int32) if exclude_self
            else np.full(q.shape[0], -1, np.int32))
  program = _ranks_program(gallery.layout)
  chunk, spans = _query_chunks(q.shape[0], query_block_size)
  ranks = []
  for lo, hi in spans:
    args = [_global(gallery.mesh, sharding.REPLICATED, _padded(x[lo:hi], chunk, fill))
            for x, fill in ((q, 0.0), (q_lab, -2), (q_self, -1))]
    ranks.append(to_numpy(program(*args, gallery.embeddings, gallery.labels))[:hi - lo])
  return np.concatenate(ranks).astype(np.int64)
