"""Tokenisation with Hugging Face `tokenizers` (the Rust "fast" tokenizer): BERT's
WordPiece ([CLS] text [SEP], [PAD]), or a RoBERTa / XLM-R tokenizer.json (<s> text </s>,
<pad>), whichever special tokens the vocabulary has.

Everything is read from files, local or gs:// (through `etils.epath`): a directory
holding `tokenizer.json` or `vocab.txt`, or either file itself; a Hugging Face Hub id
(`owner/name`, cookie_jax/hub.py) is fetched into the Hub cache (only read from it with
HF_HUB_OFFLINE=1). For the synthetic dataset a vocabulary is trained at build time and
shipped in the dataset's metadata, so the default config runs with no download at all.
"""

import collections
import json
import os
from typing import Iterable, Sequence

from absl import logging
from etils import epath
import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from cookie_jax import files, hub
from cookie_jax.errors import TokenizerMismatchError  # pylint: disable=unused-import

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
# The special tokens of each style, by their transformers names.
SPECIALS = {
    'bert': dict(unk_token='[UNK]', sep_token='[SEP]', pad_token='[PAD]', cls_token='[CLS]',
                 mask_token='[MASK]'),
    # RoBERTa (byte-level BPE) and XLM-R (SentencePiece): <s> first, </s> last.
    'roberta': dict(unk_token='<unk>', sep_token='</s>', pad_token='<pad>', cls_token='<s>',
                    mask_token='<mask>'),
}


def special_style(vocab: dict) -> str:
  """'bert' or 'roberta': the style whose [CLS]/[SEP]/[PAD] (or <s>/</s>/<pad>) the
  vocabulary has ('' for neither); BERT's first, as before RoBERTa's were known."""
  for style, sp in SPECIALS.items():
    if all(sp[k] in vocab for k in ('pad_token', 'cls_token', 'sep_token')):
      return style
  return ''


def _word_counts(texts: Iterable[str]) -> collections.Counter:
  """Words as BERT's normaliser and pre-tokeniser split them (the pipeline's own steps)."""
  normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                          strip_accents=None, lowercase=True)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  words = collections.Counter()
  for text, n in collections.Counter(texts).items():  # each distinct caption once
    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
      words[word] += n
  return words


def _merge(symbols: list, pair: tuple, token: str) -> list:
  out, i = [], 0
  while i < len(symbols):
    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
      out.append(token)
      i += 2
    else:
      out.append(symbols[i])
      i += 1
  return out


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> list[str]:
  """A lowercase WordPiece vocabulary (tokens in id order, specials first) from `texts`.

  The algorithm of Hugging Face's WordPiece trainer (BPE merges over words split into
  characters, non-initial ones prefixed '##'), written out so that it is deterministic:
  that trainer breaks ties between equally frequent pairs by hash-map order, which is
  seeded anew in every process, so the same captions gave a different vocabulary on
  every build. Here the input order does not matter (words are counted), and ties go to
  the merged token that sorts first, then to the pair. The vocabulary is the specials,
  the characters, the '##' characters (each sorted), then every merge in order, until
  `vocab_size` tokens or until every word is one token.
  """
  words = _word_counts(texts)
  pieces = {w: [w[0]] + ['##' + c for c in w[1:]] for w in sorted(words)}
  vocab = list(SPECIAL_TOKENS)
  vocab += sorted({p[0] for p in pieces.values()} - set(vocab))
  vocab += sorted({s for p in pieces.values() for s in p[1:]} - set(vocab))
  known = set(vocab)
  while len(vocab) < vocab_size:
    pairs = collections.Counter()
    for word, symbols in pieces.items():
      for pair in zip(symbols, symbols[1:]):
        pairs[pair] += words[word]
    if not pairs:
      break  # every word is a single token
    (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], _joined(*kv[0]), kv[0]))
    token = _joined(a, b)
    if token not in known:
      vocab.append(token)
      known.add(token)
    for word, symbols in pieces.items():
      if len(symbols) > 1:
        pieces[word] = _merge(symbols, (a, b), token)
  return vocab


