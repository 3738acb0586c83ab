"""BERT WordPiece tokenisation with Hugging Face `tokenizers` (the Rust "fast" tokenizer).

Everything is read from local files: a directory holding `tokenizer.json` or `vocab.txt`,
or either file itself. For the synthetic dataset a vocabulary is trained at build time and
shipped in the dataset's metadata, so the default config runs with no download at all.
"""

import pathlib
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.implementations import BertWordPieceTokenizer

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> list[str]:
  """A lowercase WordPiece vocabulary (tokens in id order, specials first) from `texts`."""
  trainer = BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1,
                              special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  vocab = trainer.get_vocab()
  return sorted(vocab, key=vocab.get)


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


def _read_vocab_txt(path: pathlib.Path) -> list[str]:
  return [line.rstrip('\n') for line in path.read_text(encoding='utf-8').splitlines()]


def tokenizer_from_path(path: str, lowercase: bool = True) -> Tokenizer:
  """`tokenizer.json` (kept as is) or `vocab.txt` (BERT pipeline), or a folder of either."""
  p = pathlib.Path(path).expanduser()
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
        f'config.data.tokenizer={path!r}: no such file or folder. Give a local folder with '
        "'tokenizer.json' or 'vocab.txt' (nothing is downloaded), or '' for the synthetic "
        "dataset's own vocabulary.")
  if p.name.endswith('.json'):
    return Tokenizer.from_file(str(p))
  return wordpiece_tokenizer(_read_vocab_txt(p), lowercase=lowercase)


def finalize(tok: Tokenizer, max_len: int) -> Tokenizer:
  """[CLS] text [SEP], truncated (specials included) and padded to exactly `max_len`."""
  vocab = tok.get_vocab()
  missing = [t for t in ('[PAD]', '[CLS]', '[SEP]') if t not in vocab]
  if missing:
    raise ValueError(f'The tokenizer has no {missing} token(s); cookie_jax expects a BERT '
                     'WordPiece vocabulary (config.data.tokenizer).')
  if max_len < 2:
    raise ValueError(f'config.data.max_len={max_len}: needs room for [CLS] and [SEP]; '
                     'use at least 2 (e.g. 32).')
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', vocab['[CLS]']), ('[SEP]', vocab['[SEP]'])])
  tok.enable_truncation(max_length=max_len)
  tok.enable_padding(length=max_len, pad_id=vocab['[PAD]'], pad_token='[PAD]')
  return tok


def encode(tok: Tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
  """{'input_ids', 'attention_mask'}: int32 [len(texts), max_len]."""
  encs = tok.encode_batch(list(texts))
  length = tok.padding['length']
  return {'input_ids': np.asarray([e.ids for e in encs], np.int32).reshape(-1, length),
          'attention_mask': np.asarray([e.attention_mask for e in encs],
                                       np.int32).reshape(-1, length)}
