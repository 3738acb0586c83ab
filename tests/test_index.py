"""The image index (cookie_jax/eval/index.py, launch/index.py) over the synthetic test
images in a folder with a corrupt file: embeddings equal to the eval pipeline's, search
equal to brute force (faiss and JAX), an interrupted build resumed to exactly the paths
of an uninterrupted one, a tfds split as the source, and the launcher."""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from cookie_jax.eval import protocol
from cookie_jax.config import ConfigError
from cookie_jax.data import pipeline, sources
from cookie_jax.eval import encoder as encoder_lib
from cookie_jax.eval import index as index_lib

import eval_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """The run, its synthetic test split as PNG files (half in a sub-folder) plus one
  corrupt file, and the split's eval-pipeline embeddings and captions."""
  run = eval_run.make_run(tmp_path_factory.mktemp('index'))
  cfg = run.config
  builder = sources.get_builder(cfg.data)
  records = sources.read(builder, 'test', sources.feature_keys(cfg.data))
  folder = run.root / 'pictures'
  keys = []
  for i, ex in enumerate(records.as_numpy_iterator()):
    key = f'{"nested/" if i % 2 else ""}img_{i:03d}.png'
    (folder / key).parent.mkdir(parents=True, exist_ok=True)
    (folder / key).write_bytes(ex['image'])
    keys.append(key)
  (folder / 'nested' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40)
  (folder / 'readme.txt').write_text('not an image')
  enc = encoder_lib.from_run(str(run.workdir))
  data = pipeline.eval_data(cfg.data, 'test', image_size=16, batch_size=16)
  images = protocol.encode_images(enc.model, data.image_batches(), enc.mesh)
  return dict(run=run, folder=folder, keys=keys, enc=enc, builder=builder, images=images,
              captions=data.captions, caption_image=np.asarray(data.caption_image_index))


def _build(setup, index_dir, **kw):
  source = index_lib.folder_source(setup['folder'])
  return index_lib.build_index(setup['enc'], source, index_dir, progress=False, **kw)


def test_build_and_query_a_folder_with_a_corrupt_file(setup, tmp_path):
  manifest = _build(setup, tmp_path / 'idx', chunk_size=10)
  assert (manifest['num_images'], manifest['num_indexed'], manifest['num_skipped']) == (
      25, 24, 1)
  assert manifest['complete'] and manifest['faiss'] == (index_lib.faiss_module() is not None)
  skipped = json.loads((tmp_path / 'idx' / index_lib.SKIPPED).read_text())
  assert [s['path'] for s in skipped] == ['nested/corrupt.png'] and skipped[0]['error']
  index = index_lib.Index.load(tmp_path / 'idx')
  assert sorted(index.keys) == sorted(setup['keys'])
  # Each file's embedding is its image's from the eval pipeline (tfds, TF's decoder).
  order = [setup['keys'].index(k) for k in index.keys]
  np.testing.assert_allclose(index.embeddings, setup['images'][order], atol=1e-5)

  captions = setup['captions'][::7]
  texts = setup['enc'].encode_texts(captions)
  scores = texts @ index.embeddings.T
  truth = np.argsort(-scores, axis=1, kind='stable')[:, :5]
  for backend in ('jax', 'faiss') if manifest['faiss'] else ('jax',):
    got_scores, rows = index.search(texts, 5, backend=backend, mesh=setup['enc'].mesh)
    np.testing.assert_array_equal(rows, truth, err_msg=backend)
    np.testing.assert_allclose(got_scores, np.take_along_axis(scores, truth, 1), atol=1e-5)

  picture = tmp_path / 'q.png'
  results = index_lib.query_index(tmp_path / 'idx', captions[:3], k=4, picture=str(picture))
  assert [r['query'] for r in results] == captions[:3]
  assert [[k for k, _ in r['results']] for r in results] == [
      [index.keys[j] for j in row[:4]] for row in truth[:3]]
  with Image.open(picture) as img:
    assert img.width > 600 and np.asarray(img.convert('L')).std() > 10

  # The share of captions whose image is in the top 5 is the eval's text->image R@5.
  texts = setup['enc'].encode_texts(setup['captions'])
  _, rows = index.search(texts, 5, mesh=setup['enc'].mesh)
  image_of = np.asarray([setup['keys'].index(k) for k in index.keys])
  share = 100 * np.mean(np.any(image_of[rows] == setup['caption_image'][:, None], axis=1))
  metrics = protocol.retrieval_metrics(setup['images'], texts, setup['caption_image'],
                                       mesh=setup['enc'].mesh)
  assert share == pytest.approx(metrics['t2i_r5'])


