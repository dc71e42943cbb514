"""Dynamic masking: Google's per-instance statistics, whole-word grouping and the per-word 80/10/10 decision."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.masking import MaskingVocab, dynamic_mask, mask_batch, prediction_budget_table

NUM_WORDS = 2000  # large vocab: a random replacement almost never equals [MASK] or the original id
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENS = SPECIALS + [f"w{i}" for i in range(NUM_WORDS)] + [f"##p{i}" for i in range(NUM_WORDS)]
VOCAB = MaskingVocab.from_tokens(TOKENS)
PAD, CLS, SEP, MASK = 0, 2, 3, 4
FIRST_WORD, FIRST_PIECE = len(SPECIALS), len(SPECIALS) + NUM_WORDS
SEQ_LEN = 64
MAX_PREDICTIONS = 12
ROWS = 1024  # one batch shape for most tests: each new shape costs a compilation


def _google_budget(length: int, max_predictions: int, prob: float) -> int:
  return min(max_predictions, max(1, int(round(length * prob))))


def _synthetic_batch(rows: int, seed: int, continuation_rate: float = 0.0):
  """Rows shaped like Google's instances: [CLS] A [SEP] B [SEP] then padding; lengths vary per row."""
  rng = np.random.default_rng(seed)
  input_ids = np.zeros((rows, SEQ_LEN), np.int32)
  input_mask = np.zeros((rows, SEQ_LEN), np.int32)
  for row in range(rows):
    length = int(rng.integers(8, SEQ_LEN + 1))
    words = rng.integers(FIRST_WORD, FIRST_PIECE, size=length)
    pieces = rng.integers(FIRST_PIECE, len(TOKENS), size=length)
    tokens = np.where(rng.random(length) < continuation_rate, pieces, words)
    split = int(rng.integers(2, length - 2))
    tokens[0], tokens[split], tokens[length - 1] = CLS, SEP, SEP
    input_ids[row, :length] = tokens
    input_mask[row, :length] = 1
  return input_ids, input_mask


