"""A Hugging Face BERT directory as the PyTorch evaluators and `embed` use it: checks, tokenizer, device.

Checks happen up front so that a wrong `--model_dir` costs one line, not a traceback from deep inside transformers.
Weights are only ever read by transformers' `from_pretrained` (safetensors, or `torch.load(weights_only=True)` for
`pytorch_model.bin`); remote code is never trusted. Our own checkpoints (a model directory with
`flax_params.safetensors`, or a pretraining workdir) are accepted too: they are exported to a temporary HF directory
first with `clinical_bert_jax.convert.export_hf`, the same export `convert to_hf` runs.

Casing follows `clinical_bert_jax.vocab.read_do_lower_case`, the same rule the JAX side uses: tokenizer_config.json
when it says, else the vocabulary (Bio_ClinicalBERT, which ships no tokenizer_config.json, is cased).
"""

from __future__ import annotations

import dataclasses
import logging as python_logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from absl import logging

from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.tokenization import FullTokenizer
from clinical_bert_jax.vocab import (
  CLS_TOKEN,
  PAD_TOKEN,
  SEP_TOKEN,
  UNK_TOKEN,
  missing_special_tokens,
  read_do_lower_case,
  vocab_file_in,
)

if TYPE_CHECKING:  # torch is imported where it is used, so that input checks fail fast without loading it
  import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The special tokens fine-tuning needs (vocab.py's table; no [MASK]).
REQUIRED_SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN)
# Markers of our own checkpoints (docs/ARCHITECTURE.md): a model directory, or a pretraining workdir.
OUR_PARAMS_FILE = "flax_params.safetensors"
WORKDIR_CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class HfCheckpoint:
  directory: Path  # the HF directory that is loaded (a temporary export for our own checkpoints)
  config: BertConfig
  vocab_file: Path
  do_lower_case: bool
  source: Path  # what the user passed
  export: tempfile.TemporaryDirectory | None = None  # keeps a temporary export alive as long as the checkpoint

  @property
  def name(self) -> str:
    return self.source.resolve().name


def open_checkpoint(model_dir: str | Path, flag: str = "--model_dir") -> HfCheckpoint:
  """Validates an HF BERT directory (config.json of a BERT, weights, vocab.txt) and reads its casing.

  One of our checkpoints is exported to a temporary HF directory first (see the module docstring). A `gs://`
  directory is copied down first (a pretraining workdir is read in place by the export).
  """
  from clinical_bert_jax import fileio

  if fileio.is_remote(model_dir):
    remote = fileio.as_path(model_dir)
    fileio.check_bucket(remote, flag)
    if (remote / WORKDIR_CHECKPOINTS).is_dir():
      export = tempfile.TemporaryDirectory(prefix="clinical_bert_jax_export_")
      exported = Path(export.name) / (remote.name or "hf")
      _export_to_hf(remote, exported, flag)
      return dataclasses.replace(_open_hf_dir(exported, flag), export=export)
    model_dir = fileio.local_copy(model_dir, flag)
  directory = Path(model_dir)
  if not directory.is_dir():
    raise UserError(f"{flag}={directory} is not a directory; pass a Hugging Face BERT model directory")
  if (directory / OUR_PARAMS_FILE).is_file() or (directory / WORKDIR_CHECKPOINTS).is_dir():
    export = tempfile.TemporaryDirectory(prefix="clinical_bert_jax_export_")
    exported = Path(export.name) / "hf"
    _export_to_hf(directory, exported, flag)
    checkpoint = _open_hf_dir(exported, flag)
    return dataclasses.replace(checkpoint, source=directory, export=export)
  return _open_hf_dir(directory, flag)


def _export_to_hf(directory: Path, output_dir: Path, flag: str) -> None:
  """The same export (with its PyTorch logits check) that `convert to_hf` runs."""
  from clinical_bert_jax import convert, model_io

  logging.info(
    "%s=%s is one of our checkpoints: exporting it to Hugging Face format in %s", flag, directory, output_dir
  )
  try:
    convert.export_hf(model_io.load_model(directory), output_dir)
  except UserError as error:
    raise UserError(f"{flag}={directory}: export to Hugging Face format failed: {error}") from None


