"""The vocabulary: reading `vocab.txt` and BERT `tokenizer.json`, BERT's special tokens, the `##` prefix and the
casing rule, all in one place.

Every reader of a vocabulary goes through `read_vocab` (the tokenizer, dynamic masking, the vocabulary check of the
data tools, the dataset fingerprint, model loading), so they all agree on the number of entries and the id of each.

The rules of `read_vocab`: UTF-8 text, one token per line, ids in line order; a line is split on "\\n" only, a
"\\r" just before the "\\n" (Windows line ends) is dropped and every token is stripped of surrounding whitespace, as
Google's `load_vocab` does; a final newline opens no extra line. Google's reader drops every "\\r" and Hugging
Face's splits on a lone one, and on a repeated token Google keeps the last id while its tokenizer counts lines: the
two disagree about such files and a model trained on one reading silently mis-reads the other. So a stray "\\r" and
a repeated token are errors, one line naming the file and the line, as are an empty file and invalid UTF-8
(`check_tokens` is that rule; `tokenizer.json` entries pass the same one, named by id).

`tokenizer.json` (transformers 5 saves a BERT tokenizer as `tokenizer.json` + `tokenizer_config.json` only, without
`vocab.txt`): `vocab_file_in` gives a directory's vocab.txt, or one made from its `tokenizer.json` — the WordPiece
model's `vocab` (token -> id, with `added_tokens` filling any id it lacks, a repeated key in the JSON object kept as
a repeat), written once per process as a `vocab.txt` in a private temporary folder, so that everything downstream
reads vocab.txt. Only a BERT WordPiece tokenizer is accepted (WordPiece model with "##" continuations,
`BertNormalizer`, `BertPreTokenizer`); anything else (a BPE or Unigram tokenizer, another normaliser) would tokenise
differently from the model's training and is a one-line error. `strip_accents` must be unset or equal to
`lowercase`: Google's tokenizer strips accents exactly when it lower-cases. (Writing a `tokenizer.json` for our
exports is `clinical_bert_jax.hf_tokenizer_json`.)

Casing: `do_lower_case` comes from `tokenizer_config.json` when it has the key, else (in a directory without
vocab.txt) from `tokenizer.json`'s normaliser (`lowercase`). Otherwise the vocabulary decides: a vocabulary with
upper-case word pieces belongs to a cased model. That is what `emilyalsentzer/Bio_ClinicalBERT` needs (it ships no
tokenizer_config.json and is cased; transformers' default of lower-casing silently degrades it, ClinicalBERT issue
#26), and an uncased vocabulary without the file is still lower-cased.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

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
VOCAB_TXT = "vocab.txt"
TOKENIZER_JSON = "tokenizer.json"


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
  return check_tokens([line[:-1] if line.endswith("\r") else line for line in lines], source)


def check_tokens(entries: Sequence[str], source: str | os.PathLike, unit: str = "line", first: int = 1) -> list[str]:
  """The rule every vocabulary passes, vocab.txt lines and tokenizer.json entries alike: no "\\r" in an entry and
  no repeated token (after stripping surrounding whitespace); returns the stripped tokens. Entry i is named
  `{unit} {i + first}` in the one-line error (vocab.txt: line 1, 2, ...; tokenizer.json: id 0, 1, ...)."""
  tokens: list[str] = []
  first_seen: dict[str, int] = {}
  for index, entry in enumerate(entries):
    if "\r" in entry:
      raise UserError(
        f"vocabulary file {source} {unit} {index + first} has a stray carriage return (\\r) inside the "
        "token; readers disagree about where such a line ends: remove it"
      )
    token = entry.strip()
    if token in first_seen:
      raise UserError(
        f"vocabulary file {source} {unit} {index + first} repeats the token of {unit} "
        f"{first_seen[token] + first}; token ids would differ between readers: remove the repeat"
      )
    first_seen[token] = index
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
  if not (Path(directory) / VOCAB_TXT).is_file():  # saved by transformers 5: tokenizer.json only
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


# --------------------------------------------------------------------------------------------- tokenizer.json
_materialised: dict[str, Path] = {}
_temp_root: str | None = None


class _JsonObject(dict):
  """A JSON object that also keeps its (key, value) pairs in file order, a repeated key included (a dict keeps only
  the last value of a key, which would hide a repeated vocabulary token)."""

  pairs: list[tuple[str, Any]]


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
  result = _JsonObject(pairs)
  result.pairs = pairs
  return result


def _load_json(path: Path) -> dict[str, Any]:
  try:
    content = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_json_object)
  except OSError as error:
    raise UserError(f"cannot read {path}: {error.strerror}") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise UserError(f"{path} is not valid JSON ({type(error).__name__}); re-save the tokenizer") from None
  if not isinstance(content, dict):
    raise UserError(f"{path} is not a tokenizers JSON object; re-save the tokenizer")
  return content


def _not_bert(path: Path, what: str) -> UserError:
  return UserError(
    f"{path} is not a BERT WordPiece tokenizer ({what}); this tool needs a BERT vocabulary "
    "(vocab.txt, or a tokenizer.json saved from a BertTokenizer)"
  )


def read_tokenizer_json(path: str | os.PathLike) -> tuple[list[str], bool]:
  """(tokens in id order, do_lower_case) of a BERT WordPiece `tokenizer.json`; UserError for anything else, and
  for a vocabulary that breaks `check_tokens` (the same one-line errors as vocab.txt, the entry named by id)."""
  path = Path(path)
  content = _load_json(path)
  model = content.get("model") or {}
  if model.get("type") != "WordPiece":
    raise _not_bert(path, f"model type {model.get('type')!r}")
  if model.get("continuing_subword_prefix", CONTINUATION_PREFIX) != CONTINUATION_PREFIX:
    raise _not_bert(path, f"continuation prefix {model.get('continuing_subword_prefix')!r}, not '##'")
  normalizer = content.get("normalizer") or {}
  if normalizer.get("type") != "BertNormalizer":
    raise _not_bert(path, f"normalizer {normalizer.get('type')!r}, not BertNormalizer")
  pre_tokenizer = content.get("pre_tokenizer") or {}
  if pre_tokenizer.get("type") != "BertPreTokenizer":
    raise _not_bert(path, f"pre-tokenizer {pre_tokenizer.get('type')!r}, not BertPreTokenizer")
  lowercase = bool(normalizer.get("lowercase", True))
  strip_accents = normalizer.get("strip_accents")
  if strip_accents is not None and bool(strip_accents) != lowercase:
    raise _not_bert(
      path,
      f"strip_accents={strip_accents} with lowercase={lowercase}; Google's tokenizer strips "
      "accents exactly when it lower-cases",
    )
  vocab = model.get("vocab")
  if not isinstance(vocab, dict) or not vocab:
    raise _not_bert(path, "no WordPiece vocabulary")
  by_id: dict[int, str] = {}
  for token, token_id in getattr(vocab, "pairs", vocab.items()):
    if not isinstance(token_id, int) or token_id < 0 or token_id in by_id:
      raise UserError(
        f"{path}: vocabulary id {token_id!r} is negative, not an integer or repeated; re-save the tokenizer"
      )
    by_id[token_id] = token
  for added in content.get("added_tokens") or []:
    if isinstance(added, dict) and isinstance(added.get("id"), int):
      by_id.setdefault(added["id"], added.get("content", ""))
  size = max(by_id) + 1
  if len(by_id) != size:
    missing = next(i for i in range(size) if i not in by_id)
    raise UserError(
      f"{path}: the vocabulary has no token with id {missing} (ids must run 0..{size - 1} without "
      "gaps); re-save the tokenizer"
    )
  tokens = [by_id[i] for i in range(size)]
  check_tokens(tokens, path, unit="id", first=0)
  if any("\n" in token or token != token.strip() or not token for token in tokens):
    raise UserError(
      f"{path}: a vocabulary entry is empty or has surrounding whitespace, which vocab.txt cannot "
      "hold; re-save the tokenizer"
    )
  return tokens, lowercase


def tokenizer_json_casing(directory: str | os.PathLike) -> bool | None:
  """The normaliser's `lowercase` of DIRECTORY/tokenizer.json; None without the file."""
  path = Path(directory) / TOKENIZER_JSON
  return read_tokenizer_json(path)[1] if path.is_file() else None


def vocab_file_in(directory: str | os.PathLike) -> Path | None:
  """DIRECTORY/vocab.txt; without it, a vocab.txt made from DIRECTORY/tokenizer.json (see the module docstring);
  None when the directory has neither."""
  directory = Path(directory)
  if (directory / VOCAB_TXT).is_file():
    return directory / VOCAB_TXT
  path = directory / TOKENIZER_JSON
  if not path.is_file():
    return None
  tokens, _ = read_tokenizer_json(path)
  text = "".join(f"{token}\n" for token in tokens)
  key = hashlib.sha256(text.encode("utf-8")).hexdigest()
  if key not in _materialised or not _materialised[key].is_file():
    target = Path(_temp_dir()) / key[:16] / VOCAB_TXT
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    _materialised[key] = target
  return _materialised[key]


def _temp_dir() -> str:
  global _temp_root
  if _temp_root is None or not os.path.isdir(_temp_root):
    _temp_root = tempfile.mkdtemp(prefix="clinical_bert_jax_vocab_")
    atexit.register(shutil.rmtree, _temp_root, True)
  return _temp_root
