"""Concepts mined from the training captions, and the word groups of composed negatives.

Two methods read the training text:

* CODER (Wang et al., ECCV 2022, "CODER: Coupled Diversity-Sensitive Momentum Contrastive
  Learning for Image-Text Retrieval") builds a concept-level branch on concepts mined from
  the training captions and their co-occurrence graph. The paper mines "frequent concepts"
  with a parser; our reading, with nothing downloaded at run time: a concept is a frequent
  non-stopword word of the captions that the tokenizer keeps as one WordPiece, so its
  node feature can be the text tower's own embedding row of that token
  (`ConceptVocab.token_ids`). The graph counts captions that hold both words
  (`ConceptVocab.cooccurrence`); `models/concept.py` normalises it.

`mine_tables` mines, once per run, what the configured options need; `train.py` hands the
tables to the objectives (`objectives.loss_constants`), which never read files.
* VLDeformer (Zhang et al., 2021, "VLDeformer: Vision-Language Decomposed Transformer for
  Fast Cross-Modal Retrieval") composes hard negative captions by swapping nouns or
  attributes for others from the data's vocabulary. `word_groups` says which words may
  replace which; `swap_tables` turns the groups into the arrays that
  `cookie_jax.negatives.compose_negative_captions` consumes.
"""

import collections
import dataclasses
import json
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from cookie_jax.data import sources
from cookie_jax.data.builders import scenes

# Hand-written rather than taken from nltk or spaCy: their lists are separate downloads,
# and nothing may be downloaded at run time. Function words only (articles, prepositions,
# pronouns, auxiliaries, conjunctions, quantifiers, common adverbs); digits are dropped by
# the alphabetic test in `_words`, so they need no entry.
STOPWORDS = frozenset("""
a an the this that these those there here some any each every all both either neither no
not nor none other another such same own only just very too so than then also as
of in on at by for with without from to into onto upon out up down off over under again
about above below across after against along among around before behind beneath beside
besides between beyond during except inside near outside through toward towards within
via per while until till since though although because if unless whether
and or but yet
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him
his himself she her hers herself it its itself they them their theirs themselves
what which who whom whose when where why how
is am are was were be been being has have had having do does did doing done
will would shall should can could may might must
one ones s t d ll m re ve
""".split())

_WORD = re.compile(r'[^\W\d_]+')  # runs of letters (any script): 'red,' -> 'red'


@dataclasses.dataclass
class ConceptVocab:
  """K concepts, most frequent first.

  `counts[k]` is how often word k occurs in the captions (every occurrence), the ranking
  key. `cooccurrence[i, j]` is the number of captions containing both word i and word j;
  its diagonal is the number of captions containing the word at all.
  """
  words: list[str]
  token_ids: np.ndarray  # int32 [K]: the single WordPiece id of each word
  counts: np.ndarray  # int64 [K]
  cooccurrence: np.ndarray  # float32 [K, K], symmetric


def _words(caption: str) -> list[str]:
  return [w for w in _WORD.findall(caption.lower()) if w.isalpha() and w not in STOPWORDS]


def single_token_id(tokenizer: Tokenizer, word: str) -> int | None:
  """The id when `tokenizer` keeps `word` as exactly one known token, else None."""
  enc = tokenizer.encode(word, add_special_tokens=False)
  # A finalised tokenizer pads every encoding to max_len: count real tokens only.
  ids = [i for i, m in zip(enc.ids, enc.attention_mask) if m]
  unk = tokenizer.token_to_id('[UNK]')
  if len(ids) != 1 or ids[0] == unk:
    return None
  return int(ids[0])


def mine_concepts(captions: Iterable[str], tokenizer: Tokenizer,
                  num_concepts: int) -> ConceptVocab:
  """The `num_concepts` most frequent single-token content words and their co-occurrence.

  Words are lower-cased runs of letters, minus `STOPWORDS`. Ties in frequency are broken
  alphabetically, so the result is a pure function of the captions. When two surface
  forms map to the same token (e.g. 'café' and 'cafe' under accent stripping), only the
  more frequent is kept, so token ids are unique.
  """
  if num_concepts < 2:
    raise ValueError(f'num_concepts={num_concepts}: a concept graph needs at least 2 '
                     'concepts; use e.g. 64.')
  per_caption, freq = [], collections.Counter()
  for caption in captions:
    ws = _words(caption)
    freq.update(ws)
    per_caption.append(set(ws))
  words, ids, seen = [], [], set()
  for word, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0])):
    tid = single_token_id(tokenizer, word)
    if tid is None or tid in seen:
      continue
    words.append(word)
    ids.append(tid)
    seen.add(tid)
    if len(words) == num_concepts:
      break
  if len(words) < 2:
    raise ValueError(
        f'mine_concepts found {len(words)} concept(s) (wanted num_concepts={num_concepts}) '
        f'among {len(freq)} distinct content words of {len(per_caption)} captions: too few '
        'of them are single tokens of the tokenizer. Use a tokenizer whose vocabulary '
        'holds whole words (e.g. bert-base-uncased) or more training captions.')
  index = {w: k for k, w in enumerate(words)}
  k = len(words)
  co = np.zeros((k, k), np.float64)
  chunk = 4096  # captions per indicator block: bounded memory for any caption count
  for lo in range(0, len(per_caption), chunk):
    block = per_caption[lo:lo + chunk]
    ind = np.zeros((len(block), k), np.float64)
    for r, ws in enumerate(block):
      ind[r, [index[w] for w in ws if w in index]] = 1.0
    co += ind.T @ ind
  return ConceptVocab(words=words, token_ids=np.asarray(ids, np.int32),
                      counts=np.asarray([freq[w] for w in words], np.int64),
                      cooccurrence=co.astype(np.float32))


