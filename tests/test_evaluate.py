"""Retrieval evaluation: hand-computed metrics, sharded search against NumPy brute force,
sharded against unsharded, COCO 1K folds, unimodal tasks, and the sharded encoders."""

from flax import nnx
import jax
import numpy as np
import pytest

from cookie_jax import models, sharding
from cookie_jax.eval import protocol, search
from cookie_jax.config import default_config


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))


def _unit(rng, shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_ranks(images, texts, index):
  """The classic VSE++ loop over the full score matrix (ties never occur on random data)."""
  sim = images.astype(np.float64) @ texts.astype(np.float64).T
  i2t = np.array([np.flatnonzero(np.isin(np.argsort(-row, kind='stable'),
                                         np.flatnonzero(index == i))).min() + 1
                  for i, row in enumerate(sim)])
  t2i = np.array([np.flatnonzero(np.argsort(-col, kind='stable') == index[c])[0] + 1
                  for c, col in enumerate(sim.T)])
  return i2t, t2i


def _reference_metrics(images, texts, index):
  i2t, t2i = _reference_ranks(images, texts, index)
  out = {}
  for name, r in (('i2t', i2t), ('t2i', t2i)):
    for k in (1, 5, 10):
      out[f'{name}_r{k}'] = 100.0 * np.mean(r <= k)
    out[f'{name}_medr'] = np.floor(np.median(r))
    out[f'{name}_meanr'] = np.mean(r)
  out['rsum'] = sum(out[f'{n}_r{k}'] for n in ('i2t', 't2i') for k in (1, 5, 10))
  return out


def _random_split(seed, counts, dim=8):
  """Captions near their image, listed in shuffled order (not grouped by image)."""
  rng = np.random.default_rng(seed)
  images = _unit(rng, (len(counts), dim))
  index = np.repeat(np.arange(len(counts)), counts)
  rng.shuffle(index)
  texts = images[index] + 2.0 * _unit(rng, (len(index), dim))
  return images, (texts / np.linalg.norm(texts, axis=1, keepdims=True)).astype(np.float32), \
      index.astype(np.int32)


# Image embeddings are one-hot, so text c's score with image i is texts[c, i]: each row
# below reads as a caption's scores against images 0, 1, 2 (all exact in fp32).
HAND_TEXTS = np.array([[0.5, 0.75, 0.0],   # image 0; image 1 higher -> t2i rank 2
                       [1.0, 0.25, 0.5],   # image 0; rank 1
                       [0.25, 0.25, 0.25],  # image 1; tied with both others -> rank 3
                       [0.0, 0.0, 0.75],   # image 2; rank 1
                       [0.5, 0.0, 0.25],   # image 2; rank 2
                       [0.75, 0.5, 0.0]],  # image 2; rank 3
                      np.float32)
HAND_INDEX = np.array([0, 0, 1, 2, 2, 2], np.int32)


@pytest.mark.parametrize('use_mesh, block', [(False, 4096), (True, 1)])
def test_hand_case_with_ties_and_uneven_captions(mesh, use_mesh, block):
  m = protocol.retrieval_metrics(np.eye(3, dtype=np.float32), HAND_TEXTS, HAND_INDEX,
                                 mesh=mesh if use_mesh else None, block_size=block)
  # i2t: image 0's best caption scores 1.0 (rank 1); image 1's only caption scores 0.25,
  # beaten by 0.75 and 0.5 and tied by 0.25 -> rank 4 (pessimistic); image 2 rank 1.
  # t2i ranks are [2, 1, 3, 1, 2, 3].
  assert m == pytest.approx(dict(
      i2t_r1=200 / 3, i2t_r5=100.0, i2t_r10=100.0, i2t_medr=1.0, i2t_meanr=2.0,
      t2i_r1=100 / 3, t2i_r5=100.0, t2i_r10=100.0, t2i_medr=2.0, t2i_meanr=2.0,
      rsum=500.0))


def test_hand_case_rank_between_5_and_10(mesh):
  # Image 0 has one caption scoring 0.5; six captions of image 1 score >= 0.5 against
  # image 0 (two of them tie) -> i2t rank 7. Image 1's best caption (1.0) is rank 1.
  texts = np.array([[0.5, 0.0], [1.0, 0.25], [0.75, 0.0], [0.5, 0.5], [0.75, 1.0],
                    [1.0, 0.5], [0.5, 0.75], [0.25, 0.5], [0.0, 0.25], [0.25, 0.0],
                    [0.0, 0.0], [0.0, 0.75]], np.float32)
  index = np.array([0] + [1] * 11, np.int32)
  m = protocol.retrieval_metrics(np.eye(2, dtype=np.float32), texts, index, mesh=mesh,
                                 block_size=2)
  # t2i: captions 0, 4, 6, 7, 8, 11 rank 1; the rest (ties included) rank 2.
  assert m == pytest.approx(dict(
      i2t_r1=50.0, i2t_r5=50.0, i2t_r10=100.0, i2t_medr=4.0, i2t_meanr=4.0,
      t2i_r1=50.0, t2i_r5=100.0, t2i_r10=100.0, t2i_medr=1.0, t2i_meanr=1.5, rsum=450.0))


def test_collapsed_model_gets_worst_ranks_not_perfect_recall(mesh):
  same = np.ones((4, 2), np.float32)
  m = protocol.retrieval_metrics(same, np.ones((20, 2), np.float32),
                                 np.repeat(np.arange(4), 5), mesh=mesh)
  assert (m['i2t_meanr'], m['t2i_meanr'], m['i2t_r1'], m['t2i_r1']) == (16.0, 4.0, 0.0, 0.0)


@pytest.mark.parametrize('counts', [[5] * 40, [1, 7, 2, 5, 3, 1, 6, 4, 2, 5] * 3])
def test_metrics_match_numpy_reference_and_unsharded(mesh, counts):
  images, texts, index = _random_split(len(counts), counts)
  sharded = protocol.retrieval_metrics(images, texts, index, mesh=mesh, block_size=7,
                                       query_block_size=16)
  single = protocol.retrieval_metrics(images, texts, index)
  assert sharded == single
  assert sharded == pytest.approx(_reference_metrics(images, texts, index))
  # The data are hard enough that every metric is informative.
  assert 0 < sharded['t2i_r1'] < sharded['t2i_r10'] < 100


def test_coco1k_folds_average_per_fold_metrics(mesh):
  images, texts, index = _random_split(7, [5] * 25)
  folds = protocol.retrieval_metrics(images, texts, index, mesh=mesh, layout='coco1k')
  assert folds == protocol.retrieval_metrics_folds(images, texts, index, num_folds=5)
  per_fold = []
  for f in range(5):
    sel = (index >= 5 * f) & (index < 5 * f + 5)
    per_fold.append(_reference_metrics(images[5 * f:5 * f + 5], texts[sel],
                                       index[sel] - 5 * f))
  expected = {k: np.mean([p[k] for p in per_fold]) for k in per_fold[0]}
  assert folds == pytest.approx(expected)
  full = protocol.retrieval_metrics(images, texts, index, mesh=mesh)
  assert folds['rsum'] > full['rsum']  # a 5x smaller gallery is easier


def test_errors_name_the_problem():
  x = np.ones((3, 4), np.float32)
  with pytest.raises(ValueError, match='Empty evaluation split: 0 images and 3 captions'):
    protocol.retrieval_metrics(np.zeros((0, 4), np.float32), x, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match='Empty evaluation split: 3 images and 0 captions'):
    protocol.retrieval_metrics(x, np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
  with pytest.raises(ValueError, match=r'Images \[2\] .* have no caption'):
    protocol.retrieval_metrics(x, x, np.array([0, 1, 1]))
  with pytest.raises(ValueError, match='valid: 0..2'):
    protocol.retrieval_metrics(x, x, np.array([0, 1, 3]))
  with pytest.raises(ValueError, match='cannot be split into num_folds=5'):
    protocol.retrieval_metrics(x, x, np.array([0, 1, 2]), layout='coco1k')
  with pytest.raises(ValueError, match="Unknown layout 'coco5k'"):
    protocol.retrieval_metrics(x, x, np.array([0, 1, 2]), layout='coco5k')
  with pytest.raises(ValueError, match='non-finite values in rows \\[1\\]'):
    protocol.retrieval_metrics(x, np.array([[0] * 4, [np.nan] * 4, [1] * 4], np.float32),
                               np.array([0, 1, 2]))
  with pytest.raises(ValueError, match='Empty evaluation split: 0 items'):
    protocol.unimodal_metrics(np.zeros((0, 4), np.float32), np.zeros(0, np.int32))
  with pytest.raises(ValueError, match='k=4 must be between 1 and the gallery size 3'):
    search.sharded_topk(x, x, 4)


# (16400, 32): 65 blocks per device, so the default constants choose superblocks.
@pytest.mark.parametrize('size, block', [(1003, 32), (1003, 4096), (5, 1), (16400, 32)])
def test_sharded_topk_equals_numpy_brute_force(mesh, size, block):
  rng = np.random.default_rng(size + block)
  gallery, queries = _unit(rng, (size, 16)), _unit(rng, (37, 16))
  k = min(size, 10)
  scores, idx = search.sharded_topk(queries, gallery, k, mesh=mesh, block_size=block,
                                       query_block_size=16)
  sim = queries.astype(np.float64) @ gallery.astype(np.float64).T
  ref = np.argsort(-sim, axis=1, kind='stable')[:, :k]
  np.testing.assert_array_equal(idx, ref)
  np.testing.assert_allclose(scores, np.take_along_axis(sim, ref, 1), atol=1e-5)


def test_sharded_topk_orders_ties_by_gallery_index_and_never_returns_padding(mesh):
  # 5 rows over 8 devices: 3 devices hold only padding.
  gallery = np.array([[1, 0], [0, 1], [1, 0], [0.5, 0.5], [1, 0]], np.float32)
  scores, idx = search.sharded_topk(np.array([[1, 0]], np.float32), gallery, 5,
                                       mesh=mesh, block_size=1)
  np.testing.assert_array_equal(idx, [[0, 2, 4, 3, 1]])
  np.testing.assert_array_equal(scores, [[1, 1, 1, 0.5, 0]])


def test_approx_topk_returns_true_scores_with_target_recall(mesh):
  rng = np.random.default_rng(3)
  gallery, queries = _unit(rng, (2000, 16)), _unit(rng, (20, 16))
  prepared = search.prepare_gallery(gallery, mesh, block_size=128)
  exact_s, exact_i = search.sharded_topk(queries, prepared, 10)
  approx_s, approx_i = search.sharded_topk(queries, prepared, 10, approx=True)
  recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_i, exact_i)])
  assert recall >= 0.95
  np.testing.assert_allclose(approx_s, np.take_along_axis(queries @ gallery.T, approx_i, 1),
                             atol=1e-5)
  assert (approx_s <= exact_s[:, :1] + 1e-6).all()


