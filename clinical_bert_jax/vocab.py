"""The vocabulary: reading `vocab.txt`, BERT's special tokens, the `##` prefix and the casing rule, all in one place.

Every reader of a vocabulary goes through `read_vocab` (the tokenizer, dynamic masking, the vocabulary check of the
data tools, the dataset fingerprint, model loading), so they all agree on the number of entries and the id of each.

The rules of `read_vocab`: UTF-8 text, one token per line, ids in line order; a line is split on "\\n" only, a
"\\r" just before the "\\n" (Windows line ends) is dropped and every token is stripped of surrounding whitespace, as
Google's `load_vocab` does; a final newline opens no extra line. Google's reader drops every "\\r" and Hugging
Face's splits on a lone one, and on a repeated token Google keeps the last id while its tokenizer counts lines: the
two disagree about such files and a model trained on one reading silently mis-reads the other. So a stray "\\r" and
a repeated token are errors, one line naming the file and the line, as are an empty file and invalid UTF-8.

Casing: `do_lower_case` comes from `tokenizer_config.json` when it has the key, else (in a directory without
vocab.txt, as transformers 5 saves it) from `tokenizer.json`'s normaliser (`clinical_bert_jax.hf_tokenizer_json`).
Otherwise the vocabulary decides: a vocabulary with upper-case word pieces belongs to a cased model. That is what
`emilyalsentzer/Bio_ClinicalBERT` needs (it ships no tokenizer_config.json and is cased; transformers' default of
lower-casing silently degrades it, ClinicalBERT issue #26), and an uncased vocabulary without the file is still
lower-cased.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from absl import logging

from clinical_bert_jax.errors import UserError

# BERT's special tokens: the one table every module uses.
PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
MASK_TOKEN = "[MASK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)  # a BERT vocab.txt has all five
CONTINUATION_PREFIX = "##"  # WordPiece: a piece that continues the word of the piece before it


def special_tokens_map() -> dict[str, str]:
  """The Hugging Face names of the special tokens (`tokenizer_config.json`, `special_tokens_map.json`)."""
  return {
    "unk_token": UNK_TOKEN,
    "sep_token": SEP_TOKEN,
    "pad_token": PAD_TOKEN,
    "cls_token": CLS_TOKEN,
    "mask_token": MASK_TOKEN,
  }


def is_bracketed_special(token: str) -> bool:
  """True for [CLS], [unused0] and the like: tokens that never come out of text."""
  return token.startswith("[") and token.endswith("]")


def _read_bytes(vocab_file: str | os.PathLike) -> bytes:
  try:
    return Path(vocab_file).read_bytes()
  except OSError as error:
    raise UserError(f"cannot read vocabulary file {vocab_file}: {error.strerror}; check --vocab_file") from None


def parse_vocab(data: bytes, source: str | os.PathLike) -> list[str]:
  """The tokens of vocab.txt content `data`, in id order, under the rules of the module docstring."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as error:
    line_number = data.count(b"\n", 0, error.start) + 1
    raise UserError(
      f"vocabulary file {source} line {line_number} is not valid UTF-8; pass a BERT vocab.txt "
      "(UTF-8, one token per line)"
    ) from None
  if not text:
    raise UserError(f"vocabulary file {source} is empty; pass a BERT vocab.txt")
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()  # a final newline opens no extra line
  tokens: list[str] = []
  first_line: dict[str, int] = {}
  for line_number, line in enumerate(lines, start=1):
    if line.endswith("\r"):
      line = line[:-1]
    if "\r" in line:
      raise UserError(
        f"vocabulary file {source} line {line_number} has a stray carriage return (\\r) inside the "
        "line; readers disagree about where such a line ends: remove it"
      )
    token = line.strip()
    if token in first_line:
      raise UserError(
        f"vocabulary file {source} line {line_number} repeats the token of line "
        f"{first_line[token]}; token ids would differ between readers: remove the repeat"
      )
    first_line[token] = line_number
    tokens.append(token)
  return tokens


def read_vocab(vocab_file: str | os.PathLike) -> list[str]:
  """The tokens of a vocab.txt in id order (`tokens[i]` has id i); UserError for a file that breaks the rules."""
  return parse_vocab(_read_bytes(vocab_file), vocab_file)


def token_ids(tokens: Sequence[str]) -> dict[str, int]:
  """token -> id of a vocabulary read by `read_vocab` (its tokens are distinct)."""
  return {token: index for index, token in enumerate(tokens)}


def missing_special_tokens(tokens: Iterable[str], required: Sequence[str] = SPECIAL_TOKENS) -> list[str]:
  """The tokens of `required` that the vocabulary lacks, in `required`'s order."""
  present = set(tokens)
  return [token for token in required if token not in present]


def vocab_fingerprint(vocab_file: str | os.PathLike) -> tuple[str, int]:
  """(sha256 hex of the file bytes, number of entries): identifies the vocabulary a dataset was built with."""
  data = _read_bytes(vocab_file)
  return hashlib.sha256(data).hexdigest(), len(parse_vocab(data, vocab_file))


def vocab_is_cased(tokens: Iterable[str]) -> bool:
  """True when some word piece (not a bracketed special like [CLS] or [unused0]) has an upper-case letter."""
  return any(any(ch.isupper() for ch in token) for token in tokens if not is_bracketed_special(token))


def read_do_lower_case(directory: str | os.PathLike, vocab_file: str | os.PathLike | None) -> bool | None:
  """The casing of a model directory (see the module docstring); None when neither source is there."""
  tokenizer_config = Path(directory) / "tokenizer_config.json"
  if tokenizer_config.is_file():
    try:
      settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
      raise UserError(f"{tokenizer_config} cannot be read as JSON ({error}); fix or delete it") from None
    if isinstance(settings, dict) and settings.get("do_lower_case") is not None:
      return bool(settings["do_lower_case"])
  if not (Path(directory) / "vocab.txt").is_file():  # saved by transformers 5: tokenizer.json only
    from clinical_bert_jax.hf_tokenizer_json import tokenizer_json_casing

    from_tokenizer_json = tokenizer_json_casing(directory)
    if from_tokenizer_json is not None:
      return from_tokenizer_json
  if vocab_file is None:
    return None
  lower = not vocab_is_cased(read_vocab(vocab_file))
  logging.info(
    "%s: no do_lower_case in tokenizer_config.json; the vocabulary is %s, so do_lower_case=%s",
    directory,
    "uncased" if lower else "cased",
    lower,
  )
  return lower
