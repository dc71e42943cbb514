"""Google BERT's `FullTokenizer`, token for token, running on the Rust `tokenizers` library.

Pretraining data must be tokenised exactly as Google's `tokenization.py` does (bert-pretraining.md §1): a model
pretrained on one tokenisation and fine-tuned on another silently loses accuracy, and parity tests of the instance
generator need identical tokens. Google's code is pure Python and walks every character several times; this module
gives the same output an order of magnitude faster and has a batch API.

How the work is split, and why:

* Normalisation runs in Python, as whole-line C-level string operations (`str.translate`, `re.sub`, `str.lower`,
  `unicodedata.normalize`) whose character tables are filled from Python's own `unicodedata` as characters are
  first seen. It cannot run in `tokenizers`: its `Lowercase` maps character by character (Python's `str.lower`,
  which Google calls, turns a word-final capital sigma into "ς"), its `BertNormalizer` also deletes private-use and
  unassigned characters (Google keeps them), and its Unicode tables are of another version than the `unicodedata`
  that Google's code consults. Whole-line operations equal Google's per-word ones because whitespace is neither
  cased nor case-ignorable (final sigma), is a starter for NFD, and is removed by the later split anyway.
* The whitespace split is Python's `str.split()`, which is literally Google's `whitespace_tokenize`.
* Each distinct word is then split on punctuation in Python, once (results are memoised, see `encode_batch`), and
  WordPiece runs in `tokenizers` on the pieces: a `WordPiece` model with Google's 200-character word limit (the
  `tokenizers` and Hugging Face default is 100) fed pre-tokenized input. The punctuation split could be a `Split`
  pre-tokenizer, but its character class would have to be enumerated from `unicodedata` over all 1.1M code points
  at start-up (about 0.3 s per process, more than tokenising a 500 KB corpus takes); `BertPreTokenizer` uses Rust's
  Unicode tables. No special tokens are registered, so a literal "[MASK]" in the text splits into "[", "MASK", "]"
  as in Google's code.

Google's steps, in order: clean text (drop U+0000, U+FFFD and Cc/Cf characters except tab/newline/CR; every
whitespace character becomes a space), space out CJK ideographs, lower-case then NFD then drop Mn (uncased
vocabularies only), split on whitespace, isolate punctuation (Unicode P* plus all ASCII symbols such as $+<=>^`|~),
WordPiece with "##" continuations, a whole word becoming [UNK] when some part of it has no match or when it is
longer than 200 characters.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import unicodedata
from typing import Callable, Iterable

from tokenizers import models

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.vocab import CONTINUATION_PREFIX, UNK_TOKEN, read_vocab, token_ids

MAX_INPUT_CHARS_PER_WORD = 200  # google-research/bert tokenization.WordpieceTokenizer default

# Google's `_is_chinese_char` ranges (CJK Unified Ideographs and their extensions, compatibility ideographs).
_CJK_RANGES = (
  (0x4E00, 0x9FFF),
  (0x3400, 0x4DBF),
  (0x20000, 0x2A6DF),
  (0x2A700, 0x2B73F),
  (0x2B740, 0x2B81F),
  (0x2B820, 0x2CEAF),
  (0xF900, 0xFAFF),
  (0x2F800, 0x2FA1F),
)
# ASCII characters that are not letters or digits count as punctuation for Google, Unicode category or not.
_ASCII_PUNCTUATION_RANGES = ((33, 47), (58, 64), (91, 96), (123, 126))
# Lines normalised and split per step of `encode_batch`; their new words are then tokenised together.
_ENCODE_BATCH_LINES = 4096
# Distinct words whose ids are memoised (about 200 bytes each); the memo is emptied when it would grow past this.
_WORD_MEMO_LIMIT = 1 << 18


def load_vocab(vocab_file: str | os.PathLike) -> dict[str, int]:
  """Token -> id, ids in line order: `vocab.read_vocab`'s rules (Google's `load_vocab` for every file it accepts)."""
  return token_ids(read_vocab(vocab_file))


class _CharTable(dict):
  """A `str.translate` table (code point -> replacement) filled from `rule(char)` the first time a character shows
  up, so no scan of all of Unicode is needed; look-ups of known characters stay C-speed dict hits."""

  def __init__(self, rule: Callable[[str], str | None]):
    super().__init__()
    self._rule = rule

  def __missing__(self, code_point: int) -> str | None:
    value = self[code_point] = self._rule(chr(code_point))
    return value


def _clean_char(char: str) -> str | None:
  """Google's `_clean_text` for one character: None deletes it."""
  if char in "\t\n\r" or unicodedata.category(char) == "Zs":
    return " "  # _is_whitespace
  if char in "\x00\ufffd" or unicodedata.category(char) in ("Cc", "Cf"):
    return None  # _is_control, NUL, replacement character
  return char


def _strip_mark(char: str) -> str | None:
  """Google's `_run_strip_accents` after NFD: nonspacing marks (Mn) are deleted."""
  return None if unicodedata.category(char) == "Mn" else char


@functools.cache
def _is_punctuation(char: str) -> bool:
  """Google's `_is_punctuation`: ASCII symbols (letters and digits excepted) and Unicode category P*."""
  code_point = ord(char)
  if any(low <= code_point <= high for low, high in _ASCII_PUNCTUATION_RANGES):
    return True
  return unicodedata.category(char).startswith("P")


