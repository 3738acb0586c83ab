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
"""

import jax

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
  dense = 2 * rows * tokens * (4 * width * width + 2 * width * mlp_dim)
  attention = 4 * rows * tokens * tokens * width
  return dense + attention


def image_tokens(vision_cfg) -> int:
  return (vision_cfg.image_size // vision_cfg.patch_size) ** 2 + 1


def _shared_and_head(model_cfg, rows: int, tokens: int, width: int) -> dict[str, int]:
  """Forward FLOPs after a tower of `width`: the weight-sharing transformer (with its
  input projection) and the embedding head."""
  s, out = model_cfg.shared, {}
  if s.depth > 0:
    out['shared_in'] = 2 * rows * tokens * width * s.width
    out['shared_blocks'] = s.depth * block_flops(rows, tokens, s.width, s.mlp_dim)
    width = s.width
  out['head'] = 2 * rows * width * model_cfg.embed_dim
  return out


def embed_image_flops(model_cfg, rows: int, frames: int = 0) -> dict[str, int]:
  """Forward FLOPs of `CookieModel.embed_image` on `rows` images, or on `rows` clips of
  `frames` frames (the image tower on every frame, then the temporal step), by part."""
  v = model_cfg.vision
  tokens = image_tokens(v)
  seen = rows * max(frames, 1)  # images through the image tower
  out = {'patch_embedding': 2 * seen * (tokens - 1) * v.patch_size ** 2 * 3 * v.width,
         'vision_blocks': v.depth * block_flops(seen, tokens, v.width, v.mlp_dim)}
  video = model_cfg.video
  if frames and video.temporal == 'transformer':
    # Attention across the frames of each token position: rows * tokens sequences.
    out['temporal_blocks'] = video.depth * block_flops(rows * tokens, frames, v.width,
                                                       video.mlp_dim)
  return out | _shared_and_head(model_cfg, rows, tokens, v.width)


def embed_text_flops(model_cfg, rows: int, text_len: int) -> dict[str, int]:
  """Forward FLOPs of `CookieModel.embed_text` on `rows` texts of `text_len` tokens
  (padding included: padded positions are computed, only masked in attention)."""
  t = model_cfg.text
  out = {'text_blocks': t.depth * block_flops(rows, text_len, t.width, t.mlp_dim)}
  return out | _shared_and_head(model_cfg, rows, text_len, t.width)


def info_nce_flops(batch: int, dim: int, extra: int = 0) -> int:
  """Forward FLOPs of one symmetric InfoNCE term: the B x B x dim logits, counted for
  both directions as the loss computes them, plus B x `extra` x dim against extra
  negatives."""
  return 2 * (2 * batch * batch * dim) + 2 * batch * extra * dim


def train_step_flops(config, batch_size: int | None = None,
                     text_len: int | None = None) -> dict[str, float]:
  """Model FLOPs of one train step over the global batch, by part, and their 'total'.

  Each part is forward + backward, or forward only where nothing needs its gradient
  (CODER's momentum encoder, the queues). Defaults: `config.train.batch_size` and
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

  def add(prefix, forward: dict[str, int], passes: int, backward: bool = True):
    for name, f in forward.items():
      # Backward costs twice the forward (both operands' gradients), except the patch
      # embedding's: the pixels need no gradient.
      times = 1 + (1 if name == 'patch_embedding' else 2) * backward
      key = f'{prefix}/{name}'
      parts[key] = parts.get(key, 0) + times * passes * f

  add('image', embed_image_flops(m, b, frames), image_passes)
  add('text', embed_text_flops(m, b, length), text_passes)
  if queue:  # CODER's momentum encoder: the keys of the batch, no gradient
    add('momentum_image', embed_image_flops(m, b, frames), 1, backward=False)
    add('momentum_text', embed_text_flops(m, b, length), 1, backward=False)
  e = m.embed_dim
  if losses.cross_modal.weight > 0:
    extra = b * (bool(hn.images) + bool(hn.captions))  # composed negatives: B per kind
    parts['loss/cross_modal'] = 3 * info_nce_flops(b, e, extra)
    if queue:  # B x Q logits per direction; only the query side has a gradient
      parts['loss/queue'] = 2 * 2 * (2 * b * queue * e)
  for name, side in (('visual', 'image'), ('textual', 'text')):
    term = losses[name]
    if term.weight <= 0:
      continue
    if term.partner in ('augmented', 'dropout'):
      parts[f'loss/{name}'] = 3 * info_nce_flops(b, e)
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
  parts['total'] = float(sum(parts.values()))
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
