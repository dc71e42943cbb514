"""Dynamic masked-LM masking on the accelerator, inside the jitted train step.

Google's `create_pretraining_data.py` masks once, offline, and writes `dupe_factor` differently masked copies of the
corpus. Instances written with `masking=none` carry no predictions; for them the train step calls `mask_batch` with a
fresh key every step, so every epoch sees new masks without storing copies. Doing it on the device (instead of in the
host loader) keeps the loader a plain gather of stored arrays, which is what lets it keep up with a GPU step.

Per instance the semantics follow Google's `create_masked_lm_predictions` (bert-pretraining.md §2.4) as closely as
static shapes allow:

- budget `n_pred = min(max_predictions_per_seq, max(1, round(num_real_tokens * masked_lm_prob)))` with Python's
  round-half-to-even on the float64 product, computed on the host for every possible length and looked up on device,
  so e.g. length 110 gives 16 exactly as Google's float64 arithmetic does (a float32 product would give 17);
- candidates are the real tokens that are not `[CLS]`, `[SEP]` or `[PAD]`; without whole-word masking each WordPiece
  is its own candidate, with it a `##` piece joins the previous candidate (also across a `[SEP]`, as in Google's code);
- candidates are visited in a uniformly random order (one random key per word, sorted) and a word is taken when it
  still fits the budget; a word that does not fit is skipped and later, smaller words may still fill the budget;
- each chosen position becomes `[MASK]` with probability 0.8, stays unchanged with 0.1 and becomes a uniformly random
  vocabulary id (specials and `[unusedN]` included, like Google's `vocab_words`) with 0.1. Without whole-word masking
  the draw is per WordPiece (Google). With whole-word masking it is made once per WORD and applied to all its pieces:
  a deliberate deviation from Google, whose per-piece draw can leave a word half `[MASK]`, half original
  (google-research/bert#910). Random replacement ids are still drawn per piece;
- `masked_lm_positions` ascending, padded with 0 and weight 0; `masked_lm_ids` the original ids.

The random stream cannot reproduce Google's Python `random` draws: statistics match, individual masks do not.

Shape comments: B batch rows, S sequence length, P `max_predictions_per_seq`; inside the per-row helpers (vmapped)
the leading B is absent.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.vocab import CLS_TOKEN, CONTINUATION_PREFIX, MASK_TOKEN, PAD_TOKEN, SEP_TOKEN, read_vocab

Array = jax.Array

MASK_PROBABILITY = 0.8  # of a chosen position: becomes [MASK]
KEEP_PROBABILITY = 0.1  # stays the original token; the remaining 0.1 becomes a random id
NEVER_MASKED_TOKENS = (CLS_TOKEN, SEP_TOKEN, PAD_TOKEN)


@dataclasses.dataclass(frozen=True, eq=False)
class MaskingVocab:
  """The vocabulary facts masking needs; built once on the host, closed over by the jitted step."""

  vocab_size: int
  mask_token_id: int
  special_token_ids: tuple[int, ...]  # never chosen as a prediction
  is_continuation: np.ndarray  # [vocab_size] bool: the token starts with "##"

  @classmethod
  def from_tokens(cls, tokens: Sequence[str], source: str = "vocabulary") -> "MaskingVocab":
    """`tokens[i]` is the token with id i (the line order of `vocab.txt`, as `vocab.read_vocab` returns it)."""
    ids = {}
    for index, token in enumerate(tokens):
      ids.setdefault(token, index)
    missing = [token for token in (MASK_TOKEN,) + NEVER_MASKED_TOKENS if token not in ids]
    if missing:
      raise UserError(f"{source} has no {', '.join(missing)} token; dynamic masking needs a BERT vocabulary")
    return cls(
      vocab_size=len(tokens),
      mask_token_id=ids[MASK_TOKEN],
      special_token_ids=tuple(ids[token] for token in NEVER_MASKED_TOKENS),
      is_continuation=np.array([token.startswith(CONTINUATION_PREFIX) for token in tokens], dtype=bool),
    )

  @classmethod
  def from_vocab_file(cls, vocab_file: str | os.PathLike) -> "MaskingVocab":
    """The tables of a vocab.txt, read by `vocab.read_vocab` (the reader the tokenizer and the model use)."""
    return cls.from_tokens(read_vocab(vocab_file), source=f"vocabulary {vocab_file}")


def prediction_budget_table(max_seq_length: int, max_predictions_per_seq: int, masked_lm_prob: float) -> np.ndarray:
  """`table[n]` = Google's number of predictions for an instance of n real tokens (n = 0..max_seq_length).

  Computed in Python (float64, round-half-to-even) so the device lookup reproduces Google's counts exactly.
  """
  return np.array(
    [min(max_predictions_per_seq, max(1, round(length * masked_lm_prob))) for length in range(max_seq_length + 1)],
    dtype=np.int32,
  )


def dynamic_mask(
  rng: Array,
  input_ids: Array,
  input_mask: Array,
  *,
  max_predictions_per_seq: int,
  mask_token_id: int,
  vocab_size: int,
  special_token_ids: Sequence[int],
  masked_lm_prob: float = 0.15,
  whole_word: bool = False,
  is_continuation: Array | np.ndarray | None = None,
) -> tuple[Array, Array, Array, Array]:
  """Chooses and corrupts masked-LM positions for a batch `[B, S]`; jit-able, all shapes static.

  Args:
    rng: PRNG key; the same key gives the same masks.
    input_ids, input_mask: `[B, S]` integer arrays (mask 1 = real token, [CLS]/[SEP] included).
    max_predictions_per_seq: P, the number of prediction slots returned.
    mask_token_id, vocab_size, special_token_ids: from `MaskingVocab`; random replacements are drawn from
      `[0, vocab_size)`, so pass the vocabulary's size, not a model vocab padded for speed.
    masked_lm_prob: fraction of real tokens to predict (Google: 0.15).
    whole_word: choose whole words (a `##` piece belongs to the previous piece) and decide 80/10/10 per word.
    is_continuation: `[vocab_size]` bool table, required when `whole_word`.

  Returns:
    `(masked_input_ids [B,S], masked_lm_positions [B,P] int32, masked_lm_ids [B,P] int32,
    masked_lm_weights [B,P] float32)`.
  """
  if whole_word and is_continuation is None:
    raise ValueError("whole_word masking needs the is_continuation table (MaskingVocab.is_continuation)")
  input_ids = jnp.asarray(input_ids, jnp.int32)  # [B, S]
  real = jnp.asarray(input_mask) > 0  # [B, S] bool
  seq_len = input_ids.shape[1]
  order_rng, decision_rng, replacement_rng = jax.random.split(rng, 3)

  candidate = real & ~jnp.isin(input_ids, jnp.asarray(special_token_ids, jnp.int32))  # [B, S] bool
  if whole_word:
    continues_word = jnp.asarray(is_continuation, bool)[input_ids]  # [B, S] bool: a "##" piece
    has_earlier_candidate = (jnp.cumsum(candidate, axis=1) - candidate) > 0  # [B, S] bool
    word_start = candidate & ~(continues_word & has_earlier_candidate)  # [B, S] bool
  else:
    word_start = candidate  # [B, S] bool
  word_id = jnp.cumsum(word_start, axis=1) - 1  # [B, S]; for a candidate: index of its word within the row
  budget_table = jnp.asarray(prediction_budget_table(seq_len, max_predictions_per_seq, masked_lm_prob))  # [S + 1]
  budget = budget_table[real.sum(axis=1)]  # [B]

  # Word starts sort first, in random order; everything else after them (key 2 > any uniform draw).
  visit_key = jnp.where(word_start, jax.random.uniform(order_rng, input_ids.shape), 2.0)  # [B, S]
  choose = jax.vmap(lambda *row: _choose_words(*row, fill_after_overflow=whole_word))
  chosen = choose(visit_key, word_start, word_id, candidate, budget)  # [B, S] bool

  # The 80/10/10 draw is read at each position's word start, i.e. once per word under whole-word masking.
  decision = jax.random.uniform(decision_rng, input_ids.shape)  # [B, S]
  if whole_word:
    positions = jnp.arange(seq_len)  # [S]
    word_start_position = jax.lax.cummax(jnp.where(word_start, positions, 0), axis=1)  # [B, S]
    decision = jnp.take_along_axis(decision, word_start_position, axis=1)  # [B, S]
  random_ids = jax.random.randint(replacement_rng, input_ids.shape, 0, vocab_size, dtype=jnp.int32)  # [B, S]
  kept_or_random = jnp.where(decision < MASK_PROBABILITY + KEEP_PROBABILITY, input_ids, random_ids)  # [B, S]
  corrupted = jnp.where(decision < MASK_PROBABILITY, jnp.int32(mask_token_id), kept_or_random)  # [B, S]
  masked_input_ids = jnp.where(chosen, corrupted, input_ids)  # [B, S]

  masked_lm_positions, masked_lm_weights = _sorted_positions(chosen, max_predictions_per_seq)  # [B, P] each
  original_ids = jnp.take_along_axis(input_ids, masked_lm_positions, axis=1)  # [B, P]
  masked_lm_ids = jnp.where(masked_lm_weights > 0, original_ids, 0)  # [B, P]
  return masked_input_ids, masked_lm_positions, masked_lm_ids, masked_lm_weights


def _choose_words(
  visit_key: Array, word_start: Array, word_id: Array, candidate: Array, budget: Array, *, fill_after_overflow: bool
) -> Array:
  """One row: visits words in `visit_key` order and takes each that still fits `budget`; returns chosen [S] bool.

  Words taken before the first one that overflows form a prefix of the visiting order (a cumulative sum). Google then
  skips the overflowing word and keeps trying later ones; only multi-piece words can overflow, and the remaining
  budget is then smaller than one word, so a short `while_loop` (usually 0-2 iterations) finishes the job.
  """
  seq_len = visit_key.shape[0]
  slots = jnp.arange(seq_len)  # [S]
  # word_size[w]: pieces of word w of the row (indexed by word id, not position).
  word_size = jnp.zeros(seq_len, jnp.int32).at[jnp.where(candidate, word_id, seq_len)].add(1, mode="drop")  # [S]
  order = jnp.argsort(visit_key)  # [S] positions in visiting order; everything below is indexed by visit slot
  is_word = word_start[order]  # [S] bool
  size = jnp.where(is_word, word_size[jnp.clip(word_id[order], 0)], 0)  # [S]
  taken = jnp.cumsum(size)  # [S]
  chosen_in_order = is_word & (taken <= budget)  # [S] bool

  if fill_after_overflow:
    overflow = is_word & (taken > budget)  # [S] bool

    def still_filling(state):
      _, remaining, last_visited = state
      return (last_visited < seq_len) & (remaining > 0)

    def take_next_fitting_word(state):
      chosen, remaining, last_visited = state
      fits = is_word & (slots > last_visited) & (size <= remaining)  # [S] bool
      found = fits.any()  # [] bool
      slot = jnp.argmax(fits)  # []: the first fitting word's visit slot
      chosen = chosen | (found & (slots == slot))  # [S] bool
      remaining = remaining - jnp.where(found, size[slot], 0)  # []
      return chosen, remaining, jnp.where(found, slot, seq_len)

    first_overflow = jnp.where(overflow.any(), jnp.argmax(overflow), seq_len)  # []
    remaining = budget - jnp.sum(jnp.where(chosen_in_order, size, 0))  # []
    state = (chosen_in_order, remaining, first_overflow)
    chosen_in_order, _, _ = jax.lax.while_loop(still_filling, take_next_fitting_word, state)  # [S] bool

  slot_word = jnp.where(is_word, word_id[order], seq_len)  # [S]: the word of each visit slot (seq_len: none)
  chosen_words = jnp.zeros(seq_len, bool).at[slot_word].set(chosen_in_order, mode="drop")  # [S] bool, by word id
  return candidate & chosen_words[jnp.clip(word_id, 0)]  # [S] bool, indexed by position


def _sorted_positions(chosen: Array, max_predictions_per_seq: int) -> tuple[Array, Array]:
  """The chosen positions of each row in ascending order, padded with position 0 and weight 0 to P slots."""
  batch, seq_len = chosen.shape
  slots = min(max_predictions_per_seq, seq_len)
  keyed = jnp.where(chosen, jnp.arange(seq_len, dtype=jnp.int32), seq_len)  # [B, S]; unchosen sort last
  smallest = -jax.lax.top_k(-keyed, slots)[0]  # [B, min(P, S)] ascending
  if slots < max_predictions_per_seq:
    smallest = jnp.pad(smallest, ((0, 0), (0, max_predictions_per_seq - slots)), constant_values=seq_len)  # [B, P]
  real_slot = smallest < seq_len  # [B, P] bool
  return jnp.where(real_slot, smallest, 0).astype(jnp.int32), real_slot.astype(jnp.float32)  # [B, P] each


def mask_batch(
  rng: Array,
  batch: Mapping[str, Any],
  vocab: MaskingVocab,
  *,
  max_predictions_per_seq: int,
  masked_lm_prob: float = 0.15,
  whole_word: bool = False,
) -> dict[str, Any]:
  """Returns `batch` (Google feature names) with fresh masks: `input_ids` and the `masked_lm_*` fields replaced.

  Use inside the jitted train step with a key derived from the step (e.g. `jax.random.fold_in(rng, step)`), so a
  resumed run draws the same masks as an uninterrupted one.
  """
  input_ids, positions, ids, weights = dynamic_mask(
    rng,
    batch["input_ids"],
    batch["input_mask"],
    max_predictions_per_seq=max_predictions_per_seq,
    mask_token_id=vocab.mask_token_id,
    vocab_size=vocab.vocab_size,
    special_token_ids=vocab.special_token_ids,
    masked_lm_prob=masked_lm_prob,
    whole_word=whole_word,
    is_continuation=vocab.is_continuation if whole_word else None,
  )
  return {
    **batch,
    "input_ids": input_ids,
    "masked_lm_positions": positions,
    "masked_lm_ids": ids,
    "masked_lm_weights": weights,
  }
