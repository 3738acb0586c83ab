"""Model FLOPs of a train step, counted from the architecture, and the devices' peaks.

MFU (model FLOPs utilisation) is model FLOPs per second over the hardware's peak. Model
FLOPs count the matrix multiplications the model needs, not those a particular program
does: recomputation (`model.remat`, GradCache's second forward with
`train.accum_steps > 1`) is not counted, nor are element-wise ops (norms, softmax, GELU,
the optimiser), which are a few percent of the matmul FLOPs at the `small` size and above.

Counting (a multiply-add is 2 FLOPs), per pass of B rows through a block of width W, MLP
width M, T tokens: 2·B·T·(4·W² + 2·W·M) for the projections and MLP, plus 4·B·T²·W for
the attention scores and the weighted sum of values. The backward pass costs twice the
forward (the gradients of both operands), except where an operand needs no gradient: the
pixels of the patch embedding, the fixed external partner embeddings of a loss term, and
CODER's momentum encoder and queues (forward only). Every pass is counted: the second
image view (`loss.visual.partner='augmented'`), the second, differently dropped-out text
pass (`loss.textual.partner='dropout'`), VLDeformer's composed negative images and
captions, every frame of a video clip, and the momentum encoder's keys.

The two cost levers of issue 20 are counted as the program runs them:
- **Patch dropout** (`model.vision.patch_dropout`): in training, the image blocks, the
  temporal step and the shared layers' image path run on the prefix tokens (class token,
  registers) + `keep_count(N)` patches;
  the patch embedding still embeds all N patches; evaluation keeps all.
- **Locked parameters** (`train.freeze`): `stop_gradient` before the model means autodiff
  builds only the gradients something trained needs. A stage (the patch embedding, one
  block, the shared input projection, a head) computes its weights' gradient only if it
  has trained parameters, and its input's gradient only if something below it is
  trained. So a tower locked whole runs forward only, and the trained layer above it
  computes no input gradient; a locked block above trained embeddings still passes the
  gradient down (1x its weight matmuls, 2x its attention matmuls, no weight gradient).
  A block locked in part counts as trained. The loss terms' logits take the gradient of
  the sides that need one. XLA's count of the compiled step agrees within 3% at width 512
  (tests/test_flops.py), where counting the locked towers as trained was 3-28% over.
"""

from flax import nnx
import jax

from cookie_jax.models import vit

# Dense peak FLOP/s per device as (16-bit, 32-bit) matmul rates, from the vendors' data
# sheets. 32-bit is what an f32 matmul runs at under JAX's default precision: TF32
# tensor cores on NVIDIA Ampere and later, one bf16 pass on TPUs. Matched in order
# against `device.device_kind`; the first substring that occurs wins.
PEAK_FLOPS: tuple[tuple[str, tuple[float, float]], ...] = (
    ('H100 PCIe', (756e12, 378e12)),
    ('H100', (989e12, 494e12)),          # SXM, and NVL per GPU
    ('H200', (989e12, 494e12)),
    ('A100', (312e12, 156e12)),
    ('TPU v4', (275e12, 275e12)),
    ('TPU v5 lite', (197e12, 197e12)),   # v5e
    ('TPU v5e', (197e12, 197e12)),
    ('TPU v5', (459e12, 459e12)),        # v5p
    ('TPU v6 lite', (918e12, 918e12)),   # v6e (Trillium)
    ('TPU v6e', (918e12, 918e12)),
)


def block_flops(rows: int, tokens: int, width: int, mlp_dim: int) -> int:
  """Forward matmul FLOPs of one transformer block over `rows` sequences."""
  return sum(_block_parts(rows, tokens, width, mlp_dim)[:2])


def _block_parts(rows, tokens, width, mlp_dim) -> tuple[int, int, int]:
  """(weight matmuls, attention's two activation matmuls, the query/key/value
  projections among the weight matmuls) of one block's forward pass."""
  dense = 2 * rows * tokens * (4 * width * width + 2 * width * mlp_dim)
  return dense, 4 * rows * tokens * tokens * width, 2 * rows * tokens * 3 * width * width