def _google_word_groups(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
  """Google's `cand_indexes` loop with do_whole_word_mask=True (bert-pretraining.md §2.4)."""
  groups: list[list[int]] = []
  for position in range(int(mask.sum())):
    token = int(ids[position])
    if token in (CLS, SEP):
      continue
    if groups and VOCAB.is_continuation[token]:
      groups[-1].append(position)
    else:
      groups.append([position])
  return groups


@functools.lru_cache(maxsize=None)
def _jitted_mask(whole_word: bool, max_predictions: int = MAX_PREDICTIONS, prob: float = 0.15):
  return jax.jit(
    functools.partial(
      dynamic_mask,
      max_predictions_per_seq=max_predictions,
      mask_token_id=VOCAB.mask_token_id,
      vocab_size=VOCAB.vocab_size,
      special_token_ids=VOCAB.special_token_ids,
      masked_lm_prob=prob,
      whole_word=whole_word,
      is_continuation=VOCAB.is_continuation,
    )
  )


def _run(whole_word: bool, input_ids, input_mask, seed: int = 0, **kwargs):
  outputs = _jitted_mask(whole_word, **kwargs)(jax.random.key(seed), input_ids, input_mask)
  return tuple(np.asarray(value) for value in outputs)


def test_budget_table_matches_google_round_half_even():
  table = prediction_budget_table(128, 20, 0.15)
  for length in range(129):
    assert table[length] == _google_budget(length, 20, 0.15)
  # Python 3 rounding (bert-pretraining.md §2.4): 2/4/8/10/14/16, and at most 19 predictions at length 128.
  assert [table[n] for n in (10, 30, 50, 70, 90, 110, 128)] == [2, 4, 8, 10, 14, 16, 19]
  assert prediction_budget_table(8, 20, 0.15)[0] == 1


def test_per_piece_masking_statistics_and_layout():
  input_ids, input_mask = _synthetic_batch(ROWS, seed=1)
  masked_ids, positions, ids, weights = _run(False, input_ids, input_mask)
  assert positions.shape == ids.shape == weights.shape == (ROWS, MAX_PREDICTIONS)
  assert positions.dtype == np.int32 and weights.dtype == np.float32

  decisions = {"mask": 0, "keep": 0, "random": 0}
  for row in range(len(input_ids)):
    length = int(input_mask[row].sum())
    count = int(weights[row].sum())
    assert count == _google_budget(length, MAX_PREDICTIONS, 0.15)  # plenty of candidates in every row
    chosen = positions[row, :count]
    assert np.all(np.diff(chosen) > 0), f"row {row}: positions not strictly ascending"
    assert np.all(positions[row, count:] == 0) and np.all(ids[row, count:] == 0) and np.all(weights[row, count:] == 0)
    assert np.all(weights[row, :count] == 1)
    assert np.all(chosen < length), f"row {row}: a padding position was chosen"
    assert not np.isin(input_ids[row, chosen], [CLS, SEP, PAD]).any(), f"row {row}: a special token was chosen"
    np.testing.assert_array_equal(ids[row, :count], input_ids[row, chosen])
    untouched = np.setdiff1d(np.arange(SEQ_LEN), chosen)
    np.testing.assert_array_equal(masked_ids[row, untouched], input_ids[row, untouched])
    new = masked_ids[row, chosen]
    decisions["mask"] += int(np.sum(new == MASK))
    decisions["keep"] += int(np.sum(new == input_ids[row, chosen]))
    decisions["random"] += int(np.sum((new != MASK) & (new != input_ids[row, chosen])))

  total = sum(decisions.values())
  assert total == int(weights.sum())
  assert abs(decisions["mask"] / total - 0.8) < 0.02, decisions
  assert abs(decisions["keep"] / total - 0.1) < 0.015, decisions
  assert abs(decisions["random"] / total - 0.1) < 0.015, decisions
  assert abs(weights.sum() / input_mask.sum() - 0.15) < 0.01  # ≈ 15% of the real tokens


def test_random_replacements_cover_the_vocabulary_uniformly():
  input_ids, input_mask = _synthetic_batch(ROWS, seed=2)
  masked_ids, positions, _, weights = _run(False, input_ids, input_mask, seed=5)
  new = np.take_along_axis(masked_ids, positions, axis=1)[weights > 0]
  old = np.take_along_axis(input_ids, positions, axis=1)[weights > 0]
  replaced = new[(new != MASK) & (new != old)]
  assert replaced.min() >= 0 and replaced.max() < VOCAB.vocab_size
  # Words and pieces are each half of the vocabulary; a per-row or clamped draw would skew this.
  assert abs(np.mean(replaced >= FIRST_PIECE) - 0.5) < 0.1


def test_whole_words_are_masked_entirely_with_one_decision_per_word():
  input_ids, input_mask = _synthetic_batch(ROWS, seed=3, continuation_rate=0.5)
  masked_ids, positions, ids, weights = _run(True, input_ids, input_mask)
  word_decisions = {"mask": 0, "keep": 0, "random": 0}
  multi_piece_words = 0
  for row in range(len(input_ids)):
    count = int(weights[row].sum())
    chosen = set(positions[row, :count].tolist())
    assert len(chosen) == count
    budget = _google_budget(int(input_mask[row].sum()), MAX_PREDICTIONS, 0.15)
    assert count <= budget
    for group in _google_word_groups(input_ids[row], input_mask[row]):
      covered = [position in chosen for position in group]
      assert all(covered) or not any(covered), f"row {row}: a word was only partly chosen"
      if not any(covered):
        # Google visits every word and takes it whenever it still fits: nothing unchosen may fit what is left.
        assert len(group) > budget - count, f"row {row}: an unchosen word fits the remaining budget"
        continue
      new, old = masked_ids[row, group], input_ids[row, group]
      kinds = {"mask" if n == MASK else "keep" if n == o else "random" for n, o in zip(new, old)}
      assert len(kinds) == 1, f"row {row}: pieces of one word got different 80/10/10 decisions"
      word_decisions[kinds.pop()] += 1
      multi_piece_words += len(group) > 1
  assert multi_piece_words > 500  # the check above really exercised multi-piece words
  total = sum(word_decisions.values())
  assert abs(word_decisions["mask"] / total - 0.8) < 0.03, word_decisions
  assert abs(word_decisions["keep"] / total - 0.1) < 0.025, word_decisions


def test_per_piece_mode_splits_words_so_the_whole_word_checks_have_teeth():
  input_ids, input_mask = _synthetic_batch(ROWS, seed=3, continuation_rate=0.5)
  _, positions, _, weights = _run(False, input_ids, input_mask)
  partly_chosen = 0
  for row in range(len(input_ids)):
    chosen = set(positions[row, : int(weights[row].sum())].tolist())
    for group in _google_word_groups(input_ids[row], input_mask[row]):
      covered = [position in chosen for position in group]
      partly_chosen += any(covered) and not all(covered)
  assert partly_chosen > 20


def test_continuation_piece_grouping_follows_google_at_sentence_edges():
  # Row: [CLS] ##a w ##b [SEP] ##c w [SEP]: "##a" after [CLS] starts its own word; "##c" after [SEP] joins "w ##b".
  row = [CLS, FIRST_PIECE, FIRST_WORD, FIRST_PIECE + 1, SEP, FIRST_PIECE + 2, FIRST_WORD + 1, SEP]
  input_ids = np.array([row] * 200, np.int32)
  input_mask = np.ones_like(input_ids)
  expected_groups = [[1], [2, 3, 5], [6]]
  assert _google_word_groups(input_ids[0], input_mask[0]) == expected_groups
  outcomes = []
  for seed in range(3):
    _, positions, _, weights = _run(True, input_ids, input_mask, seed=seed, max_predictions=8, prob=0.375)
    outcomes += [tuple(positions[row, : int(weights[row].sum())].tolist()) for row in range(len(input_ids))]
  # Budget round(8 * 0.375) = 3. Visiting the 3-piece word first takes it alone; otherwise a singleton comes first,
  # the 3-piece word no longer fits and is skipped, and the other singleton is still taken (Google's greedy fill).
  assert set(outcomes) == {(2, 3, 5), (1, 6)}
  assert abs(outcomes.count((2, 3, 5)) / len(outcomes) - 1 / 3) < 0.06


def test_same_key_same_masks_different_key_different_masks():
  input_ids, input_mask = _synthetic_batch(ROWS, seed=4, continuation_rate=0.3)
  for whole_word in (False, True):
    first = _run(whole_word, input_ids, input_mask, seed=7)
    again = _run(whole_word, input_ids, input_mask, seed=7)
    other = _run(whole_word, input_ids, input_mask, seed=8)
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])


