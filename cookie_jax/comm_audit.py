"""Bytes moved by the collectives of a compiled train step (and of the evaluation
encoders, `encoder_audit`), against the FSDP ideal.

Nothing runs and nothing is allocated: the step is lowered for abstract arrays (shapes,
dtypes and shardings) and compiled, and two modules of the compile are read. A collective
inside a loop counts once per iteration (XLA's `known_trip_count`).

* `partitioned`, the count that is compared with the ideal: the module after SPMD
  partitioning and the collective passes, just before the backend's
  `float-normalization-bf16` pass (dumped with `xla_dump_hlo_pass_re`). Its collectives
  carry the dtypes the program asks for: bf16 weights are gathered in bf16.
* `optimised`: the final HLO. On CPU, `float-normalization-bf16` rewrites every bf16
  collective to fp32 (the CPU runtime has no bf16 collectives), which doubles the
  gathered weight bytes; GPU and TPU keep them in bf16. Both are reported.

Bytes are per device and count the whole array a collective produces or consumes: an
all-gather's result, a reduce-scatter's operand (its result times the group), an
all-reduce's, all-to-all's or collective-permute's operand. (These are array bytes, not
wire bytes: a ring all-reduce sends about twice what a reduce-scatter of the same operand
sends.) The ideal, in the same units:

* every parameter sharded over `fsdp` is gathered once for the forward pass, twice with
  `model.remat` (the backward pass recomputes the forward), in the compute dtype;
* every gradient of such a parameter is reduce-scattered once, in fp32, and over the
  `data` axis its 1/fsdp shard is all-reduced;
* gradients of replicated parameters are all-reduced once, in fp32, over all batch shards;
* each contrastive term all-gathers its two [B_local, D] embeddings to [B, D] (fp32),
  and its backward reduce-scatters their gradients: 2 * terms * B * D * 4 bytes each way;
* a few scalars (loss sums, the gradient norm) are all-reduced: counted as measured.
"""

import collections
import glob
import math
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import ml_collections

from cookie_jax import sharding, step as step_lib

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all',
               'collective-permute')
DTYPE_BYTES = {'f64': 8, 'f32': 4, 'bf16': 2, 'f16': 2, 's64': 8, 'u64': 8, 's32': 4, 'u32': 4,
          's16': 2, 'u16': 2, 's8': 1, 'u8': 1, 'pred': 1}
_OP = re.compile(r'^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+(' + '|'.join(COLLECTIVES) +
                 r')(-start)?\(')
SHAPE = re.compile(r'\b(' + '|'.join(DTYPE_BYTES) + r')\[([\d,]*)\]')
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%(\S+)\s.*\{\s*$')
_WHILE = re.compile(r'\bwhile\(.*?body=%([\w.\-]+)')
TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
SMALL = 1024  # all-reduces of at most this many bytes are the scalars
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(?:\(.*?\)|\S+)\s+([\w\-]+)\((.*)$')
_NAME = re.compile(r'%([\w.\-]+)')
_PASS_THROUGH = ('convert', 'bitcast', 'copy', 'reshape')


def shape_bytes(text: str) -> list[int]:
  """The bytes of each array shape written in `text` (an HLO type, e.g. a tuple)."""
  return [DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(',') if x)
          for d, dims in SHAPE.findall(text)]


def _group_size(line: str, num_devices: int) -> int:
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line)
  if m:
    return int(m.group(2))
  # mesh['a'=4,'b'=2] {'a'}, possibly with device_ids=(...) between: the named axes.
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
  m = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
  if m:
    return len(m.group(1).split(','))
  return num_devices


def _multipliers(lines) -> dict[str, int]:
  """How many times each computation runs per step: ENTRY once, while bodies per trip."""
  calls = []  # (caller, body, trips)
  current = None
  for line in lines:
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      continue
    w = _WHILE.search(line)
    if w and current:
      trips = TRIPS.search(line)
      calls.append((current, w.group(1), int(trips.group(1)) if trips else 1))
  times = collections.defaultdict(lambda: 1)
  for _ in range(len(calls) + 1):  # propagate through nesting
    for caller, body, trips in calls:
      times[body] = times[caller] * trips
  return times


def _users(lines) -> dict[str, list[tuple[str, str]]]:
  """{instruction: [(user, user's opcode)]} over the module (names are module-unique)."""
  users = collections.defaultdict(list)
  for line in lines:
    m = _INSTRUCTION.match(line)
    if m:
      name, opcode, operands = m.groups()
      for operand in set(_NAME.findall(operands.split(', metadata=')[0])):
        users[operand].append((name, opcode))
  return users