def image_tokens(vision_cfg, training: bool = False) -> int:
  """Class token, registers and patch tokens through the image blocks: in training
  `keep_count` of the patches under patch dropout (`model.vision.patch_dropout`), at
  evaluation all of them."""
  n = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
  rate = vision_cfg.get('patch_dropout', 0.0)
  return vit.prefix_tokens(vision_cfg) + (vit.keep_count(n, rate) if training and rate > 0
                                          else n)


# A pass is a chain of stages, bottom up: (part, kind, forward FLOPs, parameter-path
# prefixes). kind 'matmul': one weight matmul; 'block': _block_parts; None: parameters
# without matmuls (embedding tables, positions, norms), which still need their gradient.
def _shared_chain(model_cfg, rows: int, tokens: int, width: int, side: str) -> list:
  s, out = model_cfg.shared, []
  if s.depth > 0:
    out.append(('shared_in', 'matmul', 2 * rows * tokens * width * s.width,
                (f'shared/{side}_in',)))
    out.append((None, None, 0, ('shared/modality_embedding',)))
    out += [('shared_blocks', 'block', _block_parts(rows, tokens, s.width, s.mlp_dim),
             (f'shared/layer/{i}',)) for i in range(s.depth)]
    out.append((None, None, 0, (f'shared/{side}_norm', 'shared/norm')))
    width = s.width
  return out + [('head', 'matmul', 2 * rows * width * model_cfg.embed_dim,
                 (f'{side}_head',))]


def _image_chain(model_cfg, rows: int, frames: int, training: bool) -> list:
  v, video = model_cfg.vision, model_cfg.video
  seen = rows * max(frames, 1)  # images through the image tower
  tokens = image_tokens(v, training)
  n = image_tokens(v) - vit.prefix_tokens(v)  # the patch embedding sees every patch
  out = [('patch_embedding', 'matmul', 2 * seen * n * v.patch_size ** 2 * 3 * v.width,
          ('vision/patch_embeddings',)),
         (None, None, 0, ('vision/cls_token', 'vision/position_embeddings',
                          'vision/register_tokens', 'vision/pre_layernorm'))]
  out += [('vision_blocks', 'block', _block_parts(seen, tokens, v.width, v.mlp_dim),
           (f'vision/layer/{i}',)) for i in range(v.depth)]
  out.append((None, None, 0, ('vision/layernorm',)))
  if frames and video.temporal == 'transformer':
    # Attention across the frames of each token position: rows * tokens sequences.
    out.append((None, None, 0, ('video/position_embeddings',)))
    out += [('temporal_blocks', 'block',
             _block_parts(rows * tokens, frames, v.width, video.mlp_dim),
             (f'video/layer/{i}',)) for i in range(video.depth)]
  return out + _shared_chain(model_cfg, rows, tokens, v.width, 'image')


def _text_chain(model_cfg, rows: int, text_len: int) -> list:
  t = model_cfg.text
  out = [(None, None, 0, tuple(f'text/{k}' for k in ('word_embeddings', 'position_embeddings',
                                                    'token_type_embeddings',
                                                    'embeddings_norm')))]
  out += [('text_blocks', 'block', _block_parts(rows, text_len, t.width, t.mlp_dim),
           (f'text/layer/{i}',)) for i in range(t.depth)]
  return out + _shared_chain(model_cfg, rows, text_len, t.width, 'text')


def _forward(chain) -> dict[str, int]:
  out = {}
  for part, kind, f, _ in chain:
    if kind is not None:
      out[part] = out.get(part, 0) + (sum(f[:2]) if kind == 'block' else f)
  return out


def embed_image_flops(model_cfg, rows: int, frames: int = 0, training: bool = False
                      ) -> dict[str, int]:
  """Forward FLOPs of `CookieModel.embed_image` on `rows` images, or on `rows` clips of
  `frames` frames (the image tower on every frame, then the temporal step), by part;
  `training`: with the rng of a train step, i.e. under patch dropout."""
  return _forward(_image_chain(model_cfg, rows, frames, training))