def test_works_for_any_batch_size_under_jit():
  input_ids, input_mask = _synthetic_batch(ROWS, seed=5)
  for rows in (1, ROWS):
    masked_ids, positions, _, weights = _run(False, input_ids[:rows], input_mask[:rows])
    assert masked_ids.shape == (rows, SEQ_LEN) and positions.shape == weights.shape == (rows, MAX_PREDICTIONS)
    assert np.all(weights.sum(axis=1) > 0)


def test_more_slots_than_positions_pads_and_empty_rows_predict_nothing():
  input_ids, input_mask = _synthetic_batch(4, seed=6)
  input_mask[0] = 0  # an all-padding row
  _, positions, _, weights = _run(False, input_ids[:, :8], input_mask[:, :8], max_predictions=10, prob=1.0)
  assert positions.shape == (4, 10)
  assert weights[0].sum() == 0
  for row in range(1, 4):
    real = np.flatnonzero(input_mask[row, :8])
    expected = [p for p in real if input_ids[row, p] not in (CLS, SEP)]
    np.testing.assert_array_equal(positions[row, : int(weights[row].sum())], expected)


def test_mask_batch_replaces_masking_fields_only():
  input_ids, input_mask = _synthetic_batch(4, seed=7)
  batch = {
    "input_ids": input_ids,
    "input_mask": input_mask,
    "segment_ids": np.zeros_like(input_ids),
    "masked_lm_positions": np.zeros((4, 0), np.int32),
    "masked_lm_ids": np.zeros((4, 0), np.int32),
    "masked_lm_weights": np.zeros((4, 0), np.float32),
    "next_sentence_labels": np.ones((4, 1), np.int32),
  }
  masked = jax.jit(functools.partial(mask_batch, vocab=VOCAB, max_predictions_per_seq=MAX_PREDICTIONS))(
    jax.random.key(0), batch
  )
  assert masked["masked_lm_positions"].shape == (4, MAX_PREDICTIONS)
  assert np.asarray(masked["masked_lm_weights"]).sum() > 0
  np.testing.assert_array_equal(np.asarray(masked["next_sentence_labels"]), batch["next_sentence_labels"])
  np.testing.assert_array_equal(np.asarray(masked["input_mask"]), input_mask)


def test_vocab_file_tables_and_errors(tmp_path):
  vocab_file = tmp_path / "vocab.txt"
  vocab_file.write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
  vocab = MaskingVocab.from_vocab_file(vocab_file)
  assert (vocab.vocab_size, vocab.mask_token_id, vocab.special_token_ids) == (len(TOKENS), MASK, (CLS, SEP, PAD))
  assert vocab.is_continuation.sum() == NUM_WORDS and vocab.is_continuation[FIRST_PIECE]

  no_mask = tmp_path / "no_mask.txt"
  no_mask.write_text("\n".join(t for t in TOKENS if t != "[MASK]"), encoding="utf-8")
  with pytest.raises(UserError, match=r"no \[MASK\] token"):
    MaskingVocab.from_vocab_file(no_mask)
  with pytest.raises(UserError, match="--vocab_file"):
    MaskingVocab.from_vocab_file(tmp_path / "missing.txt")
  with pytest.raises(ValueError, match="is_continuation"):
    dynamic_mask(
      jax.random.key(0),
      np.zeros((1, 4), np.int32),
      np.ones((1, 4), np.int32),
      max_predictions_per_seq=2,
      mask_token_id=MASK,
      vocab_size=10,
      special_token_ids=(CLS,),
      whole_word=True,
    )
