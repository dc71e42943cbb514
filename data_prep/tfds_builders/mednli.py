"""TFDS builder `mednli`: MedNLI premise/hypothesis pairs (Romanov & Shivade 2018), manual download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import tensorflow_datasets as tfds

from clinical_bert_jax.errors import UserError
from data_prep.tfds_builders import common

# Label ids as in ClinicalBERT's run_classifier.py (contradiction 0, entailment 1, neutral 2).
LABELS = ("contradiction", "entailment", "neutral")
REQUIRED_KEYS = ("pairID", "sentence1", "sentence2", "gold_label")
# The official names are mli_{train,dev,test}_v1.jsonl; any single *<split>*.jsonl is accepted.
SPLIT_PATTERNS = {"train": ("*train*.jsonl",), "dev": ("*dev*.jsonl",), "test": ("*test*.jsonl",)}


def read_mednli_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
  """(line number, pair) for every non-blank line; UserError with file:line for JSON or schema problems."""
  with open(path, "rb") as handle:
    for line_number, raw in enumerate(handle, start=1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError:
        raise UserError(f"{path}:{line_number}: not valid UTF-8; re-encode the file as UTF-8") from None
      except json.JSONDecodeError as error:
        raise UserError(
          f"{path}:{line_number}: not valid JSON (column {error.colno}); one JSON object per line"
        ) from None
      if not isinstance(record, dict):
        raise UserError(f"{path}:{line_number}: expected a JSON object")
      missing = [key for key in REQUIRED_KEYS if not isinstance(record.get(key), str)]
      if missing:
        raise UserError(
          f"{path}:{line_number}: missing or non-string key(s) {', '.join(missing)}; MedNLI lines need "
          f"{', '.join(REQUIRED_KEYS)}"
        )
      if record["gold_label"] not in LABELS:
        raise UserError(f"{path}:{line_number}: gold_label is not one of {', '.join(LABELS)}")
      yield line_number, record


class Mednli(common.ManualArrayRecordBuilder):
  """MedNLI: natural language inference pairs from MIMIC-III notes."""

  name = "mednli"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: train/dev/test of MedNLI v1.0.0."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put mli_train_v1.jsonl, mli_dev_v1.jsonl and mli_test_v1.jsonl (MedNLI v1.0.0) in the manual directory.
  MedNLI is credentialed data on PhysioNet (https://physionet.org/content/mednli/1.0.0/): it needs a
  credentialed PhysioNet account and the signed data use agreement. Subdirectories are searched, so the
  extracted release folder can be placed there as is.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="MedNLI premise/hypothesis pairs with gold labels; label ids follow ClinicalBERT's "
      "run_classifier.py (contradiction 0, entailment 1, neutral 2).",
      features=tfds.features.FeaturesDict(
        {
          "pair_id": tfds.features.Text(),
          "premise": tfds.features.Text(),
          "hypothesis": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=LABELS),
        }
      ),
      supervised_keys=None,
      homepage="https://physionet.org/content/mednli/1.0.0/",
      citation="Romanov and Shivade, Lessons from Natural Language Inference in the Clinical Domain, EMNLP 2018.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual = self.manual_path(dl_manager)
    return {
      split: self._generate_examples(common.find_one_file(manual, patterns, f"MedNLI {split} split"))
      for split, patterns in SPLIT_PATTERNS.items()
    }

  def _generate_examples(self, path: Path):
    seen: dict[str, int] = {}
    for line_number, record in read_mednli_jsonl(path):
      pair_id = record["pairID"]
      if pair_id in seen:
        raise UserError(f"{path}:{line_number}: pairID repeats the one at line {seen[pair_id]}; pairIDs must be unique")
      seen[pair_id] = line_number
      yield (
        pair_id,
        {
          "pair_id": pair_id,
          "premise": record["sentence1"],
          "hypothesis": record["sentence2"],
          "label": record["gold_label"],
        },
      )
