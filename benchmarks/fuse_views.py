"""One pass per tower against one pass per view, on this host's first device.

Times forward + backward of the towers on the two views of a step (the second image
view; the second dropout pass of the captions) for a recipe's model and batch: as two
passes (`loss.fuse_views='off'`), as one pass over the interleaved views ('on',
`layers.run_views`), and, for the text tower, as one plain pass over 2B rows (the cost of
the bigger batch alone). Runs alternate between the variants; medians. Usage:

    python benchmarks/fuse_views.py [--config demo] [--runs 15]
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'configs'))

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import base as recipes
from cookie_jax.models import init_model, layers
# pylint: enable=g-import-not-at-top,wrong-import-position


def variants(config):
  """{name: jitted fwd+bwd of (params, key)}."""
  b, size, t = config.train.batch_size, config.model.vision.image_size, config.data.max_len
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(b, size, size, 3)), jnp.float32)
  view2 = jnp.asarray(rng.normal(size=(b, size, size, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(5, config.model.text.vocab_size, size=(b, t)), jnp.int32)
  mask = jnp.ones((b, t), jnp.int32)
  graphdef, params = nnx.split(init_model(config.model, 0))

  def image_two_passes(m, k):
    k1, k2 = layers.split_rng(k, 2)
    return [m.embed_image(image, rng=k1), m.embed_image(view2, rng=k2)]

  def image_one_pass(m, k):
    return layers.run_views(m.embed_image, [(image,), (view2,)], layers.split_rng(k, 2))

  def text_two_passes(m, k):
    k1, k2 = layers.split_rng(k, 2)
    return [m.embed_text(ids, mask, rng=k1), m.embed_text(ids, mask, rng=k2)]

  def text_one_pass(m, k):
    return layers.run_views(m.embed_text, [(ids, mask)] * 2, layers.split_rng(k, 2))

  def text_plain_2b_rows(m, k):
    return [m.embed_text(jnp.concatenate([ids, ids]), jnp.concatenate([mask, mask]), rng=k)]

  def jitted(embed):
    def loss(p, key):
      out = embed(nnx.merge(graphdef, p), key)
      return sum(jnp.sum(o * o[::-1]) for o in out)
    return jax.jit(jax.value_and_grad(loss))

  fns = [image_two_passes, image_one_pass, text_two_passes, text_one_pass,
         text_plain_2b_rows]
  return {f.__name__: jitted(f) for f in fns}, params


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--config', default='demo')
  p.add_argument('--runs', type=int, default=15)
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  config = recipes.get_config(args.config)
  fns, params = variants(config)
  key = jax.random.key(0)
  for f in fns.values():
    jax.block_until_ready(f(params, key))
  times = {name: [] for name in fns}
  for i in range(args.runs):
    order = list(fns.items())
    for name, f in order if i % 2 == 0 else order[::-1]:
      start = time.perf_counter()
      jax.block_until_ready(f(params, jax.random.fold_in(key, i)))
      times[name].append(time.perf_counter() - start)
  out = {'config': args.config, 'batch': config.train.batch_size,
         'device': jax.devices()[0].device_kind, 'loadavg': os.getloadavg(),
         'median_ms': {k: 1e3 * statistics.median(v) for k, v in times.items()},
         'runs_ms': {k: [1e3 * x for x in v] for k, v in times.items()}}
  print('| variant (forward + backward) | median ms | min–max ms |\n|---|---:|---:|')
  for name, v in times.items():
    print(f'| {name} | {1e3 * statistics.median(v):.1f} | '
          f'{1e3 * min(v):.1f}–{1e3 * max(v):.1f} |')
  for tower in ('image', 'text'):
    ratio = out['median_ms'][f'{tower}_one_pass'] / out['median_ms'][f'{tower}_two_passes']
    print(f'{tower}: one pass / two passes = {ratio:.2f}')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