def test_unimodal_hand_case_excludes_the_query_itself(mesh):
  emb = np.array([[1, 0], [0.5, 0.5], [1, 0], [0, 1], [0.5, 0]], np.float32)
  labels = np.array([0, 0, 1, 1, 2])
  # Item 0: positive 1 scores 0.5; item 2 (1.0) beats it, item 4 (0.5) ties -> rank 3.
  # Item 1: positive 0 scores 0.5, items 2 and 3 tie -> 3. Item 2: its duplicate item 0
  # has another label; positive 3 scores 0 -> 4 (without excluding itself it would be 2).
  # Item 3: positive 2 scores 0 -> 4. Item 4's label is unique: no positive, left out.
  for m in (None, mesh):
    assert protocol.unimodal_metrics(emb, labels, mesh=m, block_size=1) == pytest.approx(
        dict(r1=0.0, r5=100.0, r10=100.0, medr=3.0, meanr=3.5, num_queries=4))


def test_text_matching_matches_numpy(mesh):
  _, texts, index = _random_split(11, [5] * 30)
  sim = texts.astype(np.float64) @ texts.astype(np.float64).T
  np.fill_diagonal(sim, -np.inf)
  ranks = []
  for q, row in enumerate(sim):
    order = np.argsort(-row, kind='stable')[:-1]  # the query itself sorts last
    ranks.append(np.flatnonzero(index[order] == index[q]).min() + 1)
  expected = protocol.rank_summary(ranks) | {'num_queries': len(texts)}
  got = protocol.unimodal_metrics(texts, index, mesh=mesh, block_size=8)
  assert got == pytest.approx(expected)
  assert 0 < got['r1'] < 100


