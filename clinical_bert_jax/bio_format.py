"""BIO CoNLL files: one `word<TAB>label` per line, a blank line between sentences.

This is the exchange format between the i2b2 converters (`data_prep.i2b2`), the TFDS builders and the NER evaluator,
and the format of the public BioBERT-style NER sets (e.g. NCBI-disease). Reading also accepts a single space as the
separator (the original ClinicalBERT converters printed `word label`).

Words come from clinical notes, so nothing here ever puts a word into an error message: malformed input is reported
by `file:line` only, and label values are echoed only when they look like BIO labels (a file with swapped columns
would otherwise leak its words through the "unknown label" message).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.fileio import atomic_write

SPLITS = ("train", "dev", "test")
# The entity types of each i2b2 task in the original run_ner.py's label order (the BIO labels follow it).
I2B2_ENTITY_TYPES = {
  "2006": ("ID", "HOSPITAL", "PATIENT", "PHONE", "DATE", "DOCTOR", "LOCATION", "AGE"),
  "2010": ("problem", "treatment", "test"),
  "2012": ("OCCURRENCE", "EVIDENTIAL", "TREATMENT", "CLINICAL_DEPT", "PROBLEM", "TEST"),
  "2014": (
    "IDNUM",
    "HOSPITAL",
    "PATIENT",
    "PHONE",
    "DATE",
    "DOCTOR",
    "LOCATION-OTHER",
    "AGE",
    "BIOID",
    "STATE",
    "ZIP",
    "HEALTHPLAN",
    "ORGANIZATION",
    "MEDICALRECORD",
    "CITY",
    "STREET",
    "COUNTRY",
    "URL",
    "USERNAME",
    "PROFESSION",
    "FAX",
    "EMAIL",
    "DEVICE",
  ),
}
# BioBERT-style NER sets name the dev split `devel.tsv`; accepted when `dev.tsv` is absent.
_DEV_ALIAS = "devel.tsv"
# Characters that would break the line/column structure if they appeared inside a word or label.
_FORBIDDEN_IN_FIELDS = ("\t", "\n", "\r")
_LABEL_SHAPE = re.compile(r"O|[BIESLU]-[A-Za-z][A-Za-z0-9_.\-]{0,40}|X|\[CLS\]|\[SEP\]")
_MAX_LABELS_SHOWN = 8


@dataclasses.dataclass(frozen=True)
class Sentence:
  """One sentence: parallel word and label tuples.

  `line_number` is the 1-based line of the first word in the file it was read from (0 when built in memory); it only
  serves error messages and is ignored by `==`.
  """

  words: tuple[str, ...]
  labels: tuple[str, ...]
  line_number: int = dataclasses.field(default=0, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "words", tuple(self.words))
    object.__setattr__(self, "labels", tuple(self.labels))
    if len(self.words) != len(self.labels):
      raise ValueError(f"Sentence has {len(self.words)} words but {len(self.labels)} labels")

  def __len__(self) -> int:
    return len(self.words)


def describe_label(value: str) -> str:
  """`value` quoted when it has the shape of a tag label, otherwise a placeholder: never echo note words."""
  return repr(value) if _LABEL_SHAPE.fullmatch(value) else "<a value that is not label-shaped>"


def _parse_line(line: str, path: Path, line_number: int) -> tuple[str, str]:
  fields = line.split("\t") if "\t" in line else line.split(" ")
  if len(fields) != 2 or not fields[0] or not fields[1]:
    raise UserError(
      f"{path}:{line_number}: expected 'word<TAB>label' (or 'word label'), found {len(fields)} "
      f"field(s){' with an empty one' if len(fields) == 2 else ''}; fix or remove that line"
    )
  return fields[0], fields[1]


def read_bio(path: str | os.PathLike) -> list[Sentence]:
  """Reads a BIO file; blank (or whitespace-only) lines separate sentences, runs of them are allowed."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"{path}: BIO file not found; check the path")
  sentences: list[Sentence] = []
  words: list[str] = []
  labels: list[str] = []
  first_line = 0
  with open(path, "rb") as handle:
    for line_number, raw in enumerate(handle, start=1):
      try:
        line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
      except UnicodeDecodeError:
        raise UserError(f"{path}:{line_number}: not valid UTF-8; re-encode the file as UTF-8") from None
      line = line.rstrip(" \t\r\n")
      if not line.strip():
        if words:
          sentences.append(Sentence(words, labels, first_line))
          words, labels = [], []
        continue
      word, label = _parse_line(line, path, line_number)
      if not words:
        first_line = line_number
      words.append(word)
      labels.append(label)
  if words:
    sentences.append(Sentence(words, labels, first_line))
  return sentences


