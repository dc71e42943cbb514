"""Vocabulary files and the one casing rule both the JAX and the PyTorch side use.

`do_lower_case` comes from `tokenizer_config.json` when it has the key, else (in a directory without vocab.txt, as
transformers 5 saves it) from `tokenizer.json`'s normaliser (`clinical_bert_jax.hf_tokenizer_json`). Otherwise the
vocabulary decides: a vocabulary with upper-case word pieces belongs to a cased model. That is what
`emilyalsentzer/Bio_ClinicalBERT` needs (it ships no tokenizer_config.json and is cased; transformers' default of
lower-casing silently degrades it, ClinicalBERT issue #26), and an uncased vocabulary without the file is still
lower-cased.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from absl import logging

from clinical_bert_jax.errors import UserError


def read_vocab(vocab_file: str | os.PathLike) -> list[str]:
  try:
    with open(vocab_file, encoding="utf-8") as handle:
      return [line.rstrip("\n").strip() for line in handle]
  except FileNotFoundError:
    raise UserError(f"vocab file {vocab_file} not found") from None
  except OSError as error:
    raise UserError(f"vocab file {vocab_file} cannot be read ({error.strerror}); pass a vocab.txt file") from None
  except UnicodeDecodeError:
    raise UserError(f"vocab file {vocab_file} is not UTF-8 text") from None


def vocab_is_cased(tokens: list[str]) -> bool:
  """True when some word piece (not a bracketed special like [CLS] or [unused0]) has an upper-case letter."""
  return any(any(ch.isupper() for ch in token) for token in tokens
             if not (token.startswith("[") and token.endswith("]")))


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
  logging.info("%s: no do_lower_case in tokenizer_config.json; the vocabulary is %s, so do_lower_case=%s",
               directory, "uncased" if lower else "cased", lower)
  return lower