def embed_text_flops(model_cfg, rows: int, text_len: int) -> dict[str, int]:
  """Forward FLOPs of `CookieModel.embed_text` on `rows` texts of `text_len` tokens
  (padding included: padded positions are computed, only masked in attention)."""
  return _forward(_text_chain(model_cfg, rows, text_len))


def _trained_fn(model_cfg, freeze):
  """prefix -> whether any parameter under it is trained (not locked by `freeze`)."""
  if not freeze:
    return lambda prefix: True
  from cookie_jax import freeze as freeze_lib  # pylint: disable=g-import-not-at-top
  from cookie_jax.models.cookie import init_model  # pylint: disable=g-import-not-at-top
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: init_model(model_cfg, 0))))
  mask = jax.tree_util.tree_leaves_with_path(freeze_lib.frozen_mask(params, freeze))
  names = [(freeze_lib.path_name(p), f) for p, f in mask]
  return lambda prefix: any(not f and (n == prefix or n.startswith(prefix + '/'))
                            for n, f in names)


def _with_backward(chain, trained) -> tuple[dict[str, int], bool]:
  """(FLOPs by part of forward + backward, whether the pass's output needs a gradient).

  A stage computes its weights' gradient if any of its parameters is trained, and its
  input's gradient if anything below it is: above a locked bottom of the graph (pixels,
  a locked tower) there is nothing to send a gradient to, and a locked bottom runs
  forward only.
  """
  out, below = {}, False
  for part, kind, f, prefixes in chain:
    own = any(trained(p) for p in prefixes)
    if kind == 'matmul':
      out[part] = out.get(part, 0) + f * (1 + own + below)
    elif kind == 'block':
      dense, attention, qkv = f
      # weights' gradient; the activations' inside the block (attention: both operands);
      # and the block input's, through the query/key/value projections.
      total = (dense + attention + own * dense + (own or below) * (dense - qkv + 2 * attention)
               + below * qkv)
      out[part] = out.get(part, 0) + total
    below = below or own
  return out, below


def info_nce_flops(batch: int, dim: int, extra: int = 0) -> int:
  """Forward FLOPs of one symmetric InfoNCE term: the B x B x dim logits, counted for
  both directions as the loss computes them, plus B x `extra` x dim against extra
  negatives."""
  return 2 * (2 * batch * batch * dim) + 2 * batch * extra * dim


def train_step_flops(config, batch_size: int | None = None,
                     text_len: int | None = None) -> dict[str, float]:
  """Model FLOPs of one train step over the global batch, by part, and their 'total'.

  Each part is forward + backward, where the backward is what autodiff needs (see
  `_with_backward`): none for CODER's momentum encoder and the queues, none for a tower
  locked whole by `train.freeze` (and no input gradient for the trained layer above it),
  the input's but not the weights' gradient for locked layers above trained ones. A block
  with some of its parameters locked counts as trained, as do the partner heads, the
  prototypes and the concept branch. Image passes run on the tokens patch dropout keeps;
  the momentum encoder, which has no rng, on all. Defaults: `config.train.batch_size` and
  `config.data.max_len`.
  """
  m, losses = config.model, config.loss
  b = config.train.batch_size if batch_size is None else batch_size
  length = config.data.max_len if text_len is None else text_len
  frames = config.data.num_frames if m.video.num_frames > 0 else 0
  hn, queue = losses.hard_negatives, losses.momentum.queue_size
  image_passes = (1 + (losses.visual.weight > 0 and losses.visual.partner == 'augmented')
                  + bool(hn.images))    # VLDeformer's composed negative images
  text_passes = (1 + (losses.textual.weight > 0 and losses.textual.partner == 'dropout')
                 + bool(hn.captions))   # and composed negative captions
  parts: dict[str, float] = {}

  def add(prefix, by_part: dict[str, int], passes: int):
    for name, f in by_part.items():
      parts[f'{prefix}/{name}'] = parts.get(f'{prefix}/{name}', 0) + passes * f

  trained = _trained_fn(m, tuple(config.train.get('freeze', ())))
  image, image_grad = _with_backward(_image_chain(m, b, frames, True), trained)
  text, text_grad = _with_backward(_text_chain(m, b, length), trained)
  add('image', image, image_passes)
  add('text', text, text_passes)
  if queue:  # CODER's momentum encoder: the keys of the batch, no gradient
    add('momentum_image', embed_image_flops(m, b, frames), 1)
    add('momentum_text', embed_text_flops(m, b, length), 1)
  parts.update(_loss_flops(config, b, image_grad, text_grad))
  parts['total'] = float(sum(parts.values()))
  return parts