# --- Encoding ----------------------------------------------------------------------------


class FakeEvalData:
  """The attributes of cookie_jax.data.pipeline.EvalData, from arrays; padded, masked."""

  def __init__(self, images, input_ids, attention_mask, caption_image_index, batch_size):
    self.images, self.ids, self.att = images, input_ids, attention_mask
    self.caption_image_index = caption_image_index
    self.num_images, self.num_captions = len(images), len(input_ids)
    self.batch_size = batch_size

  def _batches(self, fields):
    n = len(next(iter(fields.values())))
    for lo in range(0, n, self.batch_size):
      out = {k: v[lo:lo + self.batch_size] for k, v in fields.items()}
      real = len(out['mask'])
      pad = self.batch_size - real
      yield {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
             for k, v in out.items()}

  def image_batches(self):
    return self._batches({'image': self.images, 'mask': np.ones(self.num_images, bool)})

  def text_batches(self):
    return self._batches({'input_ids': self.ids, 'attention_mask': self.att,
                          'mask': np.ones(self.num_captions, bool)})


@pytest.fixture(scope='module')
def tiny_model_and_data():
  config = default_config('tiny')
  config.model.vision.image_size = 16
  # Initialised under jit: eager NNX init of even the tiny model takes ~10 s on 2 cores.
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.init_model(config.model, seed=0)))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(models.init_model(config.model, 0))))()
  rng = np.random.default_rng(0)
  counts = [1, 3, 2, 5, 1, 2, 4, 2, 1, 3, 2]
  index = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  lengths = rng.integers(2, 9, size=len(index))
  att = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
  ids = (rng.integers(5, 1024, size=att.shape) * att).astype(np.int32)
  images = rng.normal(size=(len(counts), 16, 16, 3)).astype(np.float32)
  # The reference: one unpadded, unsharded call per side.
  direct = jax.jit(lambda p: (nnx.merge(graphdef, p).encode_image(images),
                              nnx.merge(graphdef, p).encode_text(ids, att)))
  want_img, want_txt = map(np.asarray, direct(params))
  return (graphdef, params), FakeEvalData(images, ids, att, index, batch_size=8), \
      want_img, want_txt


