"""MedNLI: reading the JSONL splits, `[CLS] A [SEP] B [SEP]` features, accuracy, the predictions file.

Follows the original `run_classifier.py` (clinicalbert-paper.md §6): premise = `sentence1` (segment 0),
hypothesis = `sentence2` (segment 1), labels contradiction/entailment/neutral → 0/1/2, the pair truncated
longest-first (ties cut the hypothesis) to max_seq_length − 3 word pieces.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.eval_tasks.hf_checkpoint import WordPieceEncoder

LABELS = ("contradiction", "entailment", "neutral")
# Only lower-case words are echoed in errors: a capitalised word in the label field may be a name (PHI).
LABEL_SHAPE = re.compile(r"[a-z_-]{1,20}")
REQUIRED_KEYS = ("pairID", "sentence1", "sentence2", "gold_label")
SPLITS = ("train", "dev", "test")
# Words that name a split inside a file name (`mli_dev_v1.jsonl`, `snli_mednli_schema_dev.jsonl`, `devel.jsonl`).
SPLIT_NAME_WORDS = {"train": ("train",), "dev": ("dev", "devel", "validation"), "test": ("test",)}


@dataclasses.dataclass(frozen=True)
class NliPair:
  pair_id: str
  premise: str
  hypothesis: str
  label: int


def find_split_files(data_dir: str | Path) -> dict[str, Path]:
  """One `*.jsonl` per split, recognised by a split word in its name (MedNLI's own `mli_train_v1.jsonl` included)."""
  directory = Path(data_dir)
  if not directory.is_dir():
    raise UserError(f"--data_dir={directory} is not a directory; pass the folder holding the MedNLI jsonl files")
  files = sorted(directory.glob("*.jsonl"))
  found = {}
  for split in SPLITS:
    matches = [
      path for path in files if any(word in SPLIT_NAME_WORDS[split] for word in re.split(r"[^a-z]+", path.stem.lower()))
    ]
    if not matches:
      raise UserError(
        f"--data_dir={directory}: no {split} split file; expected e.g. mli_{split}_v1.jsonl "
        f"(a *.jsonl whose name contains '{split}')"
      )
    if len(matches) > 1:
      raise UserError(
        f"--data_dir={directory}: several {split} files ({', '.join(p.name for p in matches)}); keep one per split"
      )
    found[split] = matches[0]
  return found


def read_jsonl(path: Path) -> list[NliPair]:
  """Reads one split; every problem is reported as file:line without echoing the sentences."""
  pairs = []
  with open(path, "rb") as handle:
    for line_number, raw in enumerate(handle, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        raise UserError(f"{path}:{line_number}: not valid UTF-8; re-encode the file as UTF-8") from None
      if line.strip():
        pairs.append(_parse_record(line, path, line_number))
  if not pairs:
    raise UserError(f"{path} holds no examples")
  return pairs


def _parse_record(line: str, path: Path, line_number: int) -> NliPair:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    raise UserError(f"{path}:{line_number}: not valid JSON ({error.msg}, column {error.colno})") from None
  if not isinstance(record, dict):
    raise UserError(f"{path}:{line_number}: expected a JSON object per line")
  missing = [key for key in REQUIRED_KEYS if key not in record]
  if missing:
    raise UserError(
      f"{path}:{line_number}: missing key(s) {', '.join(missing)}; MedNLI lines need {', '.join(REQUIRED_KEYS)}"
    )
  label = record["gold_label"]
  if label not in LABELS:
    # Echo the value only when it looks like a label: a file with swapped fields must not leak a sentence.
    shown = repr(label) if isinstance(label, str) and LABEL_SHAPE.fullmatch(label) else "(not label-shaped)"
    raise UserError(
      f"{path}:{line_number}: unknown gold_label {shown}; expected one of {', '.join(LABELS)} "
      "(drop unlabelled '-' rows)"
    )
  if not all(isinstance(record[key], str) for key in ("sentence1", "sentence2")):
    raise UserError(f"{path}:{line_number}: sentence1 and sentence2 must be strings")
  return NliPair(str(record["pairID"]), record["sentence1"], record["sentence2"], LABELS.index(label))


def load_splits(data_dir: str | Path) -> dict[str, list[NliPair]]:
  return {split: read_jsonl(path) for split, path in find_split_files(data_dir).items()}


def truncate_pair(tokens_a: list[int], tokens_b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
  """Longest-first truncation from the end; on equal length the second sequence loses a piece (Google's rule)."""
  tokens_a, tokens_b = list(tokens_a), list(tokens_b)
  while len(tokens_a) + len(tokens_b) > max_tokens:
    (tokens_a if len(tokens_a) > len(tokens_b) else tokens_b).pop()
  return tokens_a, tokens_b


def featurize(pairs: Sequence[NliPair], encoder: WordPieceEncoder, max_seq_length: int) -> list[dict]:
  premises = encoder.encode_texts([pair.premise for pair in pairs])
  hypotheses = encoder.encode_texts([pair.hypothesis for pair in pairs])
  examples = []
  for pair, premise, hypothesis in zip(pairs, premises, hypotheses):
    premise, hypothesis = truncate_pair(premise, hypothesis, max_seq_length - 3)
    input_ids = [encoder.cls_id, *premise, encoder.sep_id, *hypothesis, encoder.sep_id]
    examples.append(
      {
        "input_ids": input_ids,
        "token_type_ids": [0] * (len(premise) + 2) + [1] * (len(hypothesis) + 1),
        "label": pair.label,
      }
    )
  return examples


def accuracy(pairs: Sequence[NliPair], predictions: Sequence[int]) -> dict[str, float]:
  gold = np.array([pair.label for pair in pairs])
  return {"accuracy": float(np.mean(gold == np.asarray(predictions)))}


def write_predictions(handle, pairs: Sequence[NliPair], predictions: Sequence[int]) -> None:
  """`pairID<TAB>gold<TAB>pred` per line (tab-separated: pair ids are free-form strings)."""
  for pair, prediction in zip(pairs, predictions):
    handle.write(f"{pair.pair_id}\t{LABELS[pair.label]}\t{LABELS[int(prediction)]}\n")


class MedNliTask:
  """The MedNLI task as `evaluate` drives it: features of the three splits, the head, scoring, predictions file."""

  metric = "accuracy"
  num_labels = len(LABELS)
  optimizer = "bert_adam_pt"  # run_classifier.py trained with pytorch-pretrained-bert's BertAdam

  def __init__(
    self,
    data_dir: str | Path,
    encoder: WordPieceEncoder,
    max_seq_length: int,
    max_train_examples: int | None,
    max_eval_examples: int | None,
  ):
    splits = load_splits(data_dir)
    self.pairs = {
      "train": splits["train"][:max_train_examples],
      "dev": splits["dev"][:max_eval_examples],
      "test": splits["test"][:max_eval_examples],
    }
    self.train, self.dev, self.test = (featurize(self.pairs[split], encoder, max_seq_length) for split in SPLITS)

  @property
  def model_class(self) -> type:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification

  def score(self, split: str, predictions: Sequence[int]) -> tuple[dict[str, float], list[int]]:
    return accuracy(self.pairs[split], predictions), [int(prediction) for prediction in predictions]

  def write_test_predictions(self, handle, predictions: Sequence[int]) -> None:
    write_predictions(handle, self.pairs["test"], predictions)

  def details(self) -> dict:
    return {"labels": list(LABELS)}
