"""BERT hyperparameters, read from and written to the two formats users hold.

Hugging Face `config.json` and Google's `bert_config.json` carry the same numbers under mostly the same names; the traps
are in the defaults (Google's code defaults `type_vocab_size` to 16, HF to 2) and in `hidden_act`, where `gelu` means
the exact erf form in both and `gelu_new` the tanh approximation (bert-pretraining.md §4).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from clinical_bert_jax.errors import UserError

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "relu")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT architecture. Field names follow Hugging Face's `BertConfig`."""

  vocab_size: int = 28996
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise UserError(f"hidden_act={self.hidden_act!r} is not supported; use one of {', '.join(SUPPORTED_ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise UserError(
        f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
        f"{self.num_attention_heads}; fix the model config"
      )
    for name in (
      "vocab_size",
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "intermediate_size",
      "max_position_embeddings",
      "type_vocab_size",
    ):
      if getattr(self, name) <= 0:
        raise UserError(f"model config field {name}={getattr(self, name)} must be positive")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def replace(self, **changes: Any) -> "BertConfig":
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------- dict forms
  @classmethod
  def from_dict(cls, values: dict[str, Any], source: str = "config") -> "BertConfig":
    """Builds a config from an HF or Google dict; unknown keys (architectures, model_type, ...) are ignored.

    Google's `bert_config.json` has no `layer_norm_eps` (TF used 1e-12) and its code defaults `type_vocab_size` to 16;
    released configs always spell it out, so a missing value takes HF's default of 2.
    """
    known = {field.name for field in dataclasses.fields(cls)}
    kwargs = {key: values[key] for key in known if key in values}
    missing = [
      key
      for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
      if key not in kwargs
    ]
    if missing:
      raise UserError(f"{source} is not a BERT config: missing {', '.join(missing)}")
    if values.get("model_type") not in (None, "bert"):
      raise UserError(f"{source} has model_type={values['model_type']!r}; only BERT checkpoints are supported")
    try:
      return cls(**kwargs)
    except TypeError as error:
      raise UserError(f"{source}: {error}") from None

  def to_hf_dict(self, architectures: tuple[str, ...] = ("BertForPreTraining",)) -> dict[str, Any]:
    values = dataclasses.asdict(self)
    values.update(
      architectures=list(architectures), model_type="bert", position_embedding_type="absolute", tie_word_embeddings=True
    )
    return values

  def to_google_dict(self) -> dict[str, Any]:
    values = dataclasses.asdict(self)
    del values["layer_norm_eps"], values["pad_token_id"]  # not part of Google's config (TF hard-codes 1e-12)
    return values

  # --------------------------------------------------------------- file forms
  @classmethod
  def load(cls, path: str | os.PathLike) -> "BertConfig":
    """Reads an HF `config.json` or Google `bert_config.json` (a directory means `DIR/config.json`)."""
    path = Path(path)
    if path.is_dir():
      path = path / "config.json"
    try:
      values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
      raise UserError(f"model config {path} not found; pass a config.json or bert_config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
      raise UserError(f"model config {path} cannot be read as JSON ({error})") from None
    if not isinstance(values, dict):
      raise UserError(f"model config {path} is not a JSON object")
    return cls.from_dict(values, source=str(path))

  def save_hf(self, path: str | os.PathLike, **extra: Any) -> None:
    _write_json(path, {**self.to_hf_dict(), **extra})

  def save_google(self, path: str | os.PathLike) -> None:
    """Google's `bert_config.json`, for users who go back to the TF1 scripts."""
    _write_json(path, self.to_google_dict())


def _write_json(path: str | os.PathLike, values: dict[str, Any]) -> None:
  from clinical_bert_jax.fileio import atomic_write

  with atomic_write(path) as handle:
    json.dump(values, handle, indent=2, sort_keys=True)
    handle.write("\n")
