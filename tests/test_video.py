"""Video-text retrieval: the MSRVTT builder on real video files, the synthetic video set,
the video path of the model (mean pooling and the temporal transformer), sharding, the
1k-A evaluation layout, fine-tuning from an image-text checkpoint and the export guard."""

import csv
import io
import json
import logging

import av
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from cookie_jax import checkpoint as ckpt_lib
from cookie_jax import models, sharding, step
from cookie_jax.eval import protocol
from cookie_jax.config import ConfigError, default_config, validate_config
from cookie_jax.data import augment, defaults, pipeline, sources
from cookie_jax.data.builders import frames as frames_lib
from cookie_jax.data.builders import motion, msrvtt
from cookie_jax.data.tf_env import tf
from cookie_jax.models import CookieModel, model_config

# -- MSRVTT on real (tiny) video files --

# video id -> (official split, frames in the file); video4 is missing, video9 corrupt.
VIDEOS = {0: ('train', 12), 1: ('train', 20), 2: ('train', 9), 3: ('train', 16),
          4: ('train', 10), 5: ('validate', 13), 6: ('test', 18), 7: ('test', 11),
          8: ('test', 14), 9: ('test', 10)}
TEST_1K = {6: 'a person cooks', 7: 'a dog runs', 8: 'cars on a road'}


def _grey(k):
  return 12 * k + 10  # the grey level of frame k, so that a sampled frame tells its index


