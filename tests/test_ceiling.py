"""The split's retrieval ceiling and chance (cookie_jax/eval/ceiling.py), and the summary
printed at the end of a run."""

import graphlib
import itertools

import numpy as np
import pytest

from cookie_jax.eval import protocol
from cookie_jax.eval import ceiling

# Four images; caption 'a' is shared by images 0-2, 'b' by images 0 and 3.
HAND_CAPTIONS = [['a', 'b'], ['a', 'c'], ['a', 'd'], ['b', 'e']]


def _flat(captions_per_image):
  keys = [c for caps in captions_per_image for c in caps]
  index = np.repeat(np.arange(len(captions_per_image)), [len(c) for c in captions_per_image])
  return keys, index


def test_hand_made_split_gives_the_known_ceiling():
  keys, index = _flat(HAND_CAPTIONS)
  got = ceiling.retrieval_ceiling(keys, index, 4)
  # text->image: of the 3 'a' queries one can rank its image first, of the 2 'b' queries
  # one; c, d, e are unique: 5 of 8 at R@1, all at R@5 (at most 3 images share a caption).
  # image->text: image 0's best caption is 'b' (1 tying row of image 3), so rank 2; the
  # others each have a unique caption: 3 of 4 at R@1.
  want = {'t2i_r1': 62.5, 't2i_r5': 100.0, 't2i_r10': 100.0,
          'i2t_r1': 75.0, 'i2t_r5': 100.0, 'i2t_r10': 100.0}
  assert got == pytest.approx({**want, 'rsum': 537.5}, abs=1e-9)


def test_seven_images_sharing_one_caption_cap_recall_at_5():
  # 7 images, each with the same caption 'x' and no other: text->image R@K = K/7 of the
  # queries; image->text: every image ties with 6 rows of the others, rank 7.
  keys, index = ['x'] * 7, np.arange(7)
  got = ceiling.retrieval_ceiling(keys, index, 7)
  assert got['t2i_r1'] == pytest.approx(100 / 7) and got['t2i_r5'] == pytest.approx(500 / 7)
  assert got['t2i_r10'] == 100.0
  assert (got['i2t_r1'], got['i2t_r5'], got['i2t_r10']) == (0.0, 0.0, 100.0)


def test_no_duplicates_means_a_perfect_ceiling():
  keys, index = _flat([[f'{i}-{j}' for j in range(5)] for i in range(20)])
  assert ceiling.retrieval_ceiling(keys, index, 20)['rsum'] == 600.0


def _perfect_model(keys, index, num_images):
  """Embeddings whose scores rank, for each caption, the images holding it most often
  first (all others below), and give each image its caption with the fewest tying rows of
  other images as its strict best: the ceiling's model. Scores are the longest paths of
  the order these constraints form (acyclic; see ceiling.py), made distinct per column."""
  distinct = sorted(set(keys))
  col = {k: c for c, k in enumerate(distinct)}
  count = np.zeros((num_images, len(distinct)), np.int64)
  for k, i in zip(keys, index):
    count[i, col[k]] += 1
  others = count.sum(0)[None, :] - count
  best = np.where(count > 0, others, np.iinfo(np.int64).max).argmin(1)
  held = [tuple(n) for n in zip(*np.nonzero(count))]
  # succ[n]: the entries that must score above n.
  succ = {node: [] for node in held}
  for i, s in held:
    if s != best[i]:
      succ[(i, s)].append((i, best[i]))  # the row's best above every other caption
    # more rows of the caption: higher in its column
    succ[(i, s)] += [(j, s) for j in np.flatnonzero(count[:, s] > count[i, s])]
  preds = {node: set() for node in held}
  for node, after in succ.items():
    for nxt in after:
      preds[nxt].add(node)
  score = np.zeros(count.shape)
  for node in graphlib.TopologicalSorter(preds).static_order():  # longest paths
    score[node] = max(score[node], 1.0)
    for nxt in succ[node]:
      score[nxt] = max(score[nxt], score[node] + 1.0)
  score += (count > 0) * np.arange(num_images)[:, None] * 1e-3  # distinct within a column
  # Images: the score rows, padded to one norm; captions: one-hot of their text.
  norm = np.linalg.norm(score, axis=1)
  pad = np.sqrt(norm.max() ** 2 + 1.0 - norm ** 2)
  images = np.concatenate([score, pad[:, None]], 1)
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  texts = np.eye(len(distinct) + 1)[[col[k] for k in keys]]
  return images.astype(np.float32), texts.astype(np.float32)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_a_model_reaches_the_ceiling_and_no_random_model_passes_it(seed):
  rng = np.random.default_rng(seed)
  num_images = 40
  per_image = rng.integers(1, 4, num_images)
  # A small pool of captions, so that many repeat across images (and some within one).
  keys = [f'c{int(rng.integers(0, 50))}' for _ in range(per_image.sum())]
  index = np.repeat(np.arange(num_images), per_image)
  want = ceiling.retrieval_ceiling(keys, index, num_images)
  assert want['rsum'] < 590  # the duplicates do cost something
  images, texts = _perfect_model(keys, index, num_images)
  got = protocol.retrieval_metrics(images, texts, index)
  assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-9)
  # A random model whose text embedding is a function of the caption stays below.
  distinct = sorted(set(keys))
  for _ in range(3):
    table = rng.normal(size=(len(distinct), 8)).astype(np.float32)
    t = table[[distinct.index(k) for k in keys]]
    i = rng.normal(size=(num_images, 8)).astype(np.float32)
    m = protocol.retrieval_metrics(i / np.linalg.norm(i, axis=1, keepdims=True),
                                   t / np.linalg.norm(t, axis=1, keepdims=True), index)
    assert all(m[k] <= want[k] + 1e-9 for k in want)


