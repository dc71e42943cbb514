"""Hand-worked cases for every rule of the original i2b2 scoring pipeline (clinicalbert-paper.md §7.4)."""

import pytest

from clinical_bert_jax import ner_scoring
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.ner_scoring import Concept
from tests.cli_util import assert_one_line_error, run_module


def test_first_subtoken_decides_the_word_label():
  # "a bc d" as [CLS] a b ##c d [SEP]: the second piece of word 1 says I-x, its first piece B-y.
  labels = ner_scoring.first_subtoken_word_labels(
    ["B-x", "O", "B-y", "I-x", "X", "B-x"], [None, 0, 1, 1, 2, None], num_words=3
  )
  assert labels == ["O", "B-y", "O"]  # word 2 has X on its first piece


def test_placeholder_labels_and_truncated_words_become_outside():
  labels = ner_scoring.first_subtoken_word_labels(["[CLS]", "X", "[SEP]", "B-t"], [None, 0, 1, None], num_words=4)
  assert labels == ["O", "O", "O", "O"]  # X and [SEP] on a first piece → O; words 2 and 3 were truncated away


def test_first_subtoken_rejects_misaligned_inputs():
  with pytest.raises(ValueError):
    ner_scoring.first_subtoken_word_labels(["O"], [0, 1], num_words=2)
  with pytest.raises(ValueError):
    ner_scoring.first_subtoken_word_labels(["O"], [5], num_words=2)


@pytest.mark.parametrize(
  "labels, repaired",
  [
    (["I-a", "I-a"], ["B-a", "I-a"]),  # sentence start
    (["O", "I-a", "O"], ["O", "B-a", "O"]),  # after O
    (["B-a", "I-b", "I-b"], ["B-a", "B-b", "I-b"]),  # after a different type
    (["B-a", "I-a", "B-a", "I-a"], ["B-a", "I-a", "B-a", "I-a"]),  # well-formed runs are untouched
    (["B-LOCATION-OTHER", "I-LOCATION-OTHER"], ["B-LOCATION-OTHER", "I-LOCATION-OTHER"]),  # types with '-'
  ],
)
def test_orphan_inside_is_repaired_to_begin(labels, repaired):
  assert ner_scoring.repair_orphan_inside(labels) == repaired


def test_sentence_concepts_are_bio_runs_with_inclusive_ends():
  labels = ["B-a", "I-a", "O", "I-b", "B-b", "I-b", "I-b", "B-a"]
  assert ner_scoring.sentence_concepts(labels, 4) == [
    Concept(4, 0, 1, "a"),
    Concept(4, 3, 3, "b"),
    Concept(4, 4, 6, "b"),
    Concept(4, 7, 7, "a"),
  ]


def test_unknown_label_shapes_are_rejected():
  with pytest.raises(ValueError):
    ner_scoring.sentence_concepts(["E-a"], 0)
  with pytest.raises(ValueError):
    ner_scoring.sentence_concepts(["B-"], 0)


def test_exact_span_micro_scores_pool_types_and_give_no_partial_credit():
  gold = [["B-a", "I-a", "O", "B-b"], ["O", "B-a"]]
  predicted = [
    ["B-a", "O", "O", "B-b"],  # a: span too short (no credit); b: exact
    ["O", "I-a"],
  ]  # orphan I-a is repaired to B-a: exact match
  scores = ner_scoring.score_sentences(gold, predicted)
  assert (scores.num_gold, scores.num_predicted, scores.num_correct) == (3, 3, 2)
  assert scores.precision == pytest.approx(2 / 3)
  assert scores.recall == pytest.approx(2 / 3)
  assert scores.f1 == pytest.approx(2 / 3)


def test_type_and_sentence_must_match():
  gold = [["B-a"], ["O"]]
  assert ner_scoring.score_sentences(gold, [["B-b"], ["O"]]).num_correct == 0
  assert ner_scoring.score_sentences(gold, [["O"], ["B-a"]]).num_correct == 0
  scores = ner_scoring.score_sentences(gold, [["B-a"], ["B-a"]])
  assert (scores.precision, scores.recall) == (0.5, 1.0)
  assert scores.f1 == pytest.approx(2 / 3)


def test_no_predictions_scores_zero_without_dividing_by_zero():
  scores = ner_scoring.score_sentences([["B-a"]], [["O"]])
  assert (scores.precision, scores.recall, scores.f1) == (0.0, 0.0, 0.0)


def test_misaligned_sentences_are_rejected():
  with pytest.raises(ValueError):
    ner_scoring.score_sentences([["O"]], [["O"], ["O"]])
  with pytest.raises(ValueError):
    ner_scoring.score_sentences([["O", "O"]], [["O"]])


def test_prediction_file_round_trip_and_errors(tmp_path):
  path = tmp_path / "predictions.txt"
  path.write_text("w1 B-a B-a\nw2 I-a O\n\n\nw3 O I-a\n", encoding="utf-8")
  gold, predicted = ner_scoring.read_prediction_file(path)
  assert gold == [["B-a", "I-a"], ["O"]]
  assert predicted == [["B-a", "O"], ["I-a"]]
  scores = ner_scoring.score_sentences(gold, predicted)
  assert (scores.num_gold, scores.num_predicted, scores.num_correct) == (1, 2, 0)

  path.write_text("secretword B-a\n", encoding="utf-8")
  with pytest.raises(UserError, match=r"predictions.txt:1: expected 3 fields") as error:
    ner_scoring.read_prediction_file(path)
  assert "secretword" not in str(error.value)
  path.write_text("w O O\nsecretword B-a E-a\n", encoding="utf-8")
  with pytest.raises(UserError, match=r"predictions.txt:2: a label") as error:
    ner_scoring.read_prediction_file(path)
  assert "secretword" not in str(error.value)


@pytest.mark.slow  # runs the CLI
def test_command_line_scores_a_prediction_file(tmp_path):
  path = tmp_path / "test_predictions.txt"
  path.write_text("w1 B-a B-a\nw2 I-a I-a\nw3 O B-b\n\nw4 B-b O\n", encoding="utf-8")
  result = run_module("clinical_bert_jax.ner_scoring", f"--predictions={path}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "precision 0.5000  recall 0.5000  f1 0.5000  (gold 2, predicted 2, correct 1)" in result.stdout
  assert_one_line_error(run_module("clinical_bert_jax.ner_scoring"), "--predictions is required")