def _only_sliced(name: str, users) -> bool:
  """Whether every use of `name`, through converts, bitcasts, copies and reshapes, is a
  dynamic-slice: an all-reduce whose result each device slices to its own shard."""
  seen = users.get(name, [])
  return bool(seen) and all(
      opcode == 'dynamic-slice' or (opcode in _PASS_THROUGH and _only_sliced(u, users))
      for u, opcode in seen)


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, dict]:
  """{kind: {'count', 'bytes', 'small_bytes', 'sliced_bytes'}} per device per step.

  `sliced_bytes` (all-reduces only): those whose result is only dynamic-sliced to the
  device's shard. That pair is a reduce-scatter in all but name; the GPU and TPU
  pipelines rewrite it into one, the CPU pipeline does not."""
  lines = hlo_text.splitlines()
  times, users = _multipliers(lines), _users(lines)
  out = {k: {'count': 0, 'bytes': 0, 'small_bytes': 0, 'sliced_bytes': 0}
         for k in COLLECTIVES}
  current = None
  for line in lines:
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      continue
    op = _OP.match(line)
    if not op:
      continue
    kind, shapes = op.group(2), shape_bytes(op.group(1))
    size = shapes[-1] if op.group(3) else sum(shapes)  # -start: (operand, result)
    if kind == 'reduce-scatter':
      size *= _group_size(line, num_devices)
    n = times[current] if current else 1
    out[kind]['count'] += n
    out[kind]['bytes'] += n * size
    if size <= SMALL:
      out[kind]['small_bytes'] += n * size
    elif kind == 'all-reduce' and not op.group(3) and _only_sliced(
        _INSTRUCTION.match(line).group(1), users):
      out[kind]['sliced_bytes'] += n * size
  return out


def abstract_inputs(config: ml_collections.ConfigDict, mesh):
  """(abstract TrainState with shardings, abstract batch, Setup) of `config`."""
  _, abstract, setup = step_lib.train_state_setup(config, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract, setup.state_shardings)
  b, size, t = (config.train.batch_size, config.model.vision.image_size,
                config.data.max_len)
  spec = sharding.batch_sharding(mesh)
  image = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=spec)
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec)
  batch = {'image': image, 'input_ids': tokens, 'attention_mask': tokens}
  if config.loss.visual.weight > 0 and config.loss.visual.partner == 'augmented':
    batch['image_view2'] = image
  return state, batch, setup


PARTITIONED_BEFORE = 'float-normalization-bf16'  # the first pass that changes dtypes


def _hlos(lowered, name: str) -> dict[str, str | None]:
  """{'partitioned', 'optimised'} HLO texts of compiling `lowered` (a jit named `name`)."""
  with tempfile.TemporaryDirectory() as tmp:
    compiled = lowered.compile(compiler_options={
        'xla_dump_to': tmp, 'xla_dump_hlo_pass_re': PARTITIONED_BEFORE})
    dumps = sorted(glob.glob(os.path.join(
        tmp, f'*jit_{name}*.before_{PARTITIONED_BEFORE}.txt')))
    partitioned = None
    if dumps:  # the first run of the pass: the one right after partitioning
      with open(dumps[0], encoding='utf-8') as f:
        partitioned = f.read()
  return {'partitioned': partitioned, 'optimised': compiled.as_text()}


def compiled_hlos(config: ml_collections.ConfigDict, mesh) -> dict[str, str | None]:
  """{'partitioned': HLO text before `PARTITIONED_BEFORE` (None if the backend has no such
  pass), 'optimised': the final HLO text} of the train step of `config` over `mesh`."""
  state, batch, setup = abstract_inputs(config, mesh)
  step = step_lib.make_train_step(config, setup)
  return _hlos(step.lower(state, batch), 'train_step')


