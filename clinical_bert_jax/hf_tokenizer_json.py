"""Hugging Face `tokenizer.json` for BERT WordPiece: read its vocabulary and casing, and write one for our exports.

transformers 5 saves a BERT tokenizer as `tokenizer.json` (+ `tokenizer_config.json`) only, without `vocab.txt`.
Everything here that needs a vocabulary file (Google's `FullTokenizer`, the vocabulary fingerprint, masking) reads
`vocab.txt`, so a directory without one gets its vocabulary from `tokenizer.json`: the WordPiece model's `vocab`
(token -> id, with `added_tokens` filling any id it lacks), written once per process as a `vocab.txt` in a private
temporary folder. Only a BERT WordPiece tokenizer is accepted (WordPiece model with "##" continuations,
`BertNormalizer`, `BertPreTokenizer`); anything else (a BPE or Unigram tokenizer, another normaliser) would tokenise
differently from the model's training and is a one-line error.

The casing is the normaliser's `lowercase` (`tokenizer_config.json`'s `do_lower_case` still wins, see
`clinical_bert_jax.vocab.read_do_lower_case`). `strip_accents` must be unset or equal to `lowercase`: Google's
tokenizer strips accents exactly when it lower-cases.

These functions are meant to be absorbed by the vocabulary module (one owner of vocabulary reading).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from clinical_bert_jax.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
VOCAB_TXT = "vocab.txt"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Google's WordpieceTokenizer turns a longer word into [UNK]; `tokenizers` (and transformers) default to 100.
GOOGLE_MAX_INPUT_CHARS_PER_WORD = 200

_materialised: dict[str, Path] = {}
_temp_root: str | None = None


def _load(path: Path) -> dict[str, Any]:
  try:
    content = json.loads(path.read_text(encoding="utf-8"))
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
  """(tokens in id order, do_lower_case) of a BERT WordPiece `tokenizer.json`; UserError for anything else."""
  path = Path(path)
  content = _load(path)
  model = content.get("model") or {}
  if model.get("type") != "WordPiece":
    raise _not_bert(path, f"model type {model.get('type')!r}")
  if model.get("continuing_subword_prefix", "##") != "##":
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
  for token, token_id in vocab.items():
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


def tokenizer_json_for(tokens: Sequence[str], do_lower_case: bool) -> str:
  """A `tokenizer.json` that tokenises like Google's `FullTokenizer(vocab, do_lower_case)` on ordinary text.

  WordPiece keeps Google's 200-character word limit. Where the Rust `BertNormalizer` differs from Google's Python
  (it also drops private-use and unassigned characters, and uses its own Unicode tables; see
  `clinical_bert_jax.tokenization`), text with such characters can tokenise differently: `model_card_notes` says so.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from tokenizers import AddedToken

  vocab = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  tokenizer = Tokenizer(
    models.WordPiece(
      vocab=vocab,
      unk_token="[UNK]",
      continuing_subword_prefix="##",
      max_input_chars_per_word=GOOGLE_MAX_INPUT_CHARS_PER_WORD,
    )
  )
  tokenizer.normalizer = normalizers.BertNormalizer(
    clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=do_lower_case
  )
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece(prefix="##")
  present = [token for token in SPECIAL_TOKENS if token in vocab]
  tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in present])
  if "[CLS]" in vocab and "[SEP]" in vocab:
    tokenizer.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]",
      pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
  return tokenizer.to_str(pretty=True)


MODEL_CARD_TOKENIZER_NOTE = (
  "`tokenizer.json` reproduces Google's BERT tokenizer (the one that built the pretraining data), its 200-character "
  "word limit included. It differs only on rare input: the Rust normaliser drops private-use and unassigned "
  "characters that Google's keeps, lower-cases a word-final capital sigma to σ rather than ς, and keeps a literal "
  "`[MASK]`/`[CLS]` in the text as one special token. `vocab.txt` with `clinical_bert_jax.tokenization."
  "FullTokenizer` is exact."
)