def test_sharded_encoders_equal_direct_model_calls(mesh, tiny_model_and_data):
  (graphdef, params), data, want_img, want_txt = tiny_model_and_data
  model = nnx.merge(graphdef, params)
  got_img = protocol.encode_images(protocol.Weights.of(model), data.image_batches(), mesh)
  # Global jax.Array batches, and Weights built from the pair instead of the module.
  global_batches = (sharding.to_global(mesh, b) for b in data.text_batches())
  got_txt = protocol.encode_texts(protocol.Weights(graphdef, params), global_batches, mesh,
                                  progress=True)
  assert got_img.shape == (11, 32) and got_txt.shape == (26, 32)
  np.testing.assert_allclose(got_img, want_img, atol=1e-5)
  np.testing.assert_allclose(got_txt, want_txt, atol=1e-5)


def test_the_abstract_encoder_is_the_program_evaluation_runs(mesh, tiny_model_and_data):
  """What tpu_compile compiles for a slice (`protocol.abstract_encoder`): evaluation's own
  jit, with the shapes, dtypes and shardings of the batches it places; compiled from the
  abstract inputs alone, it takes the real ones and gives evaluation's embeddings."""
  (graphdef, params), data, want_img, want_txt = tiny_model_and_data
  config = default_config('tiny')
  config.model.vision.image_size, config.data.max_len, config.eval.batch_size = 16, 8, 8
  for side, batch, want in (('image', next(data.image_batches()), want_img),
                            ('text', next(data.text_batches()), want_txt)):
    fn, (abstract_params, abstract_batch) = protocol.abstract_encoder(config, mesh, side)
    assert fn is protocol.encoder(graphdef, mesh, side)  # the cached jit evaluation calls
    placed = protocol._place(batch, protocol._SIDE_KEYS[side], mesh)
    assert abstract_batch == {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                              for k, v in placed.items()}
    on_mesh = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params,
                           abstract_params)
    emb, keep = fn.lower(abstract_params, abstract_batch).compile()(on_mesh, placed)
    assert keep.dtype == np.int32 and np.asarray(keep).tolist() == [1] * 8
    np.testing.assert_allclose(np.asarray(emb), want[:8], atol=1e-5)


