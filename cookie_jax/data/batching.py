"""What training and evaluation input share: the tokenizer, and who holds which rows."""

import jax
from tokenizers import Tokenizer

from cookie_jax.data import sources
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.data.defaults import OWN_VOCAB_BUILDERS, SYNTHETIC_VOCAB
from cookie_jax.data.tf_env import tf


def load_tokenizer(data_cfg) -> Tokenizer:
  """BERT WordPiece: [CLS] text [SEP], truncated and padded to `data_cfg.max_len`."""
  if data_cfg.tokenizer == SYNTHETIC_VOCAB:
    image_set = data_cfg.copy_and_resolve_references()
    image_set.builder = 'synthetic'
    tok = tok_lib.wordpiece_tokenizer(sources.get_builder(image_set).info.metadata['vocab'])
  elif data_cfg.tokenizer:
    tok = tok_lib.tokenizer_from_path(data_cfg.tokenizer, lowercase=data_cfg.lowercase)
  elif data_cfg.builder in OWN_VOCAB_BUILDERS:
    tok = tok_lib.wordpiece_tokenizer(sources.get_builder(data_cfg).info.metadata['vocab'])
  else:
    raise ValueError(
        f"config.data.tokenizer='': only the synthetic datasets ship their own vocabulary; "
        f'builder={data_cfg.builder!r} needs a folder (local or gs://...) with '
        'tokenizer.json or vocab.txt (e.g. bert-base-uncased).')
  return tok_lib.finalize(tok, data_cfg.max_len)


def processes(process_index, process_count):
  pc = jax.process_count() if process_count is None else process_count
  pi = jax.process_index() if process_index is None else process_index
  if not 0 <= pi < pc:
    raise ValueError(f'process_index={pi} is outside [0, {pc}).')
  return pi, pc


def local_batch(global_batch, pc, key):
  if global_batch % pc:
    raise ValueError(f'{key}={global_batch} must be divisible by the {pc} processes; '
                     f'use a multiple of {pc}.')
  return global_batch // pc


def tokenize_batch(tokenizer: Tokenizer, length: int):
  """A tf.data map that tokenizes a batch's `caption`s in one Rust call."""

  def encode(captions):
    texts = [c.decode('utf-8', errors='replace') for c in captions]
    out = tok_lib.encode(tokenizer, texts)
    return out['input_ids'], out['attention_mask']

  def fn(batch):
    batch = dict(batch)
    ids, mask = tf.numpy_function(encode, [batch.pop('caption')], [tf.int32, tf.int32],
                                  stateful=False)
    batch['input_ids'] = tf.ensure_shape(ids, [None, length])
    batch['attention_mask'] = tf.ensure_shape(mask, [None, length])
    return batch

  return fn


def autotune(n):
  return tf.data.AUTOTUNE if n == -1 else n