def test_unknown_words_are_those_spelled_out_or_unknown():
  from cookie_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  vocab = list(tok_lib.SPECIAL_TOKENS) + [
      'a', 'red', 'circle', 'of', 'left', 'blue', 'sq', '##uare', 'em', '##bed', '##ding',
      '##om'] + list('photowmns') + [f'##{c}' for c in 'photowmns']
  tok = tok_lib.finalize(tok_lib.wordpiece_tokenizer(vocab), 24)
  # Whole words, and a word in sub-words mostly longer than two characters (as BERT
  # splits a rare word), are known.
  assert tok_lib.unknown_words(tok, 'a red circle left of a blue square embeddings') == []
  # Spelled out: p ##h ##o ##t ##o, and w ##om ##a ##n (as the demo's vocabulary does).
  assert tok_lib.unknown_words(tok, 'A photo of a Woman') == ['photo', 'Woman']
  assert tok_lib.unknown_words(tok, 'a red zebra') == ['zebra']  # [UNK]


@pytest.mark.parametrize('queries, name', [
    (['a red circle left of a blue square'], 'query-a-red-circle-left-of-a-blue-square.png'),
    (['  Ein Foto: café & Über!', 'x'], 'query-ein-foto-caf-ber-and-1-more.png'),
    (['', '???'], 'query-query.png'),
    (['word ' * 40], 'query-' + '-'.join(['word'] * 12) + '.png')])  # at most 60 characters
def test_the_default_picture_is_named_after_the_query(queries, name):
  assert index_lib.picture_path('/idx', queries) == f'/idx/{name}'


class _Stop(Exception):
  pass


def _stop(chunk):
  raise _Stop(chunk)


def test_interrupted_build_resumes_to_the_paths_of_an_uninterrupted_one(setup, tmp_path):
  whole = _build(setup, tmp_path / 'whole', chunk_size=7)
  assert whole['num_indexed'] == 24

  with pytest.raises(_Stop):
    _build(setup, tmp_path / 'cut', chunk_size=7, on_chunk=_stop)
  chunks = sorted(p.name for p in (tmp_path / 'cut' / index_lib.CHUNKS).iterdir())
  assert chunks == ['00000.npz']  # the first chunk is on disk, nothing else
  with pytest.raises(FileNotFoundError, match='not complete'):
    index_lib.Index.load(tmp_path / 'cut')
  first = (tmp_path / 'cut' / index_lib.CHUNKS / '00000.npz').stat().st_mtime_ns

  encoded = []
  resumed = _build(setup, tmp_path / 'cut', chunk_size=7, on_chunk=encoded.append)
  assert encoded == [1, 2, 3]  # chunk 0 was not encoded again
  assert (tmp_path / 'cut' / index_lib.CHUNKS / '00000.npz').stat().st_mtime_ns == first
  assert resumed['last_build_images'] == 25 - 7
  a, b = index_lib.Index.load(tmp_path / 'whole'), index_lib.Index.load(tmp_path / 'cut')
  assert a.keys == b.keys and set(a.keys) == set(setup['keys'])
  np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)
  assert json.loads((tmp_path / 'cut' / index_lib.SKIPPED).read_text()) == json.loads(
      (tmp_path / 'whole' / index_lib.SKIPPED).read_text())
  with pytest.raises(ConfigError, match='chunk_size=7, not 5'):
    _build(setup, tmp_path / 'cut', chunk_size=5)


def test_a_tfds_split_as_the_source(setup, tmp_path):
  builder = setup['builder']
  source = index_lib.tfds_source(f'{builder.name}/{builder.builder_config.name}', 'test',
                                 setup['run'].config.data.data_dir)
  manifest = index_lib.build_index(setup['enc'], source, tmp_path / 'tfds', chunk_size=16,
                                   progress=False)
  assert (manifest['num_indexed'], manifest['num_skipped']) == (24, 0)
  index = index_lib.Index.load(tmp_path / 'tfds')
  assert index.keys[3].endswith('/test/3')
  np.testing.assert_allclose(index.embeddings, setup['images'], atol=1e-5)
  pixels = index_lib.Source(manifest['source'], []).picture(index.keys[3])
  np.testing.assert_array_equal(pixels,
                                np.asarray(Image.open(setup['folder'] / setup['keys'][3])))