def _joined(a: str, b: str) -> str:
  return a + b[2:] if b.startswith('##') else a + b


def wordpiece_tokenizer(vocab: Sequence[str] | dict, lowercase: bool = True) -> Tokenizer:
  """The BertTokenizerFast pipeline, built from a vocabulary without any file."""
  if not isinstance(vocab, dict):
    vocab = {t: i for i, t in enumerate(vocab)}
  tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  return tok


def _read_vocab_txt(path: epath.Path) -> list[str]:
  return [line.rstrip('\n') for line in path.read_text(encoding='utf-8').splitlines()]


def tokenizer_from_path(path: str, lowercase: bool = True) -> Tokenizer:
  """`tokenizer.json` (kept as is) or `vocab.txt` (BERT pipeline), or a folder of either;
  a local path or any path etils.epath reads (gs://...), so every host of a pod can read
  one copy; or a Hugging Face Hub id, from huggingface_hub's cache (cookie_jax/hub.py)."""
  path = hub.resolve(path, f'config.data.tokenizer={path!r}')
  p = epath.Path(path).expanduser()
  if p.is_dir():
    candidates = [p / 'tokenizer.json', p / 'vocab.txt']
    found = [c for c in candidates if c.is_file()]
    if not found:
      raise FileNotFoundError(
          f"config.data.tokenizer={path!r}: the folder has neither 'tokenizer.json' nor "
          "'vocab.txt'. Point it at a Hugging Face BERT tokenizer folder or a vocab.txt.")
    p = found[0]
  if not p.is_file():
    raise FileNotFoundError(
        f'config.data.tokenizer={path!r}: no such file or folder. Give a folder (local or '
        "gs://...) with 'tokenizer.json' or 'vocab.txt', a Hub id (owner/name), or '' for "
        "the synthetic dataset's own vocabulary.")
  if p.name.endswith('.json'):
    return Tokenizer.from_str(p.read_text(encoding='utf-8'))
  return wordpiece_tokenizer(_read_vocab_txt(p), lowercase=lowercase)