def training_captions(data_cfg, limit: int) -> list[str]:
  """The first `limit` captions of the configured training split, in file order.

  Reads the text feature only (the image bytes are never decoded), through the same
  builder and split expression as training (`config.data.train_split`).
  """
  if limit < 1:
    raise ValueError(f'limit={limit}: the number of training captions to read must be '
                     '>= 1, e.g. 100000.')
  builder = sources.get_builder(data_cfg)
  split = sources.resolve_split(data_cfg, 'train')
  records = sources.read(builder, split, sources.feature_keys(data_cfg), with_image=False,
                         extra=())
  out = []
  for ex in records.as_numpy_iterator():
    out.extend(c.decode('utf-8', errors='replace') for c in ex['captions'])
    if len(out) >= limit:
      break
  if not out:
    raise ValueError(f'Split {split!r} of {builder.name} holds no caption.')
  return out[:limit]


def _components(pairs: Iterable[tuple[str, str]]) -> list[list[str]]:
  """Connected components of word pairs, each sorted, in order of first appearance."""
  parent = {}

  def root(w):
    parent.setdefault(w, w)
    while parent[w] != w:
      parent[w] = parent[parent[w]]
      w = parent[w]
    return w

  for a, b in pairs:
    parent[root(a)] = root(b)
  groups = collections.defaultdict(list)
  for w in parent:
    groups[root(w)].append(w)
  return [sorted(g) for g in groups.values()]


def _one_word_contrasts(phrases_a: Sequence[str], phrases_b: Sequence[str]):
  """(a, b) where two phrasings of opposite meanings differ in exactly one word."""
  for pa, pb in zip(phrases_a, phrases_b):
    wa, wb = pa.split(), pb.split()
    diff = [(x, y) for x, y in zip(wa, wb) if x != y]
    if len(wa) == len(wb) and len(diff) == 1:
      yield diff[0]


def synthetic_word_groups() -> list[list[str]]:
  """Swap groups read off the scene grammar in `scenes.py`.

  Every swap inside a group makes the caption false for its image: colours, shapes,
  plural shapes, number words and digits are all mutually exclusive. Numbers are the
  counts of plural groups (2 to 4); 'one' is left out, since one <-> two would also break
  the noun's number agreement, a cue that needs no look at the image. Sizes and relations
  have synonyms ('small' / 'little', 'above' / 'over'), so they are paired only with
  their opposites, found where the grammar's opposite phrasings differ in one word:
  {small, large}, {little, big}, {left, right}, {above, below}, {over, under},
  {top, bottom}.
  """
  groups = [list(scenes.COLOURS), list(scenes.SHAPES),
            [scenes._plural(s) for s in scenes.SHAPES],  # pylint: disable=protected-access
            [w for n, w in scenes.NUMBERS.items() if n > 1],
            [str(n) for n in scenes.NUMBERS if n > 1]]
  pairs = list(_one_word_contrasts(scenes.SIZE_WORDS['small'], scenes.SIZE_WORDS['large']))
  for rel, conv in scenes.CONVERSE.items():
    pairs += _one_word_contrasts(scenes.RELATIONS[rel], scenes.RELATIONS[conv])
  for (r, c), phrase in scenes.REGIONS.items():  # mirrored regions: left/right, top/bottom
    mirrors = [scenes.REGIONS[(r, 2 - c)], scenes.REGIONS[(2 - r, c)]]
    pairs += _one_word_contrasts([phrase] * 2, mirrors)
  return groups + _components(pairs)


