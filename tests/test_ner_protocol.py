"""The paper's NER protocol: run_ner.py's re-split, the rule for words cut by truncation, and the exact-span scorer
against `seqeval` on thousands of random label sequences (plus the original's semantics where seqeval differs)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import IOB2

from clinical_bert_jax import ner_scoring
from clinical_bert_jax.bio_format import Sentence, load_bio_dir
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.eval_tasks import hf_checkpoint, ner

NCBI = Path(__file__).parent / "data" / "ner" / "ncbi-disease"


# ------------------------------------------------------------------------------------------------------ re-split
def original_cv_split(train: list, dev: list, test: list, n: int = 9, cv_sz: int = 10):
  """run_ner.py's create_cv_examples + get_cv_examples, transcribed statement by statement (the module-level RNG)."""
  random.seed(42)
  train_dev = train + dev
  random.shuffle(train_dev)
  split_sz = math.ceil(len(train_dev) / (cv_sz - 1))
  splits = [train_dev[i : i + split_sz] for i in range(0, len(train_dev), split_sz)] + [test]
  dev_split, test_split = splits[(n - 1) % cv_sz], splits[n]
  if (n + 1) % cv_sz > (n - 1) % cv_sz:
    train_splits = splits[: (n - 1) % cv_sz] + splits[(n + 1) % cv_sz :]
  else:
    train_splits = splits[(n + 1) % cv_sz : (n - 1) % cv_sz]
  return [s for split in train_splits for s in split], dev_split, test_split


def test_paper_split_is_run_ner_py_fold_9_on_ncbi_disease():
  splits = load_bio_dir(NCBI)
  expected_train, expected_dev, expected_test = original_cv_split(splits["train"], splits["dev"], splits["test"])
  assert expected_test is splits["test"]  # fold 9 tests on the official test set
  train, dev = ner.paper_split(splits["train"], splits["dev"])
  assert train == expected_train and dev == expected_dev
  pooled = len(splits["train"]) + len(splits["dev"])
  assert len(dev) == pooled - 8 * math.ceil(pooled / 9) and len(train) == 8 * math.ceil(pooled / 9)
  assert set(map(id, train)).isdisjoint(map(id, dev))
  assert dev != splits["dev"][: len(dev)]  # really re-split, not the files' dev


def test_paper_split_is_refused_when_train_and_dev_make_fewer_than_nine_chunks():
  sentences = [Sentence((f"w{i}",), ("O",)) for i in range(16)]  # ceil(16/9) = 2: only 8 chunks
  with pytest.raises(UserError, match="--split=given"):
    ner.paper_split(sentences[:12], sentences[12:])
  train, dev = ner.paper_split(sentences[:12], sentences[12:] + [Sentence(("x",), ("O",))])  # 17: 9 chunks
  assert len(train) == 16 and len(dev) == 1


# ------------------------------------------------------------------------------------------------- truncation
@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> hf_checkpoint.WordPieceEncoder:
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "fever", "##ish", "##ly", "the"]
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  path.write_text("\n".join(vocab) + "\n")
  return hf_checkpoint.WordPieceEncoder(path, do_lower_case=True)


def test_a_word_cut_by_truncation_scores_as_outside_like_ner_detokenize(encoder):
  labels = ["B-x", "I-x", "O"]
  label_ids = {label: i for i, label in enumerate(labels)}
  sentence = Sentence(("the", "feverishly", "a"), ("O", "B-x", "O"))
  # 4 positions: [CLS] the fever [SEP] -- "feverishly" (fever ##ish ##ly) straddles the cut.
  features, truncated = ner.featurize([sentence], encoder, label_ids, 4)
  assert truncated == 1 and features[0]["cut_word"] == 1 and features[0]["word_ids"] == [None, 0, 1, None]
  assert features[0]["label"] == [-100, 2, 0, -100]  # still trained on its first piece, as the original did
  everything_b = [np.zeros(4, int)]
  assert ner.decode(features, everything_b, [sentence], labels) == [["B-x", "O", "O"]]
  # Cut exactly at a word boundary: the last kept word keeps its label.
  features, _ = ner.featurize([sentence], encoder, label_ids, 6)  # [CLS] the fever ##ish ##ly [SEP]
  assert features[0]["cut_word"] is None
  assert ner.decode(features, [np.zeros(6, int)], [sentence], labels) == [["B-x", "B-x", "O"]]


# ------------------------------------------------------------------------------------------------- scorer oracle
TYPES = ("problem", "test", "LOCATION-OTHER")


def random_corpus(rng: random.Random, sentences: int) -> list[list[str]]:
  labels = ["O"] * 6 + [f"{prefix}-{kind}" for prefix in "BI" for kind in TYPES]
  return [[rng.choice(labels) for _ in range(rng.randint(0, 12))] for _ in range(sentences)]


@pytest.mark.filterwarnings("ignore:.*ill-defined")
def test_scorer_equals_seqeval_on_thousands_of_random_label_sequences():
  rng = random.Random(0)
  differs_from_strict = 0
  for _ in range(2000):
    count = rng.randint(1, 6)
    gold, predicted = random_corpus(rng, count), random_corpus(rng, count)
    predicted = [row[: len(g)] + ["O"] * (len(g) - len(row)) for row, g in zip(predicted, gold)]
    ours = ner_scoring.score_sentences(gold, predicted)
    assert ours.num_gold == len(get_entities(gold)) and ours.num_predicted == len(get_entities(predicted))
    if not ours.num_gold or not ours.num_predicted:
      assert ours.f1 == 0.0
      continue
    assert ours.precision == pytest.approx(precision_score(gold, predicted), abs=1e-12)
    assert ours.recall == pytest.approx(recall_score(gold, predicted), abs=1e-12)
    assert ours.f1 == pytest.approx(f1_score(gold, predicted), abs=1e-12)
    strict = f1_score(gold, predicted, mode="strict", scheme=IOB2)
    differs_from_strict += not math.isclose(strict, ours.f1)
  # Orphan I- tags count as concepts (conlleval's and format_for_i2b2_eval.py's reading), not dropped (strict IOB2):
  # the random corpora are full of them, so the strict reading differs often; our scorer must follow the lenient one.
  assert differs_from_strict > 500


def test_the_originals_semantics_where_seqeval_has_none():
  # Placeholder labels of the original tagger (X, [CLS], [SEP]) mean O (ner_detokenize.py), inside a run too.
  assert ner_scoring.score_sentences([["B-x", "I-x", "O"]], [["B-x", "X", "O"]]).num_correct == 0
  assert ner_scoring.sentence_concepts(["B-x", "X", "I-x"], 0) == [
    ner_scoring.Concept(0, 0, 0, "x"),
    ner_scoring.Concept(0, 2, 2, "x"),
  ]
  # The word-level rule: first sub-token decides, later pieces are ignored.
  assert ner_scoring.first_subtoken_word_labels(["[CLS]", "B-x", "O", "I-x", "[SEP]"], [None, 0, 0, 1, None], 3) == [
    "B-x",
    "I-x",
    "O",
  ]
  # score_i2b2.py divides by zero without predictions; we report 0 instead.
  scores = ner_scoring.score_sentences([["B-x"]], [["O"]])
  assert (scores.precision, scores.recall, scores.f1) == (0.0, 0.0, 0.0)