def _write_video(path, num_frames):
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('mpeg4', rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuv420p'
    stream.bit_rate = 4_000_000
    for k in range(num_frames):
      frame = np.full((48, 64, 3), _grey(k), np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _captions(i):
  return [f'video {i} caption {j}' for j in range(3)]


def _write_msrvtt(root, train_7k=None):
  ann, videos = root / 'msrvtt_data', root / 'videos' / 'all'
  ann.mkdir(parents=True)
  videos.mkdir(parents=True)
  sentences = [dict(video_id=f'video{i}', caption=c, sen_id=10 * i + j)
               for i in VIDEOS for j, c in enumerate(_captions(i))]
  sentences.append(dict(video_id='video3', caption='   ', sen_id=99))  # empty: skipped
  sentences.reverse()  # the builder orders captions by sen_id
  (ann / msrvtt.ANNOTATIONS).write_text(json.dumps(dict(
      videos=[dict(video_id=f'video{i}', split=s, id=i) for i, (s, _) in VIDEOS.items()],
      sentences=sentences)))
  with open(ann / msrvtt.TEST_1K, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['key', 'vid_key', 'video_id', 'sentence'])
    for n, (i, sentence) in enumerate(TEST_1K.items()):
      w.writerow([f'ret{n}', f'msr{i}', f'video{i}', sentence])
  if train_7k is not None:
    (ann / msrvtt.TRAIN_LISTS['7k']).write_text(
        'video_id\n' + ''.join(f'video{i}\n' for i in train_7k))
  for i, (_, n) in VIDEOS.items():
    if i == 9:
      (videos / 'video9.mp4').write_bytes(np.random.default_rng(0).bytes(3000))
    elif i != 4:
      _write_video(videos / f'video{i}.mp4', n)


class _Records(logging.Handler):

  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope='module')
def msrvtt_build(tmp_path_factory):
  root = tmp_path_factory.mktemp('MSRVTT')
  _write_msrvtt(root, train_7k=[0, 1, 4])
  cfg = defaults.data_config()
  cfg.update(dict(builder='msrvtt', manual_dir=str(root), tokenizer='unused',
                  data_dir=str(tmp_path_factory.mktemp('tfds'))))
  cfg.msrvtt.update(dict(frames=4, image_size=32))
  records = _Records()
  logger = logging.getLogger('absl')  # the builders log through absl
  logger.addHandler(records)
  try:
    built = {}
    for train_list in ('9k', '7k'):
      cfg.msrvtt.train_list = train_list
      built[train_list] = sources.get_builder(cfg)
  finally:
    logger.removeHandler(records)
  return built, records.messages


def _read(builder, split):
  rows = sources.read(builder, split, ('frames', 'captions'), extra=('video_id',))
  return {ex['video_id'].decode(): ex for ex in rows.as_numpy_iterator()}


def test_msrvtt_builder_splits_frames_and_captions(msrvtt_build):
  built, _ = msrvtt_build
  nine = built['9k']
  # 9k without its CSV: every video outside the 1k-A test, less the missing and corrupt.
  assert sorted(_read(nine, 'train')) == ['video0', 'video1', 'video2', 'video3', 'video5']
  # 7k from its CSV (video4 of it is missing).
  assert sorted(_read(built['7k'], 'train')) == ['video0', 'video1']
  assert sorted(_read(nine, 'val')) == ['video5']
  test, full = _read(nine, 'test'), _read(nine, 'test_full')
  assert {k: [c.decode() for c in v['captions']] for k, v in test.items()} == {
      f'video{i}': [s] for i, s in TEST_1K.items()}
  assert sorted(full) == ['video6', 'video7', 'video8']
  for vid, ex in _read(nine, 'train').items():
    i = int(vid[5:])
    assert [c.decode() for c in ex['captions']] == _captions(i)  # in sen_id order
    frames = [np.asarray(Image.open(io.BytesIO(b))) for b in ex['image']]
    assert len(frames) == 4 and all(f.shape == (32, 32, 3) for f in frames)
    # Uniform sampling: the centre frame of each quarter of the video.
    got = [f.mean() for f in frames]
    want = [_grey(k) for k in frames_lib.segment_centres(VIDEOS[i][1], 4)]
    np.testing.assert_allclose(got, want, atol=4, err_msg=vid)  # frames are 12 apart
  assert nine.info.features['frames'].shape == (4, 32, 32, 3)


def test_msrvtt_builder_reports_missing_and_unreadable_videos(msrvtt_build, tmp_path):
  built, messages = msrvtt_build
  meta = built['9k'].info.metadata
  assert meta['skipped'] == {'missing': 1, 'corrupt': 1, 'empty_caption': 1}
  assert meta['skipped_examples']['missing'][0].endswith('videos/all/video4.mp4')
  assert meta['skipped_examples']['corrupt'][0].endswith('videos/all/video9.mp4')
  assert any('skipped 1 missing video files' in m and 'video4.mp4' in m for m in messages)
  assert any('skipped 1 unreadable videos' in m and 'video9.mp4' in m for m in messages)
  # Files that are absent are named before anything is built.
  with pytest.raises(FileNotFoundError, match='MSRVTT_data.json not found'):
    msrvtt.locate(tmp_path)
  (tmp_path / 'MSRVTT_data.json').write_text('{"videos": [], "sentences": []}')
  (tmp_path / 'MSRVTT_JSFUSION_test.csv').write_text('key,sentence\nret0,a\n')
  with pytest.raises(FileNotFoundError, match='No video folder'):
    msrvtt.locate(tmp_path)
  (tmp_path / 'videos').mkdir()
  with pytest.raises(ValueError, match=r"columns \['video_id', 'sentence'\]"):
    msrvtt.split_lists(msrvtt.locate(tmp_path), '9k')
  with pytest.raises(frames_lib.UnreadableVideo, match='video9.mp4'):
    frames_lib.sample_frames(meta['skipped_examples']['corrupt'][0], 4, 32)


# -- the synthetic video set --


@pytest.fixture(scope='module')
def video_data(tmp_path_factory):
  cfg = defaults.data_config()
  cfg.update(dict(builder='synthetic_video', data_dir=str(tmp_path_factory.mktemp('tfds')),
                  num_parallel_calls=2))
  cfg.synthetic_video.update(dict(train_clips=32, eval_clips=6))
  sources.get_builder(cfg)
  return cfg


def test_synthetic_video_twins_are_reversed_clips_with_opposite_captions(video_data):
  builder = sources.get_builder(video_data)
  clips = sorted(sources.read(builder, 'train', ('frames', 'captions')).as_numpy_iterator(),
                 key=lambda ex: ex['image_id'])  # tfds stores them shuffled
  assert len(clips) == 32 and all(len(c['captions']) == 3 for c in clips)
  decode = lambda ex: np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in ex['image']])
  kinds = set()
  for i in range(0, 32, 2):
    a, b = decode(clips[i]), decode(clips[i + 1])
    assert a.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(b, a[::-1])  # the twin is the clip played backwards
    assert np.abs(a[0].astype(int) - a[-1]).max() > 50  # and the clip changes in time
    ca, cb = motion.sample_clip(0, 'train', i), motion.sample_clip(0, 'train', i + 1)
    kinds.add(ca.kind)
    if ca.kind == 'move':
      assert {ca.direction, cb.direction} in ({'left', 'right'}, {'up', 'down'})
    if ca.kind == 'change':
      assert cb.colours == ca.colours[::-1]
  assert kinds == {'move', 'appear', 'change'}
  caps = motion.captions(motion.sample_clip(0, 'val', 3), 6, np.random.default_rng(0))
  assert len(set(caps)) == 6
  vocab = builder.info.metadata['vocab']
  assert pipeline.tokenizer_vocab_size(video_data) == len(vocab) < 512