def test_an_export_folder_indexes_and_queries_like_the_run(setup, tmp_path):
  pytest.importorskip('torch')
  from cookie_jax.interop import hf_export  # pylint: disable=g-import-not-at-top
  hf_export.export_run(str(setup['run'].workdir), str(tmp_path / 'export'))
  enc = encoder_lib.from_export(tmp_path / 'export', batch_size=16)
  assert enc.source == {'export': str(tmp_path / 'export')} and enc.image_size == 16
  manifest = index_lib.build_index(enc, index_lib.folder_source(setup['folder']),
                                   tmp_path / 'idx', progress=False)
  assert manifest['encoder'] == enc.source and manifest['num_indexed'] == 24
  index = index_lib.Index.load(tmp_path / 'idx')
  order = [setup['keys'].index(k) for k in index.keys]
  np.testing.assert_allclose(index.embeddings, setup['images'][order], atol=1e-5)
  captions = setup['captions'][:4]
  np.testing.assert_allclose(enc.encode_texts(captions), setup['enc'].encode_texts(captions),
                             atol=1e-5)
  results = index_lib.query_index(tmp_path / 'idx', captions[:1], k=3)  # model from manifest
  assert len(results[0]['results']) == 3
  with pytest.raises(FileNotFoundError, match='has no config.json'):
    encoder_lib.from_export(tmp_path)


def _launch(*args):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # one CPU device
  return subprocess.run([sys.executable, str(ROOT / 'launch' / 'index.py'), *args],
                        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.mark.slow  # CI time: a launcher run; the in-process resumed build above stays
def test_launcher_finishes_a_cut_build_and_queries(setup, tmp_path):
  with pytest.raises(_Stop):
    _build(setup, tmp_path / 'idx', chunk_size=4096, on_chunk=_stop)
  # The chunk is on disk; the CLI's build finds nothing left but the consolidation.
  out = _launch('build', f'--workdir={setup["run"].workdir}', f'--images={setup["folder"]}',
                f'--index={tmp_path / "idx"}', '--noprogress')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Indexed 24 of 25 images' in out.stdout and 'Skipped 1 unreadable' in out.stdout
  (tmp_path / 'queries.txt').write_text(setup['captions'][0] + '\n\n' + setup['captions'][5])
  out = _launch('query', f'--index={tmp_path / "idx"}', 'a red circle', '--k=3',
                f'--queries_file={tmp_path / "queries.txt"}', '--search=jax')
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert [l for l in lines if l.startswith('query: ')] == [
      'query: a red circle', f'query: {setup["captions"][0]}', f'query: {setup["captions"][5]}']
  assert sum(l.startswith('   1. ') for l in lines) == 3
  assert (tmp_path / 'idx' / 'query-a-red-circle-and-2-more.png').is_file()
  # Every word of this query is in the synthetic vocabulary (some of the captions' words
  # are not in this 32-image set's tiny one, and are named).
  assert "'a red circle'" not in out.stderr
  # Words the synthetic vocabulary spells letter by letter: one warning line, and a
  # picture of its own beside the first query's.
  out = _launch('query', f'--index={tmp_path / "idx"}', 'a photo of a woman', '--k=2',
                '--search=jax')
  assert out.returncode == 0, out.stderr[-3000:]
  warned = [l for l in out.stderr.splitlines() if 'vocabulary does not know' in l]
  assert len(warned) == 1 and "'photo', 'woman'" in warned[0], out.stderr[-3000:]
  assert (tmp_path / 'idx' / 'query-a-photo-of-a-woman.png').is_file()
  assert (tmp_path / 'idx' / 'query-a-red-circle-and-2-more.png').is_file()
  with pytest.raises(FileNotFoundError, match=r"--index=.*nowhere.* holds no manifest.json"):
    index_lib.query_index(tmp_path / 'nowhere', ['x'])


@pytest.mark.slow  # two launcher runs
def test_a_build_killed_after_its_first_chunk_resumes_to_the_same_paths(setup, tmp_path):
  args = ('build', f'--workdir={setup["run"].workdir}', f'--images={setup["folder"]}',
          f'--index={tmp_path / "idx"}', '--chunk_size=1', '--noprogress')
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  proc = subprocess.Popen([sys.executable, str(ROOT / 'launch' / 'index.py'), *args],
                          env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = tmp_path / 'idx' / index_lib.CHUNKS / '00000.npz'
  deadline = time.time() + 240
  while not first.is_file() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.kill()  # SIGKILL: no handler runs, nothing is flushed
  proc.wait()
  written = len(list((tmp_path / 'idx' / index_lib.CHUNKS).glob('*.npz')))
  assert 1 <= written < 25, written
  assert not json.loads((tmp_path / 'idx' / index_lib.MANIFEST).read_text())['complete']
  out = _launch(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  whole = _build(setup, tmp_path / 'whole', chunk_size=1)
  resumed = json.loads((tmp_path / 'idx' / index_lib.MANIFEST).read_text())
  assert resumed['last_build_images'] == 25 - written and whole['num_indexed'] == 24
  a, b = index_lib.Index.load(tmp_path / 'idx'), index_lib.Index.load(tmp_path / 'whole')
  assert a.keys == b.keys
  np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