def load_groups_file(path: str) -> list[list[str]]:
  """A JSON list of lists of words, e.g. [["red", "blue"], ["dog", "cat", "horse"]]."""
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise FileNotFoundError(f'groups_file={path!r}: no such file. Give a JSON file holding '
                            'a list of word groups, e.g. [["red", "blue"], ["dog", "cat"]].')
  try:
    groups = json.loads(p.read_text(encoding='utf-8'))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'groups_file={path!r} is not valid JSON ({e}); expected a list of '
                     'word groups, e.g. [["red", "blue"], ["dog", "cat"]].') from None
  ok = isinstance(groups, list) and all(
      isinstance(g, list) and all(isinstance(w, str) and w for w in g) for g in groups)
  if not ok or not groups:
    raise ValueError(f'groups_file={path!r} holds {str(groups)[:80]!r}; expected a non-empty '
                     'list of lists of non-empty words, e.g. [["red", "blue"], ["dog", "cat"]].')
  return [list(g) for g in groups]


def word_groups(data_cfg, concepts: ConceptVocab, groups_file: str = '') -> list[list[str]]:
  """The groups within which a word may be swapped to compose a negative caption.

  * `groups_file` (JSON, see `load_groups_file`), when given, for any dataset;
  * the synthetic dataset: `synthetic_word_groups()`, from its grammar;
  * any other dataset: the mined concept words as a single group. This is a limitation:
    a noun may be swapped for an adjective, because telling them apart needs a
    part-of-speech tagger, i.e. a model download. Give a `groups_file` for finer groups.

  Words are not checked against the tokenizer here; `swap_tables` keeps single tokens.
  """
  if groups_file:
    return load_groups_file(groups_file)
  if data_cfg.builder == 'synthetic':
    return synthetic_word_groups()
  return [list(concepts.words)]


def swap_tables(tokenizer: Tokenizer,
                groups: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
  """(token_group int32 [V], group_members int32 [G, M]) for `compose_negative_captions`.

  `token_group[t]` is the group of token id t, -1 where t is not swappable;
  `group_members[g]` lists group g's token ids, padded with -1. Words that are not one
  token are left out, and then groups with fewer than 2 distinct tokens.
  """
  vocab_size = tokenizer.get_vocab_size()
  token_group = np.full([vocab_size], -1, np.int32)
  kept, owner = [], {}
  for gi, group in enumerate(groups):
    ids = []
    for word in group:
      tid = single_token_id(tokenizer, word)
      if tid is None or tid in ids:
        continue
      if tid in owner:
        raise ValueError(f'Word {word!r} (token {tid}) is in word group {gi} {list(group)} '
                         f'and in group {owner[tid][0]} {list(owner[tid][1])}; a word may '
                         'belong to one group only. Merge or split the groups.')
      ids.append(tid)
    if len(ids) >= 2:
      for tid in ids:
        owner[tid] = (gi, group)
        token_group[tid] = len(kept)
      kept.append(ids)
  if not kept:
    raise ValueError(f'None of the {len(groups)} word group(s) holds 2 words that are single '
                     'tokens of the tokenizer, so no caption can be composed into a '
                     'negative. Give groups of whole-vocabulary words (groups_file) or '
                     'another tokenizer.')
  width = max(map(len, kept))
  members = np.full([len(kept), width], -1, np.int32)
  for g, ids in enumerate(kept):
    members[g, :len(ids)] = ids
  return token_group, members


def mine_tables(data_cfg, loss_cfg) -> dict[str, np.ndarray]:
  """What the options of `objectives.needs_constants` mine from the training captions:
  the concept token ids and co-occurrence counts (`loss.concept`) and the word-swap
  tables of composed negative captions (`loss.hard_negatives.captions`). A function of
  the data and config only, so a resumed run mines the same tables."""
  from cookie_jax.data import pipeline  # pylint: disable=g-import-not-at-top  # TF here
  tokenizer = pipeline.load_tokenizer(data_cfg)
  captions = training_captions(data_cfg, limit=loss_cfg.concept.captions)
  vocab = mine_concepts(captions, tokenizer, loss_cfg.concept.num_concepts)
  tables = {}
  if loss_cfg.concept.weight > 0:
    tables['concept_ids'] = np.asarray(vocab.token_ids, np.int32)
    tables['concept_cooccurrence'] = np.asarray(vocab.cooccurrence)
  if loss_cfg.hard_negatives.captions:
    groups = word_groups(data_cfg, vocab, groups_file=loss_cfg.hard_negatives.word_groups)
    token_group, members = swap_tables(tokenizer, groups)
    if not members.size:
      raise ValueError('loss.hard_negatives.captions: no group of interchangeable '
                       'single-token words was found; give loss.hard_negatives.word_groups '
                       '(a JSON list of word lists) or turn the option off.')
    tables['token_group'] = token_group
    tables['group_members'] = members
  return tables