def test_video_batches_share_one_crop_per_clip_and_eval_pads_clips(video_data):
  cfg = video_data.copy_and_resolve_references()
  cfg.num_frames = 2
  batch = next(pipeline.TrainIterator(cfg, image_size=16, global_batch_size=8, seed=0))
  assert batch['image'].shape == (8, 2, 16, 16, 3)
  # One crop for all frames of a clip: a clip of identical frames stays identical.
  clip = tf.constant(np.random.default_rng(0).integers(0, 255, (3, 1, 20, 20, 3)), tf.uint8)
  out = augment.batch_train_view(tf.repeat(clip, 4, axis=1), tf.constant([1, 2], tf.int64),
                                 size=12, area_range=(0.3, 0.6),
                                 aspect_ratio_range=(0.5, 2.0), flip=True).numpy()
  assert out.shape == (3, 4, 12, 12, 3)
  np.testing.assert_array_equal(out, np.repeat(out[:, :1], 4, axis=1))
  assert np.abs(out[0, 0] - out[1, 0]).max() > 1  # but clips get their own crops
  data = pipeline.eval_data(video_data, 'test', image_size=32, batch_size=4)
  assert (data.visual, data.num_images, data.num_captions) == ('video', 6, 30)
  batches = list(data.image_batches())
  assert [b['image'].shape for b in batches] == [(4, 4, 32, 32, 3)] * 2
  assert batches[1]['mask'].tolist() == [True, True, False, False]


# -- the model's video path --


def _video_model_config(temporal, frames=3):
  cfg = model_config('tiny')
  cfg.vision.image_size = 16
  cfg.vision.depth = cfg.text.depth = 1  # short compiles; depth is covered elsewhere
  cfg.video.num_frames, cfg.video.temporal = frames, temporal
  return cfg


@nnx.jit
def _encode(model, x):
  return model.encode_image(x)