def write_bio(path: str | os.PathLike, sentences: Iterable[Sentence]) -> None:
  """Writes `word<TAB>label` lines with a blank line after every sentence, atomically.

  Raises ValueError for a sentence the format cannot represent (empty, or a tab/newline inside a word or label):
  that is a bug in the caller, not bad user input.
  """
  with atomic_write(path) as handle:
    for index, sentence in enumerate(sentences):
      if not sentence.words:
        raise ValueError(f"sentence {index} is empty; BIO files cannot represent empty sentences")
      for position, (word, label) in enumerate(zip(sentence.words, sentence.labels)):
        if not word or not label or any(c in word or c in label for c in _FORBIDDEN_IN_FIELDS):
          raise ValueError(f"sentence {index}, word {position}: empty or contains a tab/newline")
        handle.write(f"{word}\t{label}\n")
      handle.write("\n")


def validate_labels(sentences: Iterable[Sentence], allowed: Iterable[str], source: str | os.PathLike = "") -> None:
  """Raises UserError naming every label outside `allowed` (with counts and the first line where it occurs)."""
  allowed = set(allowed)
  counts: collections.Counter[str] = collections.Counter()
  first_seen: dict[str, int] = {}
  for sentence in sentences:
    for label in sentence.labels:
      if label not in allowed:
        counts[label] += 1
        first_seen.setdefault(label, sentence.line_number)
  if not counts:
    return
  shown = [
    f"{describe_label(label)} x{count}"
    + (f" (first in the sentence at line {first_seen[label]})" if first_seen[label] else "")
    for label, count in counts.most_common(_MAX_LABELS_SHOWN)
  ]
  more = f" and {len(counts) - _MAX_LABELS_SHOWN} more" if len(counts) > _MAX_LABELS_SHOWN else ""
  where = f"{source}: " if source else ""
  raise UserError(
    f"{where}{sum(counts.values())} word(s) carry labels outside the allowed set: {', '.join(shown)}"
    f"{more}; allowed: {', '.join(sorted(allowed))}; fix the labels or the label list"
  )


def load_bio_dir(directory: str | os.PathLike) -> dict[str, list[Sentence]]:
  """Reads `train.tsv`, `dev.tsv` (or `devel.tsv`) and `test.tsv` from `directory` into `{split: sentences}`."""
  directory = Path(directory)
  if not directory.is_dir():
    raise UserError(f"{directory}: not a directory; expected one holding train.tsv, dev.tsv and test.tsv")
  files = {split: directory / f"{split}.tsv" for split in SPLITS}
  if not files["dev"].is_file() and (directory / _DEV_ALIAS).is_file():
    files["dev"] = directory / _DEV_ALIAS
  missing = [path.name for path in files.values() if not path.is_file()]
  if missing:
    raise UserError(
      f"{directory}: missing {', '.join(missing)}; a BIO data directory needs train.tsv, dev.tsv "
      f"(or {_DEV_ALIAS}) and test.tsv"
    )
  splits = {split: read_bio(path) for split, path in files.items()}
  empty = [files[split].name for split, sentences in splits.items() if not sentences]
  if empty:
    raise UserError(f"{directory}: {', '.join(empty)} contain(s) no sentences")
  return splits


def read_label_list(path: str | os.PathLike) -> list[str]:
  """Reads a `labels.txt` (one label per line, in id order)."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"{path}: label list not found")
  labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  duplicates = sorted(label for label, count in collections.Counter(labels).items() if count > 1)
  if duplicates:
    raise UserError(f"{path}: duplicate labels {', '.join(map(describe_label, duplicates))}; each label once")
  return labels


def write_label_list(path: str | os.PathLike, labels: Sequence[str]) -> None:
  with atomic_write(path) as handle:
    handle.write("".join(f"{label}\n" for label in labels))


def label_counts(sentences: Iterable[Sentence]) -> dict[str, int]:
  """Label → number of words carrying it, most frequent first (for manifests and sanity checks)."""
  counts = collections.Counter(label for sentence in sentences for label in sentence.labels)
  return dict(counts.most_common())


def bio_label_list(entity_types: Sequence[str]) -> list[str]:
  """`B-T, I-T` for each type in order, then `O`: the label order of the original `run_ner.py` label lists."""
  return [f"{prefix}-{entity_type}" for entity_type in entity_types for prefix in ("B", "I")] + ["O"]


def split_counts(splits: Mapping[str, Sequence[Sentence]]) -> dict[str, dict[str, object]]:
  """Sentences, words and label counts per split."""
  return {
    split: {"sentences": len(sentences), "words": sum(len(s) for s in sentences), "labels": label_counts(sentences)}
    for split, sentences in splits.items()
  }