def test_chance_matches_every_ranking_enumerated():
  # 3 images with 1, 2 and 1 captions: average the recalls over all 4! caption orders
  # and all 3! image orders.
  index = np.array([0, 1, 1, 2])
  got = ceiling.chance_recall(index, 3)
  i2t = {k: [] for k in ceiling.RECALL_KS}
  for perm in itertools.permutations(range(4)):
    for img in range(3):
      best = min(r for r, row in enumerate(perm, 1) if index[row] == img)
      for k in i2t:
        i2t[k].append(best <= k)
  t2i = {k: [] for k in ceiling.RECALL_KS}
  for perm in itertools.permutations(range(3)):
    for img in index:
      for k in t2i:
        t2i[k].append(perm.index(img) + 1 <= k)
  for k in ceiling.RECALL_KS:
    assert got[f'i2t_r{k}'] == pytest.approx(100 * np.mean(i2t[k]))
    assert got[f't2i_r{k}'] == pytest.approx(100 * np.mean(t2i[k]))


def test_chance_of_the_demo_test_split_layout_is_about_3_2():
  got = ceiling.chance_recall(np.repeat(np.arange(1000), 5), 1000)
  assert got['t2i_r1'] == pytest.approx(0.1) and got['t2i_r10'] == pytest.approx(1.0)
  assert got['i2t_r1'] == pytest.approx(0.1)  # 5 of 5000 rows
  assert got['i2t_r10'] == pytest.approx(100 * (1 - np.prod([(4995 - j) / (5000 - j)
                                                              for j in range(10)])))
  assert got['rsum'] == pytest.approx(3.19, abs=0.01)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match='one image per caption'):
    ceiling.retrieval_ceiling(['a', 'b'], [0], 1)
  with pytest.raises(ValueError, match=r'Images \[1\] have no caption'):
    ceiling.retrieval_ceiling(['a', 'b'], [0, 0], 2)


def test_summary_lines():
  chance = ceiling.chance_recall(np.repeat(np.arange(1000), 5), 1000)
  keys, index = _flat(HAND_CAPTIONS)
  ceil = ceiling.retrieval_ceiling(keys, index, 4)
  result = {'i2t_r1': 40.0, 'i2t_r5': 70.0, 'i2t_r10': 80.0, 't2i_r1': 30.0,
            't2i_r5': 60.0, 't2i_r10': 75.0, 'rsum': 355.0, 'step': 900}
  text = ceiling.summary(result, chance, ceil, files=[('metrics', '/w/test_retrieval.json'),
                                                      ('pictures', '/w/eval/x.png')])
  lines = text.splitlines()
  assert lines[0].startswith('test retrieval, step 900')
  assert lines[1].split() == ['i2t@1', 'i2t@5', 'i2t@10', 't2i@1', 't2i@5', 't2i@10', 'RSUM']
  assert lines[2].split() == ['chance', '0.1', '0.5', '1.0', '0.1', '0.5', '1.0', '3.2']
  assert lines[3].split() == ['model', '40.0', '70.0', '80.0', '30.0', '60.0', '75.0', '355.0']
  assert lines[4].split() == ['ceiling', '75.0', '100.0', '100.0', '62.5', '100.0', '100.0',
                              '537.5']
  # (355 - 3.19) / (537.5 - 3.19) = 65.8%
  assert 'has 66% of the way from chance' in lines[5]
  assert lines[6:] == ['  metrics: /w/test_retrieval.json', '  pictures: /w/eval/x.png']


@pytest.mark.slow
def test_a_run_ends_with_the_summary(tmp_path, caplog):
  import json  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  from cookie_jax import train  # pylint: disable=g-import-not-at-top
  from cookie_jax.config import default_config  # pylint: disable=g-import-not-at-top
  config = default_config('tiny')
  config.model.vision.image_size = 16
  config.model.vision.depth = config.model.text.depth = 1
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.max_len = 12
  config.data.synthetic.train_images = 64
  config.data.synthetic.eval_images = 16
  config.data.synthetic.image_size = 16
  config.train.batch_size = 16
  config.train.steps = 2
  config.train.progress_bar = False
  config.eval.batch_size = 16
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, workdir)
  last = caplog.records[-1].getMessage().splitlines()
  with open(f'{workdir}/test_retrieval.json', encoding='utf-8') as f:
    result = json.load(f)
  assert last[0].startswith('test retrieval, step 2')
  model = [float(v) for v in last[3].split()[1:]]
  assert model == pytest.approx([round(result[f'{d}_r{k}'], 1) for d in ('i2t', 't2i')
                                 for k in (1, 5, 10)] + [round(result['rsum'], 1)])
  assert last[2].split()[0] == 'chance' and last[4].split()[0] == 'ceiling'
  assert last[-2] == f'  figures: {workdir}/test_retrieval.json'
  assert last[-1].endswith(f'{workdir}/eval/retrieval-test-full-2-examples.png, '
                           f'{workdir}/eval/retrieval-test-full-2-recall.png')