def test_repeated_frame_clip_with_mean_pooling_is_the_image_embedding():
  model = CookieModel(_video_model_config('mean'), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
  clips = rng.normal(size=(4, 3, 16, 16, 3)).astype(np.float32)
  clips[:2] = images[:2, None]  # one repeated frame
  clip_emb = np.asarray(_encode(model, clips))
  np.testing.assert_allclose(clip_emb[:2], np.asarray(_encode(model, images))[:2], rtol=0,
                             atol=1e-6)
  # Mean pooling is blind to frame order; the trained temporal transformer is not.
  np.testing.assert_allclose(_encode(model, clips[:, ::-1]), clip_emb, atol=1e-6)
  video = CookieModel(_video_model_config('transformer'), rngs=nnx.Rngs(0))
  # At initialisation the temporal transformer computes exactly the mean.
  np.testing.assert_allclose(_encode(video, clips), clip_emb, atol=1e-6)
  pos = video.video.position_embeddings
  pos[...] = jnp.asarray(rng.normal(size=pos.shape), jnp.float32)
  for block in video.video.layer:
    for out in (block.output, block.attention.out):
      out.kernel[...] = jnp.asarray(rng.normal(0, 0.1, out.kernel.shape), jnp.float32)
  assert np.abs(np.asarray(_encode(video, clips[:, ::-1]))
                - np.asarray(_encode(video, clips))).max() > 1e-4
  with pytest.raises(ValueError, match='num_frames=3'):
    video.vision.layer = video.vision.layer[:0]  # (no need to run the tower to fail)
    video.encode_image(np.zeros((1, 4, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match='image model'):
    CookieModel(_video_model_config('mean', frames=0), rngs=nnx.Rngs(0)).encode_image(clips)


def _train_video(devices, mesh_sizes):
  config = default_config('tiny')
  config.model = _video_model_config('transformer', frames=2)
  config.loss.visual.weight = 0.5  # a second augmented view of every clip
  config.train.batch_size = 16
  config.mesh.update(mesh_sizes)
  validate_config(config, num_devices=len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  state, setup = step.create_train_state(config, mesh)
  train_step = step.make_train_step(config, setup)
  rng = np.random.default_rng(0)
  history = []
  for _ in range(2):
    mask = (np.arange(8)[None] < rng.integers(2, 9, size=16)[:, None]).astype(np.int32)
    batch = dict(image=rng.normal(size=(16, 2, 16, 16, 3)).astype(np.float32),
                 image_view2=rng.normal(size=(16, 2, 16, 16, 3)).astype(np.float32),
                 input_ids=(rng.integers(5, 1024, size=(16, 8)) * mask).astype(np.int32),
                 attention_mask=mask)
    state, metrics = train_step(state, sharding.to_global(mesh, batch))
    history.append(jax.device_get(metrics))
  return jax.device_get(state.params), history


@pytest.mark.slow  # two train-step compiles: about a minute on an idle 2-core machine
def test_video_train_steps_on_8_devices_equal_one_device():
  one, one_hist = _train_video(jax.devices()[:1], dict(data=1, fsdp=1, tensor=1))
  eight, hist = _train_video(jax.devices(), dict(data=2, fsdp=2, tensor=2))
  for name in ('loss', 'loss/cross_modal', 'loss/visual'):
    np.testing.assert_allclose([h[name] for h in hist], [h[name] for h in one_hist],
                               rtol=0, atol=1e-5, err_msg=name)
  np.testing.assert_allclose([h['grad_norm'] for h in hist],
                             [h['grad_norm'] for h in one_hist], rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(eight), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # The temporal transformer trained too (its residual outputs started at zero).
  assert np.abs(eight['video']['layer'][0]['output']['kernel']).max() > 1e-4


@pytest.mark.parametrize('temporal', ['mean', 'transformer'])
def test_sharded_clip_encoder_on_8_devices_equals_one_device(temporal):
  model = CookieModel(_video_model_config(temporal), rngs=nnx.Rngs(0))
  if model.video is not None:  # a trained-looking temporal transformer, not the identity
    for block in model.video.layer:
      block.output.kernel[...] = jnp.full(block.output.kernel.shape, 0.05)
  clips = np.random.default_rng(1).normal(size=(20, 3, 16, 16, 3)).astype(np.float32)
  batches = [dict(image=clips[i:i + 8], mask=np.ones(len(clips[i:i + 8]), bool))
             for i in range(0, 20, 8)]
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  got = protocol.encode_images(protocol.Weights.of(model), batches, mesh)
  one = protocol.encode_images(protocol.Weights.of(model), batches, sharding.make_mesh(
      dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
  np.testing.assert_allclose(got, one, rtol=0, atol=1e-6)
  assert got.shape == (20, 32) and np.abs(got[0] - got[1]).max() > 1e-3


# -- evaluation: the 1k-A layout --


def test_msrvtt1k_layout_on_a_hand_made_similarity_matrix():
  n = 1000
  # One caption per video; caption i scores its video 1 and r_i - 1 others 2, so its
  # text->video rank is r_i.
  ranks = np.concatenate([np.full(400, 1), np.full(300, 3), np.full(150, 8),
                          np.full(150, 20)])
  videos = np.eye(n, dtype=np.float32)
  texts = np.eye(n, dtype=np.float32)
  for i, r in enumerate(ranks):
    texts[i, (i + np.arange(1, r)) % n] = 2.0
  index = np.arange(n, dtype=np.int32)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  got = protocol.metrics_from_embeddings(videos, texts, index, mesh=mesh, layout='msrvtt1k',
                                         visual='video')
  assert (got['t2v_r1'], got['t2v_r5'], got['t2v_r10'], got['t2v_medr']) == (
      40.0, 70.0, 85.0, 3.0)
  # video -> text, counted by hand: captions scoring the video at least as high as its own.
  scores = videos @ texts.T
  v2t = 1 + np.sum((scores >= np.diag(scores)[:, None]) & ~np.eye(n, dtype=bool), axis=1)
  for k in (1, 5, 10):
    assert got[f'v2t_r{k}'] == pytest.approx(100.0 * np.mean(v2t <= k))
  assert got['v2t_medr'] == np.floor(np.median(v2t))
  assert got['rsum'] == pytest.approx(sum(got[f'{d}_r{k}'] for d in ('v2t', 't2v')
                                          for k in (1, 5, 10)))
  assert not any(key.startswith(('i2t', 't2i', 't2t')) for key in got)
  with pytest.raises(ValueError, match='exactly one caption'):
    protocol.retrieval_metrics(videos, np.concatenate([texts, texts[:1]]),
                               np.concatenate([index, [0]]), layout='msrvtt1k')


# -- fine-tuning from an image-text checkpoint, config checks, export --


def _params(model_cfg, seed):
  """Random values in the model's parameter tree (nothing to compile), and its abstract."""
  abstract = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(models.init_model(model_cfg, 0))))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return params, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


def test_image_checkpoint_initialises_a_video_model_and_real_mismatches_still_fail(
    tmp_path):
  image_cfg = default_config('tiny')
  image_cfg.model = _video_model_config('mean', frames=0)
  image_params, _ = _params(image_cfg.model, 0)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), image_cfg.checkpoint)
  ckpt.save(5, step.TrainState(step=jnp.asarray(5), params=image_params, opt_state={},
                               nonfinite_step=jnp.asarray(-1)), {}, image_cfg, force=True)
  ckpt.close()
  params, abstract = _params(_video_model_config('transformer', frames=4), 1)
  loaded, at = ckpt_lib.load_params(str(tmp_path), abstract, fallback=params)
  assert at == 5 and sorted(loaded) == sorted(params)
  for key in image_params:  # everything from the image-text run ...
    for a, b in zip(jax.tree.leaves(loaded[key]), jax.tree.leaves(image_params[key])):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(loaded['video']), jax.tree.leaves(params['video'])):
    np.testing.assert_array_equal(a, b)  # ... and the new temporal module as initialised
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="no parameter 'video/"):
    ckpt_lib.load_params(str(tmp_path), abstract)  # without a fallback: strict
  other = _video_model_config('transformer', frames=4)
  other.shared.depth = 2
  other_params, other_abstract = _params(other, 2)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match='shared/layer/1'):
    ckpt_lib.load_params(str(tmp_path), other_abstract, fallback=other_params)