_CJK_PATTERN = re.compile("[" + "".join(f"{chr(low)}-{chr(high)}" for low, high in _CJK_RANGES) + "]")
_ASCII_PUNCTUATION = "".join(f"\\x{low:02x}-\\x{high:02x}" for low, high in _ASCII_PUNCTUATION_RANGES)
# An ASCII word split into punctuation characters and the runs between them (Google's _run_split_on_punc).
_ASCII_PUNCTUATION_SPLIT = re.compile(f"[{_ASCII_PUNCTUATION}]|[^{_ASCII_PUNCTUATION}]+")


def split_on_punctuation(word: str) -> list[str]:
  """Google's `_run_split_on_punc`: each punctuation character alone, the runs between them kept whole."""
  if word.isascii():
    return _ASCII_PUNCTUATION_SPLIT.findall(word)
  pieces, run = [], []
  for char in word:
    if _is_punctuation(char):
      if run:
        pieces.append("".join(run))
        run = []
      pieces.append(char)
    else:
      run.append(char)
  if run:
    pieces.append("".join(run))
  return pieces


class FullTokenizer:
  """Drop-in for Google's `tokenization.FullTokenizer(vocab_file, do_lower_case)`, same tokens, plus batch calls.

  `vocab` maps token -> id (Google's `load_vocab`), `inv_vocab` id -> token. Text may be `str` or UTF-8 `bytes`
  (undecodable bytes are dropped, as Google's `convert_to_unicode` does).
  """

  def __init__(self, vocab_file: str | os.PathLike, do_lower_case: bool = True):
    self.vocab = load_vocab(vocab_file)
    if UNK_TOKEN not in self.vocab:
      raise UserError(f"vocabulary file {vocab_file} has no {UNK_TOKEN} token; pass a BERT vocab.txt")
    self.inv_vocab = {token_id: token for token, token_id in self.vocab.items()}
    self.do_lower_case = do_lower_case
    self._clean_table = _CharTable(_clean_char)
    self._strip_marks_table = _CharTable(_strip_mark)
    # The bare model, not a `Tokenizer` pipeline around it: it receives pieces already split on punctuation, and
    # calling it directly skips building `Encoding` objects (and the pipeline's slow first call).
    self._wordpiece = models.WordPiece(
      vocab=self.vocab,
      unk_token=UNK_TOKEN,
      continuing_subword_prefix=CONTINUATION_PREFIX,
      max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD,
    )
    self._word_ids: dict[str, list[int]] = {}

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def normalize(self, text: str | bytes) -> str:
    """Google's text cleaning, CJK spacing and (uncased only) lower-casing and accent removal, on a whole line."""
    if isinstance(text, bytes):
      text = text.decode("utf-8", "ignore")
    text = text.translate(self._clean_table)
    if not text.isascii():
      text = _CJK_PATTERN.sub(r" \g<0> ", text)
    if self.do_lower_case:
      text = text.lower()
      if not text.isascii():
        text = unicodedata.normalize("NFD", text).translate(self._strip_marks_table)
    return text

  def encode_batch(self, lines: Iterable[str | bytes]) -> list[list[int]]:
    """Token ids of each line: `convert_tokens_to_ids(tokenize(line))` for every line, without token strings.

    After normalisation every whitespace-separated word is tokenised independently of its neighbours (Google's
    punctuation split and WordPiece look at one word at a time), so each distinct word is split and sent to the
    Rust WordPiece once and its ids are memoised: clinical text repeats a small vocabulary of words, and a
    dictionary look-up is cheaper than another trip through `tokenizers`.
    """
    ids: list[list[int]] = []
    lines = list(lines)
    for start in range(0, len(lines), _ENCODE_BATCH_LINES):
      words_per_line = [self.normalize(line).split() for line in lines[start : start + _ENCODE_BATCH_LINES]]
      self._memoise_words(set().union(*words_per_line))
      word_ids = self._word_ids.__getitem__
      ids.extend(list(itertools.chain.from_iterable(map(word_ids, words))) for words in words_per_line)
    return ids

  def _memoise_words(self, words: set[str]) -> None:
    """Tokenises the words not yet memoised; the memo is bounded by `_WORD_MEMO_LIMIT`."""
    missing = [word for word in words if word not in self._word_ids]
    if len(self._word_ids) + len(missing) > _WORD_MEMO_LIMIT:
      self._word_ids.clear()
      missing = list(words)
    self._word_ids.update(
      (word, [token_id for piece in split_on_punctuation(word) for token_id in self._wordpiece_ids(piece)])
      for word in missing
    )

  def _wordpiece_ids(self, piece: str) -> list[int]:
    """Google's WordPiece of one punctuation-free piece, run by the Rust model."""
    try:
      return [token.id for token in self._wordpiece.tokenize(piece)]
    except UnicodeEncodeError:  # a lone surrogate (possible in str input only): no vocabulary entry can match it
      return [self.vocab[UNK_TOKEN]]

  def tokenize_batch(self, lines: Iterable[str | bytes]) -> list[list[str]]:
    """`tokenize(line)` for every line, batched."""
    return [self.convert_ids_to_tokens(ids) for ids in self.encode_batch(lines)]

  def tokenize(self, text: str | bytes) -> list[str]:
    return self.tokenize_batch([text])[0]

  def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
    return [self.vocab[token] for token in tokens]

  def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
    return [self.inv_vocab[token_id] for token_id in ids]
