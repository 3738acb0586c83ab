"""Retrieval cost of our dual encoder against a single-stream (joint) scorer, same layers.

COOKIE argues that encoding each side once and ranking by dot products is orders of
magnitude cheaper than single-stream models, which must run a transformer over every
(image, caption) pair (the paper quotes about 3/1000 of the time). Here both are built
from the same CookieModel:

* dual: encode every image and every caption once (towers + shared transformer + head),
  then rank both directions with `cookie_jax.eval.protocol.retrieval_metrics` (exact blockwise
  ranks; we time the ranking on random embeddings of the gallery's size).
* single-stream: for every pair, concatenate the image's and the caption's tower tokens
  (projected by the shared transformer's `image_in` / `text_in`, plus the modality
  vectors), run the shared layers over the joint sequence and score the first token
  with a linear head. We charge only these per-pair layers, not the towers, so the
  single-stream time is a lower bound and our ratio an upper bound: a real single-stream
  model runs all of its layers jointly.

Per-item times are medians over `--runs` jitted batched calls after a warm-up; the
gallery totals (Flickr30K 1K: 1000 images x 5000 captions; COCO 5K: 5000 x 25000) are
per-item time x count. Usage:

    python benchmarks/dual_vs_single_stream.py [--preset small] [--runs 3] [--json out]
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from cookie_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from cookie_jax.eval import protocol  # pylint: disable=g-import-not-at-top,wrong-import-position
from cookie_jax.config import default_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from cookie_jax.models import layers  # pylint: disable=g-import-not-at-top,wrong-import-position
from cookie_jax.models.shared import IMAGE, TEXT  # pylint: disable=g-import-not-at-top,wrong-import-position

GALLERIES = {'flickr30k_1k': (1000, 5000), 'coco_5k': (5000, 25000)}


class JointHead(nnx.Module):
  """The single-stream baseline's scorer: a linear map of the joint first token."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.score = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x):
    return self.score(x[:, 0])[:, 0]


def joint_scores(model, head: JointHead, image_tokens, text_tokens, text_mask):
  """Scores of P (image, caption) pairs through the shared layers over the joint sequence.

  image_tokens: [P, Ti, vision width] and text_tokens: [P, Tt, text width] tower outputs.
  """
  shared = model.shared
  xi = shared.image_in(image_tokens).astype(jnp.float32)
  xt = shared.text_in(text_tokens).astype(jnp.float32)
  if shared.modality_embedding is not None:
    xi = xi + shared.modality_embedding[IMAGE]
    xt = xt + shared.modality_embedding[TEXT]
  x = jnp.concatenate([xi, xt], axis=1)
  mask = jnp.concatenate([jnp.ones(xi.shape[:2], bool), text_mask.astype(bool)], axis=1)
  x = layers.run_blocks(shared.layer, x, mask, None, remat=False)
  x = shared.image_norm(x) if shared.modality_layernorm else shared.norm(x)
  return head(x)


def per_item_seconds(fn, args, items: int, runs: int) -> tuple[float, list[float]]:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) / items, [t / items for t in times]


def measure(preset: str, args) -> dict:
  config = default_config(preset)
  if config.model.shared.depth == 0:
    raise ValueError(f'Preset {preset!r} has no shared transformer to build the joint '
                     'scorer from; use tiny, small, base or large.')
  image_size = config.model.vision.image_size
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.init_model(config.model, 0)))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(models.init_model(config.model, 0))))()
  head = JointHead(config.model.shared.width, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(args.image_batch, image_size, image_size, 3)),
                       jnp.float32)
  ids = jnp.asarray(rng.integers(5, 1000, size=(args.text_batch, args.text_len)), jnp.int32)
  att = jnp.ones_like(ids)

  encode_image = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x))
  encode_text = jax.jit(lambda p, i, m: nnx.merge(graphdef, p).encode_text(i, m))
  t_img, img_runs = per_item_seconds(encode_image, (params, images), args.image_batch,
                                     args.runs)
  t_txt, txt_runs = per_item_seconds(encode_text, (params, ids, att), args.text_batch,
                                     args.runs)

  towers = jax.jit(lambda p, x, i, m: (nnx.merge(graphdef, p).vision(x),
                                       nnx.merge(graphdef, p).text(i, m)))
  pairs = args.pair_batch
  img_tok, txt_tok = towers(params, images[:1], ids[:1], att[:1])
  img_tok = jnp.repeat(img_tok, pairs, axis=0)
  txt_tok, txt_mask = jnp.repeat(txt_tok, pairs, axis=0), jnp.repeat(att[:1], pairs, 0)
  head_def, head_params = nnx.split(head)
  score_pairs = jax.jit(lambda p, hp, a, b, m: joint_scores(
      nnx.merge(graphdef, p), nnx.merge(head_def, hp), a, b, m))
  t_pair, pair_runs = per_item_seconds(score_pairs,
                                       (params, head_params, img_tok, txt_tok, txt_mask),
                                       pairs, args.runs)

  out = {'preset': preset, 'image_size': image_size, 'text_len': args.text_len,
         'joint_tokens': int(img_tok.shape[1] + txt_tok.shape[1]),
         'seconds_per_image': t_img, 'seconds_per_caption': t_txt,
         'seconds_per_pair': t_pair,
         'per_item_min_max': {'image': [min(img_runs), max(img_runs)],
                              'caption': [min(txt_runs), max(txt_runs)],
                              'pair': [min(pair_runs), max(pair_runs)]}}
  dim = config.model.embed_dim
  for name, (n_img, n_txt) in GALLERIES.items():
    emb_i = rng.normal(size=(n_img, dim)).astype(np.float32)
    emb_t = rng.normal(size=(n_txt, dim)).astype(np.float32)
    index = np.arange(n_txt) % n_img
    t_rank, _ = per_item_seconds(
        lambda: protocol.retrieval_metrics(emb_i, emb_t, index), (), 1, args.runs)
    dual = n_img * t_img + n_txt * t_txt + t_rank
    single = n_img * n_txt * t_pair
    out[name] = {'images': n_img, 'captions': n_txt, 'rank_seconds': t_rank,
                 'dual_seconds': dual, 'single_stream_seconds_lower_bound': single,
                 'dual_over_single': dual / single}
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='small')
  p.add_argument('--runs', type=int, default=3)
  p.add_argument('--image-batch', type=int, default=8)
  p.add_argument('--text-batch', type=int, default=64)
  p.add_argument('--pair-batch', type=int, default=16)
  p.add_argument('--text-len', type=int, default=32)
  p.add_argument('--json', default='')
  args = p.parse_args()
  env = {'nproc': os.cpu_count(), 'jax': jax.__version__,
         'devices': len(jax.devices()), 'loadavg_start': os.getloadavg()}
  result = measure(args.preset, args)
  env['loadavg_end'] = os.getloadavg()
  print(json.dumps({'environment': env, 'result': result}, indent=1))
  for name in GALLERIES:
    r = result[name]
    print(f"{args.preset} {name}: dual {r['dual_seconds']:.1f} s, single-stream >= "
          f"{r['single_stream_seconds_lower_bound']:.0f} s, ratio <= "
          f"{r['dual_over_single']:.2e} ({1000 * r['dual_over_single']:.2f}/1000)")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'environment': env, 'result': result}, f, indent=1)


if __name__ == '__main__':
  main()