def encoder_audit(config: ml_collections.ConfigDict, mesh,
                  batch_size: int | None = None) -> dict[str, dict]:
  """{'image', 'text': collective rows (as `collective_bytes`) of the evaluation
  encoders (`eval.protocol`) over `mesh` for a batch of `batch_size` (default
  `eval.batch_size`), counted in the partitioned module, plus 'ideal': the bytes of
  gathering every FSDP-sharded parameter once in the compute dtype, which bounds what
  either side should move (inference gathers each of its weights once and reduces
  nothing but the output)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from cookie_jax.eval import protocol  # pylint: disable=g-import-not-at-top
  from cookie_jax.models import abstract_model  # pylint: disable=g-import-not-at-top
  out = {}
  for side in ('image', 'text'):
    encoder, args = protocol.abstract_encoder(config, mesh, side, batch_size)
    hlos = _hlos(encoder.lower(*args), 'encode')
    text = hlos['partitioned'] or hlos['optimised']
    out[side] = collective_bytes(text, mesh.devices.size)
  _, abstract = abstract_model(config.model)
  shardings = sharding.param_shardings(abstract, mesh)
  fsdp = mesh.shape.get('fsdp', 1)
  sharded, _ = _param_counts(jax.tree.leaves(nnx.to_pure_dict(abstract)),
                             jax.tree.leaves(shardings), fsdp)
  out['ideal'] = sharded * jnp.dtype(config.model.dtype).itemsize
  return out


def _param_counts(leaves, shardings, fsdp: int) -> tuple[int, int]:
  """(parameters sharded over `fsdp`, replicated parameters)."""
  sharded = replicated = 0
  for x, s in zip(leaves, shardings):
    if fsdp > 1 and any('fsdp' in (a if isinstance(a, tuple) else (a,))
                        for a in s.spec if a):
      sharded += x.size
    else:
      replicated += x.size
  return sharded, replicated


def contrastive_terms(config: ml_collections.ConfigDict) -> int:
  return sum(config.loss[n].weight > 0 for n in ('cross_modal', 'visual', 'textual'))


def fsdp_ideal(config: ml_collections.ConfigDict, mesh, setup=None) -> dict[str, int]:
  """The ideal bytes per device per step of each collective (see the module doc)."""
  if setup is None:
    _, _, setup = step_lib.train_state_setup(config, mesh)
  _, abstract, _ = step_lib.train_state_setup(config, mesh)
  fsdp, data = mesh.shape['fsdp'], mesh.shape['data']
  compute = jnp.dtype(config.model.dtype).itemsize
  sharded, replicated = _param_counts(jax.tree.leaves(abstract.params),
                                      jax.tree.leaves(setup.state_shardings.params), fsdp)
  # Full remat gathers each weight again for the recomputed forward; a policy that keeps
  # the dense layers' outputs ('dots', 'all_dots') recomputes no matmul with a weight.
  passes = 2 if config.model.remat and config.model.get('remat_policy', 'full') == 'full' else 1
  emb = 2 * contrastive_terms(config) * config.train.batch_size * config.model.embed_dim * 4
  batch_shards = data * fsdp
  return {
      'all-gather': passes * sharded * compute + (emb if batch_shards > 1 else 0),
      'reduce-scatter': (sharded * 4 + emb) if fsdp > 1 else 0,
      'all-reduce': ((replicated * 4 if batch_shards > 1 else 0)
                     + (sharded * 4 // fsdp if data > 1 and fsdp > 1 else 0)
                     + (sharded * 4 if data > 1 and fsdp == 1 else 0)),
      'all-to-all': 0,
      'collective-permute': 0,
  }


def audit(config: ml_collections.ConfigDict, mesh,
          hlos: dict[str, str | None] | None = None) -> dict:
  """Measured against ideal bytes per collective; `ratio` is measured / ideal overall,
  the all-reduced scalars left out of both.

  `hlos` is what `compiled_hlos` returns (compiled here when None). The top-level `rows`,
  `bytes` and `ratio` count the `partitioned` module (the `optimised` one where there is
  none, named by `counted`); `optimised` holds the same three for the final HLO."""
  hlos = compiled_hlos(config, mesh) if hlos is None else hlos
  ideal = fsdp_ideal(config, mesh)
  total_ideal = sum(ideal.values())

  def compare(text):
    measured = collective_bytes(text, mesh.devices.size)
    rows = {k: dict(measured[k], ideal=ideal[k]) for k in COLLECTIVES}
    total = sum(r['bytes'] - r['small_bytes'] for r in rows.values())
    return {'rows': rows, 'bytes': total,
            'ratio': total / total_ideal if total_ideal else float('nan')}

  counted = 'partitioned' if hlos.get('partitioned') else 'optimised'
  return {'mesh': dict(mesh.shape), 'ideal': total_ideal, 'counted': counted,
          **compare(hlos[counted]), 'optimised': compare(hlos['optimised'])}