def test_video_config_errors_name_the_key():
  config = default_config('tiny')
  config.data.builder = 'synthetic_video'
  with pytest.raises(ConfigError, match='model.video.num_frames=0'):
    validate_config(config)
  config.model.video.num_frames = 4
  config.model.video.temporal = 'transformer'
  config.data.num_frames = 8
  with pytest.raises(ConfigError, match='data.num_frames=8'):
    validate_config(config)
  config.model.video.temporal = 'lstm'
  with pytest.raises(ConfigError, match="model.video.temporal='lstm'"):
    validate_config(config)


def test_export_refuses_the_temporal_transformer(tmp_path):
  from cookie_jax.interop import hf_export  # pylint: disable=g-import-not-at-top
  cfg = _video_model_config('transformer')
  params, _ = _params(cfg, 0)
  with pytest.raises(ValueError, match="temporal='transformer'.*no temporal transformer"):
    hf_export.export_params(params, cfg, tmp_path / 'no')
  assert not (tmp_path / 'no').exists()


@pytest.mark.slow  # imports torch and transformers
def test_mean_video_model_exports_to_pytorch_encode_video(tmp_path):
  torch = pytest.importorskip('torch')
  from cookie_jax.interop import hf_export  # pylint: disable=g-import-not-at-top
  from cookie_jax.interop.torch_model import CookieTorchModel  # pylint: disable=g-import-not-at-top
  cfg = _video_model_config('mean')
  model = CookieModel(cfg, rngs=nnx.Rngs(0))
  hf_export.export_params(nnx.to_pure_dict(nnx.state(model)), cfg, tmp_path / 'out')
  clips = np.random.default_rng(0).normal(size=(2, 3, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    got = CookieTorchModel.from_pretrained(tmp_path / 'out').encode_video(
        torch.from_numpy(clips.transpose(0, 1, 4, 2, 3).copy())).numpy()
  np.testing.assert_allclose(got, np.asarray(model.encode_image(clips)), atol=1e-4)
  transformers = pytest.importorskip('transformers')
  auto = transformers.AutoModel.from_pretrained(tmp_path / 'out', trust_remote_code=True)
  with torch.no_grad():
    frames = torch.from_numpy(clips.transpose(0, 1, 4, 2, 3).copy())
    np.testing.assert_allclose(auto.get_video_features(frames).numpy(), got, atol=1e-6)
    np.testing.assert_allclose(auto(pixel_values=frames).image_embeds.numpy(), got, atol=1e-6)


@pytest.mark.slow  # two short training runs: several minutes on 2 cores
def test_short_video_finetune_from_an_image_run_beats_chance(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  from cookie_jax import train  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'base', pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'base.py')
  recipes = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipes)

  def small(config, steps):
    config.data.data_dir = str(tmp_path / 'tfds')
    config.data.synthetic.update(dict(train_images=2000, eval_images=200))
    config.data.synthetic_video.update(dict(train_clips=2000, eval_clips=200))
    config.train.update(dict(steps=steps, batch_size=64, progress_bar=False))
    config.optim.warmup_steps = 20
    config.eval.update(dict(every=0, batch_size=200))
    config.checkpoint.every = 0
    return config

  train.train_and_evaluate(small(recipes.get_config('demo'), 150), str(tmp_path / 'image'))
  config = small(recipes.get_config('video_demo'), 300)
  config.train.init_from = str(tmp_path / 'image')
  result = train.train_and_evaluate(config, str(tmp_path / 'video'))['test']
  # 200 clips x 5 captions: chance is R@K = K/2 % both ways (near enough), RSUM about 16.
  chance = sum(100 * (1 - np.prod(1 - 5 / np.arange(1000 - k + 1, 1001))) + k / 2
               for k in (1, 5, 10))
  print(f'synthetic video test RSUM {result["rsum"]:.1f} (chance {chance:.1f}): {result}')
  assert result['rsum'] > 4 * chance
  assert result['t2v_r10'] > 3 * 5.0 and result['v2t_r10'] > 3 * 4.9
