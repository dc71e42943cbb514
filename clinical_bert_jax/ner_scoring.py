"""Exact-span NER scoring with the semantics of the ClinicalBERT evaluation scripts.

The paper's i2b2 F1 is not `conlleval` and not a token metric: it is what the original three-step pipeline computes
(`ner_detokenize.py` → `format_for_i2b2_eval.py` → `score_i2b2.py`, see clinicalbert-paper.md §7.4):

1. sub-token predictions become word labels: a word takes the label predicted on its FIRST sub-token; the placeholder
   labels `X`, `[CLS]`, `[SEP]` mean `O`; words that got no sub-token (lost to truncation) are `O`, and so is the
   word whose pieces straddle the length cut;
2. an orphan `I-T` (at sentence start, after `O`, or after a different type) is read as `B-T`, for gold and
   predictions alike, and BIO runs become concepts (sentence index, first word, last word, type);
3. micro precision/recall/F1 of exact concept matches, pooled over all types: no partial credit.

Reproducing these rules (rather than a stricter BIO reading that drops orphan `I-`) is what makes our numbers
comparable with the paper's Table 2. The module also scores a `word gold pred` file:
`python -m clinical_bert_jax.ner_scoring --predictions=test_predictions.txt`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, NamedTuple, Sequence

from clinical_bert_jax.errors import UserError

OUTSIDE = "O"
# Labels the original tagger predicts on positions that are not a word's first sub-token; they all mean "no concept".
NON_WORD_LABELS = frozenset({"X", "[CLS]", "[SEP]"})


class Concept(NamedTuple):
  """One entity mention: word offsets are 0-based and inclusive, like the i2b2 concept files."""

  sentence: int
  start: int
  end: int
  type: str


@dataclasses.dataclass(frozen=True)
class SpanScores:
  precision: float
  recall: float
  f1: float
  num_gold: int
  num_predicted: int
  num_correct: int

  def as_dict(self) -> dict[str, float | int]:
    return dataclasses.asdict(self)


def first_subtoken_word_labels(
  token_labels: Sequence[str], token_word_ids: Sequence[int | None], num_words: int, cut_word: int | None = None
) -> list[str]:
  """Word labels from per-sub-token labels: each word takes its first sub-token's label.

  `token_word_ids[i]` is the word that sub-token `i` belongs to (None for [CLS]/[SEP]/padding). Placeholder labels
  (`X`, `[CLS]`, `[SEP]`) become `O`, and words never reached by a sub-token (truncated away, or words the tokenizer
  reduces to nothing) stay `O`, as in the original `ner_detokenize.py`. `cut_word`, the word whose pieces straddle
  the length cut, is `O` too: the original skips a word with a piece at the cut position and pads the sentence
  with `O`.
  """
  if len(token_labels) != len(token_word_ids):
    raise ValueError(f"{len(token_labels)} token labels but {len(token_word_ids)} word ids")
  word_labels = [OUTSIDE] * num_words
  seen = set()
  for label, word in zip(token_labels, token_word_ids):
    if word is None or word in seen:
      continue
    if not 0 <= word < num_words:
      raise ValueError(f"word id {word} outside a sentence of {num_words} words")
    seen.add(word)
    word_labels[word] = OUTSIDE if label in NON_WORD_LABELS or word == cut_word else label
  return word_labels


def _split_label(label: str) -> tuple[str, str | None]:
  """`B-problem` → (`B`, `problem`); `O` and placeholders → (`O`, None). Types may contain `-` (LOCATION-OTHER)."""
  if label in NON_WORD_LABELS or label == OUTSIDE:
    return OUTSIDE, None
  prefix, sep, entity_type = label.partition("-")
  if sep != "-" or prefix not in ("B", "I") or not entity_type:
    raise ValueError(f"label {label!r} is not O, B-<type> or I-<type>")
  return prefix, entity_type


def repair_orphan_inside(labels: Sequence[str]) -> list[str]:
  """Rewrites every `I-T` that does not continue a `T` run (sentence start, after `O`, after another type) as `B-T`."""
  repaired = []
  previous_type = None
  for label in labels:
    prefix, entity_type = _split_label(label)
    if prefix == "I" and entity_type != previous_type:
      repaired.append(f"B-{entity_type}")
    else:
      repaired.append(OUTSIDE if prefix == OUTSIDE else label)
    previous_type = entity_type
  return repaired


def sentence_concepts(labels: Sequence[str], sentence_index: int) -> list[Concept]:
  """BIO runs of one sentence as concepts, after `repair_orphan_inside`."""
  concepts = []
  start = entity_type = None
  for position, label in enumerate(repair_orphan_inside(labels) + [OUTSIDE]):
    prefix, label_type = _split_label(label)
    if entity_type is not None and prefix != "I":
      concepts.append(Concept(sentence_index, start, position - 1, entity_type))
      entity_type = None
    if prefix == "B":
      start, entity_type = position, label_type
  return concepts


def corpus_concepts(sentences_labels: Iterable[Sequence[str]]) -> set[Concept]:
  return {concept for index, labels in enumerate(sentences_labels) for concept in sentence_concepts(labels, index)}


def score_concepts(gold: set[Concept], predicted: set[Concept]) -> SpanScores:
  """Exact-match micro P/R/F1; an empty denominator scores 0 (as `score_i2b2.py` would divide by zero instead)."""
  correct = len(gold & predicted)
  precision = correct / len(predicted) if predicted else 0.0
  recall = correct / len(gold) if gold else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return SpanScores(precision, recall, f1, len(gold), len(predicted), correct)


def score_sentences(gold_labels: Sequence[Sequence[str]], predicted_labels: Sequence[Sequence[str]]) -> SpanScores:
  """Scores word-level label sequences, one list per sentence, gold and predicted aligned."""
  if len(gold_labels) != len(predicted_labels):
    raise ValueError(f"{len(gold_labels)} gold sentences but {len(predicted_labels)} predicted")
  for index, (gold, predicted) in enumerate(zip(gold_labels, predicted_labels)):
    if len(gold) != len(predicted):
      raise ValueError(f"sentence {index}: {len(gold)} gold labels but {len(predicted)} predicted")
  return score_concepts(corpus_concepts(gold_labels), corpus_concepts(predicted_labels))


def read_prediction_file(path: str | os.PathLike) -> tuple[list[list[str]], list[list[str]]]:
  """Reads `word gold pred` lines (blank line between sentences) into (gold, predicted) label lists.

  Errors name the file and line only; the word itself may be clinical text and is never echoed.
  """
  gold_sentences: list[list[str]] = []
  predicted_sentences: list[list[str]] = []
  gold: list[str] = []
  predicted: list[str] = []
  try:
    handle = open(path, encoding="utf-8")
  except OSError as error:
    raise UserError(f"cannot read predictions file {path}: {error.strerror}") from None
  with handle:
    for line_number, line in enumerate(handle, start=1):
      fields = line.split()
      if not fields:
        if gold:
          gold_sentences.append(gold)
          predicted_sentences.append(predicted)
          gold, predicted = [], []
        continue
      if len(fields) != 3:
        raise UserError(f"{path}:{line_number}: expected 3 fields 'word gold pred', found {len(fields)}")
      for label in fields[1:]:
        try:
          _split_label(label)
        except ValueError:
          raise UserError(f"{path}:{line_number}: a label is not O, X, [CLS], [SEP], B-<type> or I-<type>") from None
      gold.append(fields[1])
      predicted.append(fields[2])
  if gold:
    gold_sentences.append(gold)
    predicted_sentences.append(predicted)
  return gold_sentences, predicted_sentences


def main(argv: Sequence[str]) -> None:
  from absl import flags

  path = flags.FLAGS.predictions
  if not path:
    raise UserError("--predictions is required: a file of 'word gold pred' lines")
  scores = score_sentences(*read_prediction_file(path))
  print(
    f"precision {scores.precision:.4f}  recall {scores.recall:.4f}  f1 {scores.f1:.4f}  "
    f"(gold {scores.num_gold}, predicted {scores.num_predicted}, correct {scores.num_correct})"
  )


if __name__ == "__main__":
  from absl import flags as _flags

  from clinical_bert_jax.errors import run_absl

  _flags.DEFINE_string("predictions", None, "`word gold pred` file (e.g. test_predictions.txt from evaluate ner).")
  run_absl(main)
