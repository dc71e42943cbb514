"""BIO NER (the i2b2 tasks, or any BIO corpus): the paper's split, features, exact-span F1, predictions file.

Follows the original `run_ner.py` (clinicalbert-paper.md §7.3):
* split (`--split=paper`, the default): train and dev pooled, shuffled with `random.seed(42)`, cut into 9 chunks of
  ceil(N/9) sentences; the run the paper reports (its last cross-validation split, n = 9) trains on chunks 0-7 and
  selects on chunk 8; test is the official test set. `--split=given` uses the files' train/dev as they are.
* features: each whitespace word is tokenised on its own, its label goes on its first word piece, the sentence is cut
  to max_seq_length − 2 pieces and wrapped in [CLS]/[SEP]; a linear layer over each piece's final hidden state
  predicts the label.
* scoring: a word whose pieces straddle the cut is scored as `O`, like the words after it (`ner_detokenize.py`).
* optimizer: Google's AdamWeightDecay with global-norm clipping (`torch_optimizers.GoogleAdamWPt`).
Deviations, documented in docs/evaluation.md: the loss is the MEAN cross-entropy over first pieces only (the original
summed it over all 150 positions, padding, [CLS], [SEP] and `X` continuation labels included), and the label set is
just the BIO labels (no `X`/[CLS]/[SEP]/padding classes, which only existed to be predicted on ignored positions).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np
from absl import logging

from clinical_bert_jax import ner_scoring
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.eval_tasks.hf_checkpoint import WordPieceEncoder
from clinical_bert_jax.eval_tasks import IGNORED_LABEL
from clinical_bert_jax.bio_format import (
  I2B2_ENTITY_TYPES,
  SPLITS,
  Sentence,
  bio_label_list,
  load_bio_dir,
  validate_labels,
)


def entity_types(task: str, train: Sequence[Sentence]) -> tuple[str, ...]:
  """The i2b2 task's types in the original label order, or for `bio` the training split's types."""
  if task.startswith("i2b2_"):
    return I2B2_ENTITY_TYPES[task.removeprefix("i2b2_")]
  return tuple(
    sorted(
      {label[2:] for sentence in train for label in sentence.labels if label[:2] in ("B-", "I-") and len(label) > 2}
    )
  )


def load_task_splits(task: str, data_dir: str | Path) -> tuple[dict[str, list[Sentence]], list[str]]:
  """Reads train/dev/test and checks every label against the task's label set; returns (splits, labels)."""
  splits = load_bio_dir(data_dir)
  labels = bio_label_list(entity_types(task, splits["train"]))
  for split in SPLITS:
    validate_labels(splits[split], labels, source=f"{Path(data_dir) / split} split")
  return splits, labels


NER_SPLITS = ("paper", "given")
PAPER_SEED = 42
PAPER_CHUNKS = 9  # run_ner.py's cross_val_sz − 1 chunks of train+dev; the 10th "split" is the test set


def paper_split(train: Sequence[Sentence], dev: Sequence[Sentence]) -> tuple[list[Sentence], list[Sentence]]:
  """`run_ner.py`'s re-split for its reported run: (chunks 0-7, chunk 8) of the seed-42 shuffle of train + dev."""
  pooled = list(train) + list(dev)
  random.Random(PAPER_SEED).shuffle(pooled)  # the same draws as random.seed(42); random.shuffle(pooled)
  size = math.ceil(len(pooled) / PAPER_CHUNKS)
  chunks = [pooled[start : start + size] for start in range(0, len(pooled), size)] if pooled else []
  if len(chunks) < PAPER_CHUNKS:
    raise UserError(
      f"--split=paper cuts train+dev ({len(pooled)} sentences) into {PAPER_CHUNKS} chunks of "
      f"{size} but gets only {len(chunks)}; use --split=given for so small a data set"
    )
  return [sentence for chunk in chunks[: PAPER_CHUNKS - 1] for sentence in chunk], chunks[PAPER_CHUNKS - 1]


def featurize(
  sentences: Sequence[Sentence], encoder: WordPieceEncoder, label_ids: dict[str, int], max_seq_length: int
) -> tuple[list[dict], int]:
  """Examples with the label on each word's first piece (-100 elsewhere); also the number of truncated sentences.

  `word_ids` (None on [CLS]/[SEP]) maps positions back to words for decoding predictions; `cut_word` is the word
  whose pieces straddle the length cut (None when no word is cut), scored as `O` like the original.
  """
  examples, truncated = [], 0
  for sentence, (pieces, piece_words) in zip(sentences, encoder.encode_words([s.words for s in sentences])):
    cut_word = None
    if len(pieces) > max_seq_length - 2:
      truncated += 1
      if piece_words[max_seq_length - 2] == piece_words[max_seq_length - 3]:
        cut_word = piece_words[max_seq_length - 3]
      pieces, piece_words = pieces[: max_seq_length - 2], piece_words[: max_seq_length - 2]
    labels = [IGNORED_LABEL] * len(pieces)
    previous_word = None
    for position, word in enumerate(piece_words):
      if word != previous_word:
        labels[position] = label_ids[sentence.labels[word]]
      previous_word = word
    examples.append(
      {
        "input_ids": [encoder.cls_id, *pieces, encoder.sep_id],
        "token_type_ids": [0] * (len(pieces) + 2),
        "label": [IGNORED_LABEL, *labels, IGNORED_LABEL],
        "word_ids": [None, *piece_words, None],
        "cut_word": cut_word,
      }
    )
  return examples, truncated