def _open_hf_dir(directory: Path, flag: str) -> HfCheckpoint:
  if not (directory / "config.json").is_file():
    raise UserError(
      f"{flag}={directory} is not a BERT checkpoint: no config.json (expected config.json, "
      "model.safetensors or pytorch_model.bin, vocab.txt or tokenizer.json)"
    )
  config = BertConfig.load(directory / "config.json")
  if not any((directory / name).is_file() for name in WEIGHT_FILES):
    raise UserError(f"{flag}={directory} is not a BERT checkpoint: neither {' nor '.join(WEIGHT_FILES)} found")
  vocab_file = vocab_file_in(directory)
  if vocab_file is None:
    raise UserError(
      f"{flag}={directory} has neither vocab.txt nor tokenizer.json; copy the vocabulary the model was "
      "trained with into it"
    )
  return HfCheckpoint(directory, config, vocab_file, bool(read_do_lower_case(directory, vocab_file)), source=directory)


def load_pretrained(checkpoint: HfCheckpoint, model_class: type, **kwargs: Any) -> torch.nn.Module:
  """`model_class.from_pretrained(directory)` with bad files turned into one-line errors.

  New task heads are initialised from torch's global RNG, so call this after seeding. transformers' report of the
  newly initialised head (and of the unused pretraining heads) is expected here and silenced.
  """
  from safetensors import SafetensorError
  from transformers.utils import logging as transformers_logging

  transformers_logging.disable_progress_bar()
  transformers_logger = python_logging.getLogger("transformers")
  previous_level = transformers_logger.level
  transformers_logger.setLevel(python_logging.ERROR)
  try:
    return model_class.from_pretrained(str(checkpoint.directory), trust_remote_code=False, **kwargs)
  except SafetensorError as error:
    raise UserError(
      f"{checkpoint.directory}: damaged safetensors file ({error}); re-download or re-export it"
    ) from None
  except (OSError, ValueError, RuntimeError, KeyError) as error:
    reason = " ".join(str(error).split())[:300]
    raise UserError(
      f"{checkpoint.directory}: cannot load the BERT weights ({type(error).__name__}: {reason})"
    ) from None
  finally:
    transformers_logger.setLevel(previous_level)


def resolve_device(name: str) -> torch.device:
  """`auto` picks CUDA when present; asking for `cuda` without one is a user error, not a silent CPU run."""
  import torch

  if name == "auto":
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if name == "cuda" and not torch.cuda.is_available():
    raise UserError("--device=cuda but no CUDA device is visible to torch; use --device=cpu or --device=auto")
  if name not in ("cpu", "cuda"):
    raise UserError(f"--device={name} is not one of auto, cpu, cuda")
  return torch.device(name)


class WordPieceEncoder:
  """Word-piece ids for the evaluators: Google's `FullTokenizer` (exactly what pretraining used) plus special ids."""

  def __init__(self, vocab_file: Path, do_lower_case: bool):
    self.tokenizer = FullTokenizer(vocab_file, do_lower_case)
    missing = missing_special_tokens(self.tokenizer.vocab, REQUIRED_SPECIAL_TOKENS)
    if missing:
      raise UserError(f"{vocab_file} lacks the special tokens {', '.join(missing)}; it is not a BERT vocabulary")
    self.pad_id, self.cls_id, self.sep_id = (self.tokenizer.vocab[token] for token in (PAD_TOKEN, CLS_TOKEN, SEP_TOKEN))

  @classmethod
  def for_checkpoint(cls, checkpoint: HfCheckpoint) -> "WordPieceEncoder":
    return cls(checkpoint.vocab_file, checkpoint.do_lower_case)

  def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
    """Word-piece ids of each text, without [CLS]/[SEP]."""
    return self.tokenizer.encode_batch(texts)

  def encode_words(self, sentences: Sequence[Sequence[str]]) -> list[tuple[list[int], list[int]]]:
    """Per sentence of words: (word-piece ids, index of the word each piece came from).

    Each word is tokenised on its own, as the original NER code did; a word that tokenises to nothing (only control
    characters) has no pieces.
    """
    pieces = iter(self.tokenizer.encode_batch([word for words in sentences for word in words]))
    encoded = []
    for words in sentences:
      ids: list[int] = []
      word_ids: list[int] = []
      for word_index in range(len(words)):
        word_pieces = next(pieces)
        ids.extend(word_pieces)
        word_ids.extend([word_index] * len(word_pieces))
      encoded.append((ids, word_ids))
    return encoded