def test_the_abstract_image_batch_of_a_video_model_holds_the_clips_frames(mesh):
  config = default_config('tiny')
  config.data.builder, config.model.video.num_frames = 'synthetic_video', 4
  config.eval.batch_size = 8
  size = config.model.vision.image_size
  for num_frames, frames in ((0, config.data.synthetic_video.frames), (2, 2)):
    config.data.num_frames = num_frames  # 0: every stored frame
    _, (_, batch) = protocol.abstract_encoder(config, mesh, 'image')
    assert batch['image'].shape == (8, frames, size, size, 3)


def test_evaluate_retrieval_equals_metrics_of_direct_embeddings(mesh, tiny_model_and_data):
  (graphdef, params), data, images, texts = tiny_model_and_data
  got = protocol.evaluate_retrieval(graphdef, params, data, mesh=mesh)
  want = _reference_metrics(images, texts, data.caption_image_index)
  matching = protocol.unimodal_metrics(texts, data.caption_image_index)
  want.update({f't2t_{k}': v for k, v in matching.items()})
  assert got == pytest.approx(want)
  assert matching['num_queries'] == 26 - 3  # the three single-caption images' captions


@pytest.mark.parametrize('group', [1, 4, 8, 16])
def test_block_topk_two_stage_is_exact_with_many_ties(group):
  # Scores from 6 values: most of the top 10 of each row are ties, spread over groups
  # whose maxima tie too; the result must be a stable sort's first 10.
  rng = np.random.default_rng(group)
  s = rng.integers(0, 6, size=(64, 256)).astype(np.float32)
  s[:, 200:] = -np.inf  # padding at the end of a block, as in the last one
  idx = np.arange(1000, 1256, dtype=np.int32)
  top_s, top_i = jax.jit(search.block_topk, static_argnums=(2, 3))(s, idx, 10, group)
  ref = np.argsort(-s, axis=1, kind='stable')[:, :10]
  np.testing.assert_array_equal(top_i, idx[ref])
  np.testing.assert_array_equal(top_s, np.take_along_axis(s, ref, 1))
  assert search.group_size(4096, 10) == 16 and search.group_size(100, 10) == 2