def decode(
  examples: Sequence[dict], predictions: Sequence[np.ndarray], sentences: Sequence[Sentence], labels: Sequence[str]
) -> list[list[str]]:
  """Word labels from piece predictions with the original first-sub-token rule (ner_scoring)."""
  decoded = []
  for example, predicted, sentence in zip(examples, predictions, sentences):
    token_labels = [labels[label_id] for label_id in predicted]
    token_labels[0], token_labels[-1] = "[CLS]", "[SEP]"
    decoded.append(
      ner_scoring.first_subtoken_word_labels(
        token_labels, example["word_ids"], len(sentence), cut_word=example.get("cut_word")
      )
    )
  return decoded


def write_predictions(handle: TextIO, sentences: Sequence[Sentence], predicted: Sequence[Sequence[str]]) -> None:
  """`word gold pred` lines, a blank line after each sentence: the input of the original i2b2 scoring scripts."""
  for sentence, predicted_labels in zip(sentences, predicted):
    for word, gold, prediction in zip(sentence.words, sentence.labels, predicted_labels):
      handle.write(f"{word} {gold} {prediction}\n")
    handle.write("\n")


class NerTask:
  """A BIO NER task as `evaluate` drives it: features of the three splits, the head, scoring, predictions file."""

  metric = "f1"
  optimizer = "google_adamw_pt"  # run_ner.py trained with Google's TF optimization.create_optimizer

  def __init__(
    self,
    task: str,
    data_dir: str | Path,
    encoder: WordPieceEncoder,
    max_seq_length: int,
    max_train_examples: int | None,
    max_eval_examples: int | None,
    split: str = "paper",
  ):
    if split not in NER_SPLITS:
      raise UserError(f"--split={split} is not one of {', '.join(NER_SPLITS)}")
    splits, self.labels = load_task_splits(task, data_dir)
    self.split = split
    self.file_sizes = {name: len(sentences) for name, sentences in splits.items()}
    if split == "paper":
      splits["train"], splits["dev"] = paper_split(splits["train"], splits["dev"])
    if len(self.labels) == 1:
      raise UserError(f"--data_dir={data_dir}: the train split has no B-/I- labels, so there is nothing to learn")
    self.num_labels = len(self.labels)
    label_ids = {label: index for index, label in enumerate(self.labels)}
    self.sentences = {
      "train": splits["train"][:max_train_examples],
      "dev": splits["dev"][:max_eval_examples],
      "test": splits["test"][:max_eval_examples],
    }
    self.truncated = {}
    features = {}
    for split in SPLITS:
      features[split], self.truncated[split] = featurize(self.sentences[split], encoder, label_ids, max_seq_length)
      if self.truncated[split]:
        logging.warning(
          "%s: %d sentence(s) longer than --max_seq_length=%d word pieces were truncated; their "
          "remaining words count as predicted O",
          split,
          self.truncated[split],
          max_seq_length,
        )
    self.train, self.dev, self.test = (features[split] for split in SPLITS)

  @property
  def model_class(self) -> type:
    from transformers import BertForTokenClassification

    return BertForTokenClassification

  def score(self, split: str, predictions: Sequence[np.ndarray]) -> tuple[dict[str, float], list[list[str]]]:
    examples = self.dev if split == "dev" else self.test
    decoded = decode(examples, predictions, self.sentences[split], self.labels)
    gold = [sentence.labels for sentence in self.sentences[split]]
    return ner_scoring.score_sentences(gold, decoded).as_dict(), decoded

  def write_test_predictions(self, handle: TextIO, predicted: Sequence[Sequence[str]]) -> None:
    write_predictions(handle, self.sentences["test"], predicted)

  def details(self) -> dict:
    return {
      "labels": self.labels,
      "truncated_sentences": self.truncated,
      "split": {
        "protocol": self.split,
        "file_sizes": self.file_sizes,
        **(
          {"seed": PAPER_SEED, "chunks": PAPER_CHUNKS, "train_chunks": "0-7", "dev_chunk": 8}
          if self.split == "paper"
          else {}
        ),
      },
    }