def finalize(tok: Tokenizer, max_len: int) -> Tokenizer:
  """[CLS] text [SEP] (BERT) or <s> text </s> (RoBERTa, XLM-R: their tokenizer.json's
  template, pair '<s> A </s> </s> B </s>'), truncated (specials included) and padded on
  the right to exactly `max_len` with [PAD] or <pad>, as transformers' tokenizer of the
  same folder encodes."""
  vocab = tok.get_vocab()
  style = special_style(vocab)
  if not style:
    missing = [t for t in ('[PAD]', '[CLS]', '[SEP]') if t not in vocab]
    raise ValueError(f'The tokenizer has no {missing} token(s) (nor RoBERTa\'s <pad>, <s>, '
                     '</s>); cookie_jax expects a BERT WordPiece vocabulary or a RoBERTa / '
                     'XLM-R tokenizer.json (config.data.tokenizer).')
  sp = SPECIALS[style]
  cls, sep, pad = sp['cls_token'], sp['sep_token'], sp['pad_token']
  if max_len < 2:
    raise ValueError(f'config.data.max_len={max_len}: needs room for {cls} and {sep}; '
                     'use at least 2 (e.g. 32).')
  pair = (f'{cls} $A {sep} $B:1 {sep}:1' if style == 'bert'
          else f'{cls} $A {sep} {sep} $B {sep}')
  tok.post_processor = processors.TemplateProcessing(
      single=f'{cls} $A {sep}', pair=pair,
      special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
  tok.enable_truncation(max_length=max_len)
  tok.enable_padding(length=max_len, pad_id=vocab[pad], pad_token=pad)
  return tok


def encode(tok: Tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
  """{'input_ids', 'attention_mask'}: int32 [len(texts), max_len]."""
  encs = tok.encode_batch(list(texts))
  length = tok.padding['length']
  return {'input_ids': np.asarray([e.ids for e in encs], np.int32).reshape(-1, length),
          'attention_mask': np.asarray([e.attention_mask for e in encs],
                                       np.int32).reshape(-1, length)}


# The run's own tokenizer ------------------------------------------------------------------
# Training writes the tokenizer it trains with into the workdir; evaluation, fine-tuning
# and export compare the dataset's against it, because token ids that mean other words
# give wrong numbers without any error.

RUN_TOKENIZER = 'tokenizer.json'


def run_root(path: str) -> str:
  """The workdir of a run, from it, its checkpoints/ folder or one step's folder."""
  p = os.fspath(path).rstrip('/')
  base, leaf = os.path.split(p)
  if leaf.isdigit():
    p, leaf = base, os.path.basename(base)
  if leaf == 'checkpoints':
    p = os.path.dirname(p)
  return p


def read_run_tokenizer(workdir: str) -> Tokenizer | None:
  """The tokenizer saved in `workdir` (see `keep_run_tokenizer`), or None."""
  path = epath.Path(run_root(workdir)) / RUN_TOKENIZER
  return Tokenizer.from_str(path.read_text()) if path.exists() else None


def save_run_tokenizer(workdir: str, tok: Tokenizer) -> None:
  """WORKDIR/tokenizer.json, written atomically, without our padding and truncation."""
  tok = Tokenizer.from_str(tok.to_str())
  tok.no_padding()
  tok.no_truncation()
  files.write_text(files.join(workdir, RUN_TOKENIZER), tok.to_str(pretty=True))


def _essentials(tok: Tokenizer) -> dict:
  """What decides the ids of a text: normaliser, pre-tokeniser and model (its vocab)."""
  spec = json.loads(tok.to_str())
  return {k: spec.get(k) for k in ('normalizer', 'pre_tokenizer', 'model')}


def _difference(run: Tokenizer, data: Tokenizer) -> str:
  run_vocab, data_vocab = run.get_vocab(), data.get_vocab()
  if run_vocab == data_vocab:
    return 'the same vocabulary, but another normaliser, pre-tokeniser or WordPiece setting'
  a, b = sorted(run_vocab, key=run_vocab.get), sorted(data_vocab, key=data_vocab.get)
  first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  shown = lambda tokens: repr(tokens[first]) if first < len(tokens) else '(none)'
  return (f'{len(a)} tokens in the run, {len(b)} in the dataset; first difference at id '
          f'{first}: {shown(a)} in the run, {shown(b)} in the dataset')


def check_run_tokenizer(workdir: str, tok: Tokenizer, what: str) -> None:
  """Refuses when the run in `workdir` was trained with another tokenizer than `tok`.

  A run that predates WORKDIR/tokenizer.json cannot be checked: one logged note, and
  `tok` is used as before.
  """
  run = read_run_tokenizer(workdir)
  root = run_root(workdir)
  if run is None:
    logging.warning('%s has no %s (the run predates it), so the tokenizer of %s cannot '
                    "be checked against the run's; using the dataset's.", root,
                    RUN_TOKENIZER, what)
    return
  if _essentials(run) != _essentials(tok):
    raise TokenizerMismatchError(
        f"The tokenizer for {what} is not the one {root} was trained with "
        f'({_difference(run, tok)}), so its token ids would mean other words. Rebuild the '
        'dataset as the run had it, or set '
        f'--config.data.tokenizer={epath.Path(root) / RUN_TOKENIZER} to use the run\'s own.')


def keep_run_tokenizer(workdir: str, tok: Tokenizer, *, resuming: bool, init_from: str = '',
                       write: bool = True) -> None:
  """For training, before the first step: checks `tok` against this run's own when
  resuming, else against the run it is fine-tuned from (`init_from`), then writes it into
  `workdir` if it is not there yet (`write`: on the one process that writes)."""
  own = (epath.Path(workdir) / RUN_TOKENIZER).exists()
  if own or resuming:
    check_run_tokenizer(workdir, tok, 'resuming this run')
  elif init_from:
    check_run_tokenizer(init_from, tok, f'fine-tuning from {init_from}')
  if not own and write:
    save_run_tokenizer(workdir, tok)