@pytest.mark.parametrize('group', [1, 4, 16])
def test_superblock_topk_is_exact_with_many_ties_and_padding(group):
  # Integer vectors: every dot product is a small integer, exact in any summation order,
  # so the rescoring of the chosen groups equals the scores that chose them and the
  # result must be a stable sort's first 10 (ties by index), padding never returned.
  rng = np.random.default_rng(group)
  blocks = rng.integers(0, 3, size=(3, 64, 4)).astype(np.float32)
  q = rng.integers(0, 3, size=(16, 4)).astype(np.float32)
  index = np.arange(500, 500 + 3 * 64, dtype=np.int32).reshape(3, 64)
  size = 500 + 150  # the last 42 rows are padding
  fn = jax.jit(lambda q, b, i: search.superblock_topk(
      q, b, i, 0, 3, 10, group, size, lambda idx: idx[-1] >= size))
  top_s, top_i = fn(q, blocks, index)
  s = q @ blocks.reshape(-1, 4).T
  s[:, 150:] = -np.inf
  ref = np.argsort(-s, axis=1, kind='stable')[:, :10]
  np.testing.assert_array_equal(top_i, index.reshape(-1)[ref])
  np.testing.assert_array_equal(top_s, np.take_along_axis(s, ref, 1))


@pytest.mark.parametrize('maxima_bytes, candidate_bytes', [
    (3 * 16 * 32 * 4, 2**30),  # 5 blocks per device in superblocks of 2 and 3
    (2**30, 1)])  # candidates too large: block by block only
def test_sharded_topk_superblocks_and_remainder_equal_brute_force(
    mesh, monkeypatch, maxima_bytes, candidate_bytes):
  monkeypatch.setattr(search, 'MAXIMA_BYTES', maxima_bytes)
  monkeypatch.setattr(search, 'CANDIDATE_BYTES', candidate_bytes)
  monkeypatch.setattr(search, 'MIN_SUPERBLOCK', 1)
  search._topk_program.cache_clear()
  rng = np.random.default_rng(7)
  gallery, queries = _unit(rng, (1203, 16)), _unit(rng, (37, 16))
  prepared = search.prepare_gallery(gallery, mesh, block_size=32)  # 5 blocks per device
  assert prepared.layout.rows_per_device == 5 * 32
  group = search.group_size(32, 10)
  plan = search.superblock_size(prepared.layout, 10, group, 16, 16)
  assert plan == (2 if candidate_bytes > 1 else 0)
  scores, idx = search.sharded_topk(queries, prepared, 10, query_block_size=16)
  search._topk_program.cache_clear()
  sim = queries.astype(np.float64) @ gallery.astype(np.float64).T
  ref = np.argsort(-sim, axis=1, kind='stable')[:, :10]
  np.testing.assert_array_equal(idx, ref)
  np.testing.assert_allclose(scores, np.take_along_axis(sim, ref, 1), atol=1e-5)


@pytest.mark.parametrize('k, block', [(101, 4096), (4, 64), (7, 48)])
def test_sharded_topk_orders_duplicate_float_rows_by_index(mesh, monkeypatch, k, block):
  # Real data repeats images and captions: rows equal bit for bit must score equal
  # wherever they sit (a block's GEMM, a superblock's rescoring, another superblock), so
  # their order is the index's. 6 distinct float vectors, each repeated; several
  # superblocks per device.
  monkeypatch.setattr(search, 'MIN_SUPERBLOCK', 1)
  monkeypatch.setattr(search, 'MAXIMA_BYTES', 2 * 16 * (block // 2) * 4)
  search._topk_program.cache_clear()
  rng = np.random.default_rng(k)
  distinct = _unit(rng, (6, 16))
  gallery = distinct[rng.integers(0, 6, size=8 * 3 * block - 5)]
  queries = _unit(rng, (16, 16))
  scores, idx = search.sharded_topk(queries, gallery, k, mesh=mesh, block_size=block,
                                    query_block_size=16)
  search._topk_program.cache_clear()
  full = queries.astype(np.float64) @ gallery.astype(np.float64).T
  ref = np.argsort(-full, axis=1, kind='stable')[:, :k]
  np.testing.assert_array_equal(idx, ref)
  np.testing.assert_allclose(scores, np.take_along_axis(full, ref, 1), atol=1e-5)
