"""Masked-LM + next-sentence pretraining instances, identical to Google's `create_pretraining_data.py`, fast.

    python -m data_prep.create_pretraining_data --input='notes/*.txt' --vocab_file=vocab.txt --output_dir=data \\
        [--do_lower_case] [--max_seq_length=128] [--max_predictions_per_seq=20] [--masked_lm_prob=0.15] \\
        [--short_seq_prob=0.1] [--dupe_factor=5] [--random_seed=12345] [--do_whole_word_mask] \\
        [--masking=static|none] [--num_workers=1] [--output_format=native|tfrecord] [--max_shard_bytes=16777216]

Input is Google's text format: one sentence per line, a blank line between documents. For one input file no larger
than `--max_shard_bytes`, the instances (tokens, segments, masked positions and labels, next-sentence labels and
their order) are those Google's script writes for that file alone with the same vocabulary, flags and seed: the same
Python `random.Random(seed)` is consumed by the same draws in the same order (bert-pretraining.md §2). What differs
is how the work is done:

* Tokenisation goes through `clinical_bert_jax.tokenization` (Google-identical, Rust backend, batched).
* Sentences are ranges of one flat array of token ids, so chunking, the A/B split, truncation and random-next
  segments are index arithmetic; masking edits ids in place. Google builds lists of token strings for all of that.
* Input files, and cuts of large files ("input shards" of at most ~`--max_shard_bytes`, cut at blank lines), are
  processed independently in `--num_workers` processes, each as a separate Google run: file order and worker count
  never change the output. Shard k of a file is seeded with `random_seed + k`, so a file that fits in one shard gets
  exactly Google's output; in a larger file, random next segments come from the same shard only.
* Memory is bounded by one input shard per worker: instances are kept as compact id arrays until Google's final
  shuffle, then streamed to a `records` writer. Google holds every instance of every file as Python objects.

Unlike Google's script, this one never logs instance text (clinical notes are protected health information): only
counts. `--masking=none` writes unmasked sentence pairs (no predictions, `max_predictions_per_seq` 0) for dynamic
masking at training time; it makes exactly Google's draws minus those of masking. `--do_whole_word_mask` follows
the published google-research/bert code, which bert-tensorflow 1.0.4 predates.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import functools
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from clinical_bert_jax import records
from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.fileio import atomic_output_dir, local_copy, local_inputs
from clinical_bert_jax.tokenization import FullTokenizer
from clinical_bert_jax.vocab import CONTINUATION_PREFIX
from data_prep import workers
from data_prep.build_vocab import CLS, MASK, SEP, UNK, check_vocab, expand_inputs

# What the data stores (--masking of this tool, "masking" in the manifest); not pretrain's TRAIN_MASKING_MODES.
DATA_MASKING_MODES = ("static", "none")
OUTPUT_FORMATS = {"native": records.FORMAT_NATIVE, "tfrecord": records.FORMAT_TFRECORD}
DEFAULT_MAX_SHARD_BYTES = 16 << 20  # ~0.1 GB of RAM per worker on top of ~0.1 GB of code and tables
OUTPUT_PREFIX = "instances"

_READ_CHUNK_BYTES = 1 << 20  # input read, decoded and tokenised this much at a time
_WRITE_BLOCK = 4096  # instances gathered into padded arrays and handed to the writer at once
_PROGRESS_INTERVAL_S = 0.25
# Share of an input shard's bytes credited to the progress bar by each phase, so the ETA tracks all three.
_PHASE_SHARE = {"read": 0.3, "generate": 0.5, "write": 0.2}
_UNK_RATE_WARNING = 0.05


@dataclasses.dataclass(frozen=True)
class InstanceOptions:
  """Google's generation flags (defaults: ClinicalBERT's run, except `dupe_factor`, which is 10 in Google's script)."""

  max_seq_length: int = 128
  max_predictions_per_seq: int = 20
  masked_lm_prob: float = 0.15
  short_seq_prob: float = 0.1
  dupe_factor: int = 5
  random_seed: int = 12345
  do_whole_word_mask: bool = False
  masking: str = "static"

  def validate(self) -> None:
    """UserError naming the first flag whose value Google's algorithm cannot run with."""
    if self.max_seq_length < 5:
      raise UserError(f"--max_seq_length={self.max_seq_length} is too small: [CLS] A [SEP] B [SEP] needs at least 5")
    if self.max_seq_length > 65535:
      raise UserError(f"--max_seq_length={self.max_seq_length} exceeds 65535, the largest the data formats store")
    if not 0 <= self.max_predictions_per_seq <= self.max_seq_length:
      raise UserError(f"--max_predictions_per_seq={self.max_predictions_per_seq} must be in [0, max_seq_length]")
    for name in ("masked_lm_prob", "short_seq_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise UserError(f"--{name}={getattr(self, name)} must be a probability in [0, 1]")
    if self.dupe_factor < 1:
      raise UserError(f"--dupe_factor={self.dupe_factor} must be at least 1")
    if self.masking not in DATA_MASKING_MODES:
      raise UserError(f"--masking={self.masking} is not one of {', '.join(DATA_MASKING_MODES)}")

  @property
  def stored_predictions(self) -> int:
    """Prediction slots per stored instance: none when the trainer masks dynamically."""
    return self.max_predictions_per_seq if self.masking == "static" else 0


@dataclasses.dataclass(frozen=True)
class ShardTask:
  """One input shard: bytes [start, end) of `path`, from a line start to just after a blank line (or to EOF)."""

  path: str
  start: int
  end: int
  seed: int
  output_name: str


@dataclasses.dataclass
class Corpus:
  """The documents of one input shard: Google's `all_documents`, as ranges of one flat array of token ids.

  Sentence (segment) k is `tokens[segment_bounds[k]:segment_bounds[k + 1]]`; document d is segments
  `document_bounds[d]` to `document_bounds[d + 1]`. Empty documents are already dropped, as Google does.
  """

  tokens: array.array
  segment_bounds: array.array
  document_bounds: list[int]
  unknown_tokens: int = 0


@dataclasses.dataclass
class InstanceStore:
  """Instances in generation order, as compact arrays (Google keeps a list of Python objects).

  Instance i has ids `tokens[bounds[i]:bounds[i + 1]]` (after masking), segment B starting at `segment_b_starts[i]`,
  predictions `prediction_positions/labels[prediction_bounds[i]:prediction_bounds[i + 1]]`, and its next-sentence
  label (1 = random) in `next_sentence_labels[i]`.
  """

  tokens: array.array  # typed to hold every vocabulary id, as is prediction_labels
  prediction_labels: array.array
  bounds: array.array = dataclasses.field(default_factory=lambda: array.array("q", [0]))
  segment_b_starts: array.array = dataclasses.field(default_factory=lambda: array.array("H"))
  prediction_positions: array.array = dataclasses.field(default_factory=lambda: array.array("H"))
  prediction_bounds: array.array = dataclasses.field(default_factory=lambda: array.array("q", [0]))
  next_sentence_labels: bytearray = dataclasses.field(default_factory=bytearray)

  def __len__(self) -> int:
    return len(self.next_sentence_labels)


@dataclasses.dataclass(frozen=True)
class VocabIds:
  """What generation needs from the vocabulary, as ids."""

  cls_id: int
  sep_id: int
  mask_id: int
  unk_id: int
  num_words: int  # len(Google's vocab_words): random replacements are drawn from [0, num_words)
  is_continuation: bytes  # is_continuation[id] == 1 iff the token starts with "##" (whole-word masking)

  @classmethod
  def from_tokenizer(cls, tokenizer: FullTokenizer) -> VocabIds:
    vocab = tokenizer.vocab
    return cls(
      cls_id=vocab[CLS],
      sep_id=vocab[SEP],
      mask_id=vocab[MASK],
      unk_id=vocab[UNK],
      num_words=len(vocab),
      is_continuation=bytes(token.startswith(CONTINUATION_PREFIX) for token in vocab),
    )

  @property
  def id_typecode(self) -> str:
    """`array` typecode holding every id: 2 bytes while the vocabulary allows it, as in the native shard."""
    return "H" if self.num_words <= 1 << 16 else "I"


# ----------------------------------------------------------------------------------------------------------------
# Input: shards of files, read the way Google's tf.gfile reads them
# ----------------------------------------------------------------------------------------------------------------


def plan_shards(path: str | os.PathLike, max_shard_bytes: int) -> tuple[list[tuple[int, int]], int]:
  """Byte ranges [start, end) cutting `path` into about equal shards of at most ~`max_shard_bytes` bytes, each cut
  right after a blank line; and the number of forced cuts.

  Cutting after a blank line (a document boundary) keeps every document whole, so the shards hold exactly the
  file's documents. Only a document longer than `max_shard_bytes` is cut at a line start (a forced cut), so that
  memory stays bounded. Equal sizes keep parallel workers equally busy. Depends on the file and `max_shard_bytes`
  only, never on the number of workers.
  """
  size = os.path.getsize(path)
  count = max(1, -(-size // max_shard_bytes))
  ranges, forced_cuts = [], 0
  start = 0
  with open(path, "rb") as handle:
    for index in range(1, count):
      target = index * size // count
      if target <= start:
        continue  # a long document already carried the previous cut past this target
      end, forced = _cut_after_blank_line(handle, target, target + max_shard_bytes)
      if end >= size:
        break
      ranges.append((start, end))
      forced_cuts += forced
      start = end
  ranges.append((start, size))
  return ranges, forced_cuts


def _cut_after_blank_line(handle, target: int, give_up_at: int) -> tuple[int, bool]:
  """(offset just after the first blank line starting at or after `target`, False); or (the first line start after
  `target`, True) when no blank line starts before `give_up_at`. Reaching EOF gives (file size, False)."""
  handle.seek(target - 1)
  if handle.read(1) != b"\n":
    handle.readline()  # finish the line that `target` falls into: its tail could look blank without being blank
  first_line_start = position = handle.tell()
  while position < give_up_at:
    line = handle.readline()
    if not line:
      return position, False
    position += len(line)
    if _is_blank(line):
      return position, False
  return first_line_start, True


def _is_blank(raw_line: bytes) -> bool:
  """Google's document separator: a line that is empty after `str.strip()` (\\r is dropped on reading)."""
  line = raw_line.replace(b"\r", b"").decode("utf-8", "replace")
  return not line or line.isspace()


def read_corpus(
  task: ShardTask, tokenizer: FullTokenizer, vocab: VocabIds, on_bytes: Callable[[int], None] = lambda _: None
) -> Corpus:
  """Google's document reading for one input shard, tokenised in batches.

  Like `tf.gfile.GFile.readline`, lines end at "\\n" only and every "\\r" is dropped; text must be UTF-8 (Google's
  script dies on anything else; we name the line). A line that is blank after `strip()` ends the document; a line
  whose tokens are empty adds nothing.
  """
  tokens = array.array(vocab.id_typecode)
  segment_bounds = array.array("q", [0])
  document_bounds = [0]
  lines_before = 0
  with open(task.path, "rb") as handle:
    handle.seek(task.start)
    remaining = task.end - task.start
    pending = b""
    while True:
      chunk = handle.read(min(_READ_CHUNK_BYTES, remaining)) if remaining > 0 else b""
      remaining -= len(chunk)
      data = pending + chunk
      if chunk:
        cut = data.rfind(b"\n") + 1  # a chunk of whole lines: "\n" never occurs inside a UTF-8 character
        data, pending = data[:cut], data[cut:]
      elif not data:
        break
      else:
        pending = b""
      try:
        text = data.replace(b"\r", b"").decode("utf-8")
      except UnicodeDecodeError as error:
        raise UserError(_decode_error_message(task, data.replace(b"\r", b""), error, lines_before)) from None
      lines = text.split("\n")
      if text.endswith("\n"):
        lines.pop()
      lines_before += len(lines)
      for line, ids in zip(lines, tokenizer.encode_batch(lines)):
        if ids:
          tokens.extend(ids)
          segment_bounds.append(len(tokens))
        elif (not line or line.isspace()) and document_bounds[-1] != len(segment_bounds) - 1:
          document_bounds.append(len(segment_bounds) - 1)
      on_bytes(len(data))
      if not chunk:
        break
  if document_bounds[-1] != len(segment_bounds) - 1:
    document_bounds.append(len(segment_bounds) - 1)
  return Corpus(tokens, segment_bounds, document_bounds, unknown_tokens=tokens.count(vocab.unk_id))


def _decode_error_message(task: ShardTask, data: bytes, error: UnicodeDecodeError, lines_before: int) -> str:
  """Names the file and line (counted from the file start) of undecodable bytes, without quoting the text."""
  lines_before_shard, remaining = 0, task.start
  with open(task.path, "rb") as handle:  # counted in 16 MiB blocks: the shard may start gigabytes into the file
    while remaining > 0:
      block = handle.read(min(remaining, 16 << 20))
      if not block:
        break
      lines_before_shard += block.count(b"\n")
      remaining -= len(block)
  line_number = lines_before_shard + lines_before + data.count(b"\n", 0, error.start) + 1
  return (
    f"--input file {task.path} line {line_number} is not valid UTF-8 ({error.reason}); convert the file to "
    "UTF-8, e.g. with iconv"
  )


# ----------------------------------------------------------------------------------------------------------------
# Generation: Google's algorithm on ids
# ----------------------------------------------------------------------------------------------------------------


def check_python_random() -> None:
  """Fails unless this Python's `random.Random` draws as the inlined copies below assume.

  Generation inlines `Random.shuffle`, `randint` and `_randbelow` (CPython 3.11's getrandbits-based code) for speed;
  Google's output is defined by whatever the running Python's `random` does, so any difference must stop the run.
  """
  reference, ours = random.Random(20190410), random.Random(20190410)
  expected = list(range(300))
  reference.shuffle(expected)
  expected += [reference.randint(0, width - 1) for width in (1, 2, 3, 7, 1000, 2**31)] + [reference.random()]
  actual = list(range(300))
  _shuffle(actual, ours.getrandbits)
  actual += [_randbelow(width, ours.getrandbits) for width in (1, 2, 3, 7, 1000, 2**31)] + [ours.random()]
  if actual != expected:
    raise UserError(
      f"Python {sys.version.split()[0]}'s random module draws differently from CPython 3.11's, which "
      "this generator reproduces; run it with CPython 3.11-3.13"
    )


def _randbelow(n: int, getrandbits: Callable[[int], int]) -> int:
  """`Random._randbelow_with_getrandbits(n)`: what `randint(a, a + n - 1) - a` and `shuffle` draw."""
  bits = n.bit_length()
  value = getrandbits(bits)
  while value >= n:
    value = getrandbits(bits)
  return value


def _shuffle(items: list, getrandbits: Callable[[int], int]) -> None:
  """`Random.shuffle(items)` with the same draws, inlined."""
  for i in range(len(items) - 1, 0, -1):
    bound = i + 1
    bits = bound.bit_length()
    j = getrandbits(bits)
    while j >= bound:
      j = getrandbits(bits)
    items[i], items[j] = items[j], items[i]


def generate_instances(
  corpus: Corpus, options: InstanceOptions, vocab: VocabIds, seed: int, on_pass: Callable[[], None] = lambda: None
) -> tuple[InstanceStore, list[int]]:
  """Google's `create_training_instances` after reading: (instances in generation order, final order).

  The final order is Google's closing `rng.shuffle(instances)` applied to indices: instance `order[k]` is written
  k-th. Every random draw mirrors Google's code line by line; see `_DocumentGenerator`.
  """
  rng = random.Random(seed)
  getrandbits = rng.getrandbits
  num_documents = len(corpus.document_bounds) - 1
  order = list(range(num_documents))
  _shuffle(order, getrandbits)  # Google: rng.shuffle(all_documents)
  starts = [corpus.document_bounds[d] for d in order]
  stops = [corpus.document_bounds[d + 1] for d in order]
  store = InstanceStore(tokens=array.array(vocab.id_typecode), prediction_labels=array.array(vocab.id_typecode))
  generate_document = _DocumentGenerator(corpus, options, vocab, rng, starts, stops, store)
  for _ in range(options.dupe_factor):
    for document_index in range(num_documents):
      generate_document(document_index)
    on_pass()
  final_order = list(range(len(store)))
  _shuffle(final_order, getrandbits)  # Google: rng.shuffle(instances)
  return store, final_order


class _DocumentGenerator:
  """Google's `create_instances_from_document` + `truncate_seq_pair` + `create_masked_lm_predictions` on ids.

  One call handles one document of the shuffled list and appends its instances to the store. Draw for draw equal to
  Google's code: `rng.randint(a, b)` is `a + _randbelow(b - a + 1)`, shuffles are inlined `rng.shuffle`s.
  """

  def __init__(
    self,
    corpus: Corpus,
    options: InstanceOptions,
    vocab: VocabIds,
    rng: random.Random,
    starts: list[int],
    stops: list[int],
    store: InstanceStore,
  ):
    self.tokens = corpus.tokens
    self.bounds = corpus.segment_bounds
    self.options = options
    self.vocab = vocab
    self.rng = rng
    self.starts, self.stops = starts, stops
    self.store = store
    self.max_num_tokens = options.max_seq_length - 3
    # Python 3 round() (half to even) of the float product, as in Google's script, for every sequence length.
    self.num_to_predict = [
      min(options.max_predictions_per_seq, max(1, int(round(length * options.masked_lm_prob))))
      for length in range(options.max_seq_length + 1)
    ]
    # Per list length, the (index, getrandbits width) steps of Random.shuffle; filled as lengths occur.
    self.shuffle_steps: dict[int, list[tuple[int, int]]] = {}

  def __call__(self, document_index: int) -> None:
    random_float, getrandbits = self.rng.random, self.rng.getrandbits
    bounds = self.bounds
    max_num_tokens = self.max_num_tokens
    first, stop = self.starts[document_index], self.stops[document_index]
    target_length = max_num_tokens
    if random_float() < self.options.short_seq_prob:
      target_length = 2 + _randbelow(max_num_tokens - 1, getrandbits)
    chunk_first = i = first
    while i < stop:
      if i == stop - 1 or bounds[i + 1] - bounds[chunk_first] >= target_length:
        chunk_size = i - chunk_first + 1
        a_end = 1 if chunk_size < 2 else 1 + _randbelow(chunk_size - 1, getrandbits)
        a_start, a_stop = bounds[chunk_first], bounds[chunk_first + a_end]
        if chunk_size == 1 or random_float() < 0.5:
          is_random_next = 1
          target_b_length = target_length - (a_stop - a_start)
          for _ in range(10):
            random_document = _randbelow(len(self.starts), getrandbits)
            if random_document != document_index:
              break
          random_first, random_stop = self.starts[random_document], self.stops[random_document]
          random_start = random_first + _randbelow(random_stop - random_first, getrandbits)
          b_start = bounds[random_start]
          # Google appends segments from random_start until B reaches target_b_length or the document ends.
          b_stop = bounds[bisect.bisect_left(bounds, b_start + target_b_length, random_start + 1, random_stop)]
          i -= chunk_size - a_end  # "put back" the unused segments of the chunk
        else:
          is_random_next = 0
          b_start, b_stop = a_stop, bounds[i + 1]
        length_a, length_b = a_stop - a_start, b_stop - b_start
        while length_a + length_b > max_num_tokens:  # truncate_seq_pair: the longer side (ties: B) loses a token
          if length_a > length_b:
            if random_float() < 0.5:
              a_start += 1
            else:
              a_stop -= 1
            length_a -= 1
          else:
            if random_float() < 0.5:
              b_start += 1
            else:
              b_stop -= 1
            length_b -= 1
        self._emit(a_start, a_stop, b_start, b_stop, is_random_next)
        chunk_first = i + 1
      i += 1

  def _emit(self, a_start: int, a_stop: int, b_start: int, b_stop: int, is_random_next: int) -> None:
    store, vocab = self.store, self.vocab
    out = store.tokens
    base = len(out)
    out.append(vocab.cls_id)
    out.extend(self.tokens[a_start:a_stop])
    out.append(vocab.sep_id)
    out.extend(self.tokens[b_start:b_stop])
    out.append(vocab.sep_id)
    length_a = a_stop - a_start
    store.bounds.append(len(out))
    store.segment_b_starts.append(length_a + 2)
    store.next_sentence_labels.append(is_random_next)
    if self.options.masking == "static":
      self._mask(base, length_a, b_stop - b_start)
      store.prediction_bounds.append(len(store.prediction_positions))

  def _mask(self, base: int, length_a: int, length_b: int) -> None:
    """Google's create_masked_lm_predictions on `store.tokens[base:base + length_a + length_b + 3]`, in place."""
    out = self.store.tokens
    random_float, getrandbits = self.rng.random, self.rng.getrandbits
    positions_b = range(length_a + 2, length_a + length_b + 2)
    if self.options.do_whole_word_mask:
      candidates = []  # a "##" piece joins the previous group, even across the middle [SEP] (as in Google's code)
      is_continuation = self.vocab.is_continuation
      for position in (*range(1, length_a + 1), *positions_b):
        if candidates and is_continuation[out[base + position]]:
          candidates[-1].append(position)
        else:
          candidates.append([position])
    else:
      candidates = list(range(1, length_a + 1))
      candidates.extend(positions_b)
    count = len(candidates)
    steps = self.shuffle_steps.get(count)
    if steps is None:
      steps = self.shuffle_steps[count] = [(k, (k + 1).bit_length()) for k in range(count - 1, 0, -1)]
    for k, bits in steps:  # rng.shuffle(cand_indexes), inlined
      j = getrandbits(bits)
      while j > k:
        j = getrandbits(bits)
      candidates[k], candidates[j] = candidates[j], candidates[k]
    num_to_predict = self.num_to_predict[length_a + length_b + 3]
    if self.options.do_whole_word_mask:
      chosen = []
      for group in candidates:
        if len(chosen) >= num_to_predict:
          break
        if len(chosen) + len(group) <= num_to_predict:  # a word that does not fit is skipped, not split
          chosen.extend(group)
    else:
      chosen = candidates[:num_to_predict]
    in_order = sorted(chosen)
    self.store.prediction_positions.extend(in_order)
    self.store.prediction_labels.extend([out[base + position] for position in in_order])  # before masking
    mask_id, num_words = self.vocab.mask_id, self.vocab.num_words
    for position in chosen:  # the 80/10/10 draw in candidate order, per WordPiece even under whole-word masking
      if random_float() < 0.8:
        out[base + position] = mask_id
      elif random_float() >= 0.5:  # else: keep the original
        out[base + position] = _randbelow(num_words, getrandbits)


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def write_instances(
  store: InstanceStore,
  order: Sequence[int],
  writer,
  max_seq_length: int,
  max_predictions: int,
  on_block: Callable[[int], None] = lambda _: None,
) -> None:
  """Streams the instances in `order` to a `records` writer as Google-schema arrays, padded and written in blocks of
  `_WRITE_BLOCK` instances (`write_batch`), so memory stays bounded by one block and no instance is copied alone."""
  tokens = np.frombuffer(store.tokens, store.tokens.typecode)
  bounds = np.frombuffer(store.bounds, np.int64)
  segment_b_starts = np.frombuffer(store.segment_b_starts, np.uint16)
  labels = np.frombuffer(store.next_sentence_labels, np.uint8)
  prediction_positions = np.frombuffer(store.prediction_positions, np.uint16)
  prediction_labels = np.frombuffer(store.prediction_labels, store.prediction_labels.typecode)
  prediction_bounds = np.frombuffer(store.prediction_bounds, np.int64)
  positions = np.arange(max_seq_length)
  slots = np.arange(max_predictions)
  order = np.asarray(order, np.int64)
  for block_start in range(0, len(order), _WRITE_BLOCK):
    block = order[block_start : block_start + _WRITE_BLOCK]
    input_mask = positions < (bounds[block + 1] - bounds[block])[:, None]
    input_ids = np.where(input_mask, tokens[np.minimum(bounds[block][:, None] + positions, len(tokens) - 1)], 0)
    segment_ids = input_mask & (positions >= segment_b_starts[block][:, None])
    batch = {
      "input_ids": input_ids.astype(np.int32),
      "input_mask": input_mask.astype(np.int32),
      "segment_ids": segment_ids.astype(np.int32),
      "next_sentence_labels": labels[block].astype(np.int32),
    }
    if max_predictions:
      weights = slots < (prediction_bounds[block + 1] - prediction_bounds[block])[:, None]
      gather = np.minimum(prediction_bounds[block][:, None] + slots, max(len(prediction_positions) - 1, 0))
      batch["masked_lm_positions"] = np.where(weights, prediction_positions[gather], 0).astype(np.int32)
      batch["masked_lm_ids"] = np.where(weights, prediction_labels[gather], 0).astype(np.int32)
      batch["masked_lm_weights"] = weights.astype(np.float32)
    else:
      batch["masked_lm_positions"] = batch["masked_lm_ids"] = np.zeros((len(block), 0), np.int32)
      batch["masked_lm_weights"] = np.zeros((len(block), 0), np.float32)
    writer.write_batch(batch)
    on_block(len(block))


# ----------------------------------------------------------------------------------------------------------------
# One input shard, start to end (runs in a worker process)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Job:
  """What every shard of a run shares; sent once to each worker process."""

  vocab_file: str
  do_lower_case: bool
  options: InstanceOptions
  output_dir: str
  file_format: str
  vocab_size: int


class _ProgressReporter:
  """Credits the bar with bytes per phase and counts instances; throttled, so workers rarely touch the queue."""

  def __init__(self, task: ShardTask, send: Callable[[float, int], None]):
    self.shard_bytes = task.end - task.start
    self.send = send
    self.pending_bytes = 0.0
    self.pending_instances = 0
    self.last_sent = time.monotonic()

  def credit(self, phase: str, fraction: float, instances: int = 0) -> None:
    self.pending_bytes += self.shard_bytes * _PHASE_SHARE[phase] * fraction
    self.pending_instances += instances
    if time.monotonic() - self.last_sent >= _PROGRESS_INTERVAL_S:
      self.flush()

  def flush(self) -> None:
    if self.pending_bytes or self.pending_instances:
      self.send(self.pending_bytes, self.pending_instances)
    self.pending_bytes, self.pending_instances = 0.0, 0
    self.last_sent = time.monotonic()


class _ShardProcessor:
  """Reads, generates and writes input shards; one per process, so its tokenizer's word memo serves every shard."""

  def __init__(self, job: _Job, send_progress: Callable[[float, int], None]):
    self.job = job
    self.send_progress = send_progress
    self.tokenizer = FullTokenizer(job.vocab_file, job.do_lower_case)
    self.vocab = VocabIds.from_tokenizer(self.tokenizer)

  def __call__(self, task: ShardTask) -> dict[str, Any]:
    """Processes one input shard; returns its manifest entry (counts only, never text)."""
    job, options = self.job, self.job.options
    reporter = _ProgressReporter(task, self.send_progress)
    shard_bytes = max(task.end - task.start, 1)
    corpus = read_corpus(
      task, self.tokenizer, self.vocab, on_bytes=lambda size: reporter.credit("read", size / shard_bytes)
    )
    store, order = generate_instances(
      corpus, options, self.vocab, task.seed, on_pass=lambda: reporter.credit("generate", 1 / options.dupe_factor)
    )
    with records.open_writer(
      job.file_format,
      Path(job.output_dir) / task.output_name,
      options.max_seq_length,
      options.stored_predictions,
      job.vocab_size,
    ) as writer:
      write_instances(
        store,
        order,
        writer,
        options.max_seq_length,
        options.stored_predictions,
        on_block=lambda count: reporter.credit("write", count / max(len(order), 1), instances=count),
      )
      shard_info = writer.close()
    reporter.flush()
    return {
      **shard_info.to_json(),
      "input": task.path,
      "input_start": task.start,
      "input_end": task.end,
      "seed": task.seed,
      "documents": len(corpus.document_bounds) - 1,
      "sentences": len(corpus.segment_bounds) - 1,
      "tokens": len(corpus.tokens),
      "unknown_tokens": corpus.unknown_tokens,
      "random_next": sum(store.next_sentence_labels),
    }


def _make_shard_processor(job: _Job, report: Callable[[Any], None]) -> _ShardProcessor:
  """A worker's state (see `workers.ordered_map`): progress updates go to the parent as (bytes, instances)."""
  return _ShardProcessor(job, lambda *update: report(update))


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def plan_tasks(
  input_patterns: str | Sequence[str], max_shard_bytes: int, random_seed: int, file_format: str
) -> tuple[list[ShardTask], int]:
  """All input shards of all files in input order, with their seeds and output names; and the number of forced
  cuts (documents longer than a shard, split at a line)."""
  tasks, forced_cuts = [], 0
  for path in dict.fromkeys(expand_inputs(input_patterns)):  # a file matched by two globs is read once
    ranges, forced = plan_shards(path, max_shard_bytes)
    forced_cuts += forced
    tasks.extend(
      ShardTask(str(path), start, end, random_seed + shard_index, "") for shard_index, (start, end) in enumerate(ranges)
    )
  return [
    dataclasses.replace(task, output_name=records.shard_file_name(OUTPUT_PREFIX, index, len(tasks), file_format))
    for index, task in enumerate(tasks)
  ], forced_cuts


def create_pretraining_data(
  input_patterns: str | Sequence[str],
  vocab_file: str | os.PathLike,
  output_dir: str | os.PathLike,
  *,
  do_lower_case: bool = False,
  options: InstanceOptions = InstanceOptions(),
  num_workers: int = 1,
  output_format: str = "native",
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  overwrite: bool = False,
  show_progress: bool = False,
  flags_for_manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Writes instance shards and `manifest.json` into `output_dir` (atomically) and returns the manifest.

  UserError for bad options, a vocabulary without BERT's special tokens, inputs that match nothing or are not
  UTF-8, a non-empty `output_dir` without `overwrite`, or a corpus that yields no instance at all.
  """
  options.validate()
  if output_format not in OUTPUT_FORMATS:
    raise UserError(f"--output_format={output_format} is not one of {', '.join(OUTPUT_FORMATS)}")
  if num_workers < 1:
    raise UserError(f"--num_workers={num_workers} must be at least 1")
  if max_shard_bytes < 1:
    raise UserError(f"--max_shard_bytes={max_shard_bytes} must be positive")
  input_patterns = local_inputs(input_patterns, "--input")  # gs:// inputs: read from local copies
  vocab_file = local_copy(vocab_file, "--vocab_file")
  _warn_if_case_mismatch(vocab_file, check_vocab(vocab_file), do_lower_case)
  check_python_random()
  vocab_sha256, vocab_size = records.vocab_fingerprint(vocab_file)
  file_format = OUTPUT_FORMATS[output_format]
  tasks, forced_cuts = plan_tasks(input_patterns, max_shard_bytes, options.random_seed, file_format)
  started = time.monotonic()
  with atomic_output_dir(output_dir, overwrite) as staging:
    job = _Job(str(vocab_file), do_lower_case, options, str(staging), file_format, vocab_size)
    shards = _run(tasks, job, num_workers, show_progress)
    manifest = {
      "format": file_format,
      "vocab_sha256": vocab_sha256,
      "vocab_size": vocab_size,
      "do_lower_case": do_lower_case,
      "max_seq_length": options.max_seq_length,
      "max_predictions_per_seq": options.stored_predictions,
      "masking": options.masking,
      "dupe_factor": options.dupe_factor,
      "random_seed": options.random_seed,
      "masked_lm_prob": options.masked_lm_prob,
      "short_seq_prob": options.short_seq_prob,
      "do_whole_word_mask": options.do_whole_word_mask,
      "max_shard_bytes": max_shard_bytes,
      "forced_cuts": forced_cuts,
      "generator": "data_prep.create_pretraining_data (Google-identical per shard)",
      "flags": flags_for_manifest or {},
      "shards": shards,
      "totals": {
        key: sum(shard[key] for shard in shards)
        for key in ("documents", "sentences", "tokens", "unknown_tokens", "random_next", "count")
      },
    }
    if manifest["totals"]["count"] == 0:
      raise UserError(f"--input={input_patterns} yields no instances (no line has any token); check the input")
    records.write_manifest(staging, manifest)
  manifest["elapsed_s"] = time.monotonic() - started
  return manifest


def _run(tasks: list[ShardTask], job: _Job, num_workers: int, show_progress: bool) -> list[dict[str, Any]]:
  """Processes every task, in this process (one worker) or a spawned pool; manifest entries in task order."""
  from tqdm import tqdm

  total_bytes = sum(task.end - task.start for task in tasks)
  bar = tqdm(
    total=total_bytes,
    unit="B",
    unit_scale=True,
    desc="create_pretraining_data",
    file=sys.stderr,
    disable=not (show_progress and sys.stderr.isatty()),
    dynamic_ncols=True,
  )
  started, instances = time.monotonic(), 0

  def show(byte_credit: float, new_instances: int) -> None:
    nonlocal instances
    instances += new_instances
    rate = instances / max(time.monotonic() - started, 1e-9)
    bar.set_postfix_str(f"{instances:,} instances, {rate:,.0f} instances/s", refresh=False)
    bar.update(byte_credit)

  with bar:
    num_workers = min(num_workers, len(tasks))
    order = list(range(len(tasks)))
    if num_workers > 1:
      order.sort(key=lambda index: tasks[index].start - tasks[index].end)  # largest first: workers finish together
    results = list(
      workers.ordered_map(
        functools.partial(_make_shard_processor, job),
        [tasks[index] for index in order],
        num_workers=num_workers,
        max_in_flight=len(tasks),
        on_progress=lambda update: show(*update),
        died_hint="lower --num_workers or --max_shard_bytes",
      )
    )
    entries = dict(zip(order, results))
    return [entries[index] for index in range(len(tasks))]


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _define_flags() -> None:
  """Defined only when run as a program: spawned workers re-import this module and must not define them twice."""
  from absl import flags

  flags.DEFINE_string(
    "input",
    None,
    "Comma-separated globs of text files: one sentence per line, blank line "
    "between documents. Each file is generated separately, as its own Google run.",
  )
  flags.DEFINE_string("vocab_file", None, "BERT vocab.txt.")
  flags.DEFINE_string("output_dir", None, "Directory for the instance shards and manifest.json (written atomically).")
  flags.DEFINE_bool(
    "do_lower_case",
    False,
    "Lower-case and strip accents (uncased vocabularies). Google's default "
    "is True; ClinicalBERT (cased) used False, which is the default here.",
  )
  flags.DEFINE_integer("max_seq_length", 128, "Maximum sequence length, [CLS] and [SEP]s included.")
  flags.DEFINE_integer("max_predictions_per_seq", 20, "Maximum masked-LM predictions per sequence.")
  flags.DEFINE_float("masked_lm_prob", 0.15, "Masked-LM probability.")
  flags.DEFINE_float("short_seq_prob", 0.1, "Probability of a shorter target length for a document.")
  flags.DEFINE_integer(
    "dupe_factor", 5, "Passes over the data, each with different masks and pairs (Google: 10, ClinicalBERT: 5)."
  )
  flags.DEFINE_integer("random_seed", 12345, "Seed of Python's random.Random (shard k of a file: seed + k).")
  flags.DEFINE_bool("do_whole_word_mask", False, "Mask whole words (Google's later option; ClinicalBERT: off).")
  flags.DEFINE_enum(
    "masking",
    "static",
    list(DATA_MASKING_MODES),
    "static: Google's masks; none: unmasked pairs for dynamic masking at training time.",
  )
  flags.DEFINE_integer(
    "num_workers", 1, "Worker processes; input shards are generated in parallel. Each holds one input shard in memory."
  )
  flags.DEFINE_enum(
    "output_format", "native", list(OUTPUT_FORMATS), "native (.cbj, memory-mapped) or tfrecord (Google's format)."
  )
  flags.DEFINE_integer(
    "max_shard_bytes",
    DEFAULT_MAX_SHARD_BYTES,
    "Input files larger than this are cut at blank lines into shards of about this size; bounds memory per worker.",
  )
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
  flags.DEFINE_bool("progress", True, "Progress bar on stderr (only when stderr is a terminal).")
  flags.mark_flags_as_required(["input", "vocab_file", "output_dir"])


def main(argv: Sequence[str]) -> None:
  from absl import flags

  values = flags.FLAGS
  options = InstanceOptions(
    max_seq_length=values.max_seq_length,
    max_predictions_per_seq=values.max_predictions_per_seq,
    masked_lm_prob=values.masked_lm_prob,
    short_seq_prob=values.short_seq_prob,
    dupe_factor=values.dupe_factor,
    random_seed=values.random_seed,
    do_whole_word_mask=values.do_whole_word_mask,
    masking=values.masking,
  )
  manifest = create_pretraining_data(
    values.input,
    values.vocab_file,
    values.output_dir,
    do_lower_case=values.do_lower_case,
    options=options,
    num_workers=values.num_workers,
    output_format=values.output_format,
    max_shard_bytes=values.max_shard_bytes,
    overwrite=values.overwrite,
    show_progress=values.progress,
    flags_for_manifest={flag.name: flag.value for flag in values.get_flags_for_module(sys.argv[0])},
  )
  totals = manifest["totals"]
  logging.info(
    "wrote %d instances in %d shards to %s in %.1f s (%d documents, %d sentences, %d tokens, %d random next)",
    totals["count"],
    len(manifest["shards"]),
    values.output_dir,
    manifest["elapsed_s"],
    totals["documents"],
    totals["sentences"],
    totals["tokens"],
    totals["random_next"],
  )
  if manifest["forced_cuts"]:
    logging.warning(
      "%d documents were longer than --max_shard_bytes and were cut at a line; raise it to keep them whole",
      manifest["forced_cuts"],
    )
  if totals["tokens"] and totals["unknown_tokens"] / totals["tokens"] > _UNK_RATE_WARNING:
    logging.warning(
      "%.1f%% of the tokens are [UNK]: check --vocab_file and --do_lower_case",
      100 * totals["unknown_tokens"] / totals["tokens"],
    )


def _warn_if_case_mismatch(vocab_file: str | os.PathLike, tokens: Sequence[str], do_lower_case: bool) -> None:
  """Cased text through an uncased vocabulary turns most capitalised words into [UNK]: say so before a long run."""
  from clinical_bert_jax.vocab import vocab_is_cased

  if not do_lower_case and not vocab_is_cased(list(tokens)):
    logging.warning("%s has no upper-case tokens (an uncased vocabulary) but --do_lower_case is off", vocab_file)


if __name__ == "__main__":
  _define_flags()
  run_absl(main)