def _loss_flops(config, b: int, image_grad: bool, text_grad: bool) -> dict[str, int]:
  """The loss terms' matmuls, forward + the gradient of each side that needs one."""
  m, losses, parts = config.model, config.loss, {}
  hn, queue, e = losses.hard_negatives, losses.momentum.queue_size, m.embed_dim
  times = 1 + image_grad + text_grad
  if losses.cross_modal.weight > 0 and losses.cross_modal.get('form') == 'sigmoid':
    parts['loss/cross_modal'] = times * 2 * b * b * e  # one B x B pair matrix
  elif losses.cross_modal.weight > 0:
    extra = b * (bool(hn.images) + bool(hn.captions))  # composed negatives: B per kind
    parts['loss/cross_modal'] = times * info_nce_flops(b, e, extra)
    if queue:  # B x Q logits per direction; only the query side has a gradient
      parts['loss/queue'] = 2 * 2 * (2 * b * queue * e)
  for name, side, grad in (('visual', 'image', image_grad), ('textual', 'text', text_grad)):
    term = losses[name]
    if term.weight <= 0:
      continue
    if term.partner in ('augmented', 'dropout'):
      parts[f'loss/{name}'] = (1 + 2 * grad) * info_nce_flops(b, e)
    else:
      dim = m[f'{side}_partner_dim']
      # The partner head, then logits against a fixed partner: one operand's gradient.
      parts[f'{side}/partner_head'] = 3 * 2 * b * e * dim
      parts[f'loss/{name}'] = 2 * info_nce_flops(b, dim)
  if losses.cluster.weight > 0:  # both sides' scores against the K prototypes
    parts['loss/cluster'] = 3 * 2 * (2 * b * m.num_prototypes * e)
  if losses.concept.weight > 0:
    k, w = losses.concept.num_concepts, m.text.width
    # The GCN over the K concepts, then each side's embeddings attend over them.
    gcn = 2 * k * w * e + m.concept_gcn_depth * (2 * k * e * e + 2 * k * k * e)
    parts['concept/gcn'] = 3 * gcn
    parts['loss/concept'] = 3 * (2 * 2 * (2 * b * k * e) + info_nce_flops(b, e))
  return parts


def peak_flops_per_device(dtype: str, device: jax.Device | None = None,
                          override: float = 0.0) -> float | None:
  """Peak matmul FLOP/s of one device for a compute dtype, or None when unknown (CPUs,
  unlisted accelerators). `override > 0` (config `train.peak_flops`) wins."""
  if override > 0:
    return float(override)
  device = jax.devices()[0] if device is None else device
  kind = getattr(device, 'device_kind', '')
  for name, (half, single) in PEAK_FLOPS:
    if name in kind:
      return half if dtype in ('bfloat16', 'float16') else single
  return None


def utilisation(flops_per_step: float, steps_per_sec: float, num_devices: int,
                peak: float | None) -> dict[str, float]:
  """{'tflops_per_device': model TFLOP/s per device, 'mfu': fraction of peak (if known)}."""
  per_device = flops_per_step * steps_per_sec / num_devices
  out = {'tflops_per_device': per_device / 1e12}
  if peak:
    out['mfu'] = per_device / peak
  return out
