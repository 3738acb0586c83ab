"""The transformers text towers our `Bert` reproduces exactly, both ways.

  family         transformers class   model_type in config.json   positions
  'bert'         BertModel            bert                        0 .. T-1
  'roberta'      RobertaModel         roberta                     after the padding index
  'xlm-roberta'  XLMRobertaModel      xlm-roberta                 after the padding index

The three share BERT's blocks and tensor names (keys.bert_rules); RoBERTa and XLM-R
differ in their positions (fairseq's: counted past `pad_token_id`, padding tokens at
`pad_token_id`), their LayerNorm epsilon (1e-5 in the published checkpoints) and one
token type, which are text options of models/bert.py.

Import: `settings(hf, where)` reads a config.json into our text keys (sizes and options).
Export: `config_json(text_cfg)` writes the config.json of `text_cfg.hf_class`.
Pure Python: no torch, no transformers.
"""

from cookie_jax.errors import ConfigError
from cookie_jax.models import bert

CLASSES = {'bert': 'BertModel', 'roberta': 'RobertaModel', 'xlm-roberta': 'XLMRobertaModel'}
FAMILY_OF_CLASS = {c: f for f, c in CLASSES.items()}
_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
             hidden_act='gelu', layer_norm_eps=1e-12, position_embedding_type='absolute')
# What each class's config takes when its config.json leaves a field out.
DEFAULTS = {'bert': dict(_BASE, pad_token_id=0),
            'roberta': dict(_BASE, vocab_size=50265, pad_token_id=1),
            'xlm-roberta': dict(_BASE, vocab_size=30522, pad_token_id=1)}
# Our size key -> the config.json field it is read from.
SIZE_FIELDS = dict(vocab_size='vocab_size', width='hidden_size', depth='num_hidden_layers',
                   heads='num_attention_heads', mlp_dim='intermediate_size',
                   max_positions='max_position_embeddings', type_vocab_size='type_vocab_size')
# Our option key -> the config.json field it comes from ('' = from the class).
OPTION_FIELDS = dict(positions='model_type', pad_token_id='pad_token_id',
                     layer_norm_eps='layer_norm_eps', hf_class='model_type')


def family_of(hf: dict) -> str | None:
  """The family of a config.json (None: not a text tower we know)."""
  found = hf.get('model_type')
  return found if found in CLASSES else None


def _refuse(where, field, value, supported):
  raise ConfigError(f'{where}: config.json has {field}={value!r}; the text tower computes '
                    f'{supported} only, so this checkpoint cannot be imported exactly. Use '
                    'a checkpoint with that setting.')


def settings(hf_file: dict, where: str) -> tuple[str, dict]:
  """(family, {text key: value}) of a config.json: every size and option."""
  fam = family_of(hf_file)
  hf = dict(DEFAULTS[fam], **{k: v for k, v in hf_file.items() if v is not None})
  if hf['hidden_act'] != 'gelu':
    _refuse(where, 'hidden_act', hf['hidden_act'], "the exact erf GELU ('gelu')")
  if hf['position_embedding_type'] != 'absolute':
    _refuse(where, 'position_embedding_type', hf['position_embedding_type'],
            "absolute learned positions ('absolute')")
  for field in ('is_decoder', 'add_cross_attention'):
    if hf.get(field):
      _refuse(where, field, True, f'a bidirectional encoder ({field}=False)')
  out = {ours: int(hf[field]) for ours, field in SIZE_FIELDS.items()}
  positions = 'absolute' if fam == 'bert' else 'after_padding'
  pad = int(hf['pad_token_id'])
  if positions == 'after_padding' and not 0 <= pad < out['max_positions'] - 1:
    _refuse(where, 'pad_token_id', pad, f'positions past a padding index below '
            f'max_position_embeddings - 1 = {out["max_positions"] - 1}')
  # BERT's pad id is not part of its computation: the default keeps today's tower.
  out.update(positions=positions,
             pad_token_id=pad if positions == 'after_padding' else bert.OPTIONS['pad_token_id'],
             layer_norm_eps=float(hf['layer_norm_eps']), hf_class=CLASSES[fam])
  return fam, out


def family(text_cfg) -> str:
  """The family an export writes, checked against the positions it computes."""
  o = bert.options(text_cfg)
  fam = FAMILY_OF_CLASS.get(o['hf_class'])
  if fam is None or bert.HF_CLASSES[o['hf_class']] != o['positions']:
    raise ConfigError(
        f"config.model.text.hf_class={o['hf_class']!r} with positions={o['positions']!r} "
        f'is none of the transformers text towers {bert.HF_CLASSES} (class: positions), '
        'so it cannot be exported to one exactly.')
  return fam


def config_json(text_cfg, *, pad_token_id: int = 0) -> dict:
  """config.json of `text_cfg.hf_class` with our text tower's sizes; `pad_token_id` is
  written for a BertModel (the tokenizer's, which BERT's computation does not use), the
  tower's own for RoBERTa and XLM-R (their positions count past it)."""
  fam, t, o = family(text_cfg), text_cfg, bert.options(text_cfg)
  out = dict(
      architectures=[CLASSES[fam]], model_type=fam, vocab_size=t.vocab_size,
      hidden_size=t.width, num_hidden_layers=t.depth, num_attention_heads=t.heads,
      intermediate_size=t.mlp_dim, hidden_act='gelu', hidden_dropout_prob=t.dropout,
      attention_probs_dropout_prob=t.attention_dropout, max_position_embeddings=t.max_positions,
      type_vocab_size=t.type_vocab_size, initializer_range=0.02,
      layer_norm_eps=float(o['layer_norm_eps']), pad_token_id=pad_token_id,
      position_embedding_type='absolute', dtype='float32')
  if fam != 'bert':
    out.update(pad_token_id=int(o['pad_token_id']), bos_token_id=0, eos_token_id=2)
  return out
