"""Input pipeline throughput: can the host loader and the on-device masking keep up with a train step?

Writes synthetic BERT instances (seq 128, 20 predictions, vocab 28,996) as native shards and as TFRecords in a
temporary directory, then measures:

* host batches/s of `PretrainingInput` (shuffled random access, this host's full batch) per format and batch size,
  synchronously and through the background `Prefetcher` (what the train loop sees);
* milliseconds per batch of jitted `dynamic_mask` on the default JAX backend, per-piece and whole-word.

A BERT-Base step at batch 32 x 128 takes a few milliseconds on an H100, so the loader must deliver several hundred
batches/s there. Prints a markdown table for BENCHMARKS.md (`## input pipeline`).

  python bench/bench_input_pipeline.py --num_instances=20000 --seconds=3
"""

from __future__ import annotations

import functools
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from absl import flags

from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.input_pipeline import Prefetcher, PretrainingInput
from clinical_bert_jax.masking import MaskingVocab, dynamic_mask
from clinical_bert_jax.records import FORMAT_NATIVE, FORMAT_TFRECORD, PretrainingData, open_writer
from data_prep.build_vocab import special_tokens

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_instances", 20000, "synthetic instances written per format")
flags.DEFINE_integer("max_seq_length", 128, "sequence length of the synthetic instances")
flags.DEFINE_integer("max_predictions_per_seq", 20, "prediction slots of the synthetic instances")
flags.DEFINE_integer("vocab_size", 28996, "vocabulary size (BERT-Base cased)")
flags.DEFINE_list("batch_sizes", ["32", "256"], "global batch sizes to measure")
flags.DEFINE_float("seconds", 3.0, "measuring time per configuration")
flags.DEFINE_integer("prefetch", 4, "host batches the Prefetcher keeps ready")
flags.DEFINE_integer(
  "tfrecord_ab",
  0,
  "> 0: only the same-process A/B of TFRecord reading, the general protobuf parser (the reader before issue 9) "
  "against the vectorised one, this many alternated runs of --seconds each (sync, median per side).",
)

_WRITE_BLOCK = 1024


def _synthetic_blocks(num_instances: int, seq_len: int, predictions: int, vocab_size: int, seed: int = 0):
  """Yields lists of valid Google-layout instances; lengths skew long like real seq-128 data."""
  rng = np.random.default_rng(seed)
  positions = np.arange(seq_len)
  slots = np.arange(predictions)
  for start in range(0, num_instances, _WRITE_BLOCK):
    count = min(_WRITE_BLOCK, num_instances - start)
    lengths = np.where(rng.random(count) < 0.1, rng.integers(8, seq_len, count), seq_len)
    split = rng.integers(2, lengths - 2)
    ids = rng.integers(5, vocab_size, (count, seq_len))
    ids[:, 0] = 101
    ids[np.arange(count), split] = 102
    ids[np.arange(count), lengths - 1] = 102
    ids[positions >= lengths[:, None]] = 0
    num_predictions = np.minimum(predictions, np.maximum(1, np.round(lengths * 0.15).astype(int)))
    instances = []
    for row in range(count):
      chosen = np.sort(rng.choice(np.arange(1, lengths[row] - 1), num_predictions[row], replace=False))
      real = slots < num_predictions[row]
      instances.append(
        {
          "input_ids": ids[row],
          "input_mask": (positions < lengths[row]).astype(np.int64),
          "segment_ids": ((positions > split[row]) & (positions < lengths[row])).astype(np.int64),
          "masked_lm_positions": np.where(real, np.resize(chosen, predictions), 0),
          "masked_lm_ids": np.where(real, ids[row, np.resize(chosen, predictions)], 0),
          "masked_lm_weights": real.astype(np.float32),
          "next_sentence_labels": int(rng.integers(0, 2)),
        }
      )
    yield instances


def _write(directory: Path, file_format: str) -> tuple[PretrainingData, float]:
  path = directory / f"bench.{'cbj' if file_format == FORMAT_NATIVE else 'tfrecord'}"
  start = time.perf_counter()
  with open_writer(file_format, path, FLAGS.max_seq_length, FLAGS.max_predictions_per_seq, FLAGS.vocab_size) as writer:
    for block in _synthetic_blocks(
      FLAGS.num_instances, FLAGS.max_seq_length, FLAGS.max_predictions_per_seq, FLAGS.vocab_size
    ):
      writer.write_many(block)
  seconds = time.perf_counter() - start
  data = PretrainingData.open(str(path))
  data.validate_against(FLAGS.vocab_size, None, FLAGS.max_seq_length, FLAGS.max_predictions_per_seq)
  return data, seconds


def _rate(step: Callable[[], object], seconds: float, warmup: int = 3) -> float:
  """Calls per second of `step` over about `seconds`."""
  for _ in range(warmup):
    step()
  calls, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    step()
    calls += 1
  return calls / (time.perf_counter() - start)


def _masking_ms(batch_size: int, whole_word: bool) -> float:
  tokens = special_tokens(99)  # Google's layout: [PAD], [unused0..98], [UNK], [CLS], [SEP], [MASK]
  tokens += [f"##p{i}" if i % 5 == 0 else f"w{i}" for i in range(FLAGS.vocab_size - len(tokens))]
  vocab = MaskingVocab.from_tokens(tokens)
  mask = jax.jit(
    functools.partial(
      dynamic_mask,
      max_predictions_per_seq=FLAGS.max_predictions_per_seq,
      mask_token_id=vocab.mask_token_id,
      vocab_size=vocab.vocab_size,
      special_token_ids=vocab.special_token_ids,
      whole_word=whole_word,
      is_continuation=vocab.is_continuation,
    )
  )
  block = next(_synthetic_blocks(batch_size, FLAGS.max_seq_length, FLAGS.max_predictions_per_seq, FLAGS.vocab_size))
  input_ids = jax.device_put(np.stack([instance["input_ids"] for instance in block]).astype(np.int32))
  input_mask = jax.device_put(np.stack([instance["input_mask"] for instance in block]).astype(np.int32))
  keys = iter(jax.random.split(jax.random.key(0), 100000))
  rate = _rate(lambda: jax.block_until_ready(mask(next(keys), input_ids, input_mask)), FLAGS.seconds)
  return 1000.0 / rate


def _tfrecord_ab(data: PretrainingData, batch_sizes: list[int]) -> None:
  from clinical_bert_jax.records import tfrecord

  print("| batch | general parser (old) batches/s | vectorised batches/s | speed-up |\n|---|---|---|---|")
  vectorised = tfrecord._TFRecordShard._read_canonical
  for batch_size in batch_sizes:
    rates = {"general": [], "vectorised": []}
    for _ in range(FLAGS.tfrecord_ab):
      for side in rates:
        if side == "general":
          tfrecord._TFRecordShard._read_canonical = lambda self, indices: None  # every batch takes the parser
        pipeline = PretrainingInput(data, batch_size, seed=0)
        rates[side].append(_rate(lambda: next(pipeline), FLAGS.seconds))  # noqa: B023 (called right here)
        tfrecord._TFRecordShard._read_canonical = vectorised
    general, fast = (float(np.median(rates[side])) for side in ("general", "vectorised"))
    print(f"| {batch_size}x{FLAGS.max_seq_length} | {general:,.0f} | {fast:,.0f} | {fast / general:.1f}x |")
  print(f"load average {', '.join(f'{value:.1f}' for value in os.getloadavg())}")


def main(argv) -> None:
  del argv
  batch_sizes = [int(size) for size in FLAGS.batch_sizes]
  if FLAGS.tfrecord_ab > 0:
    with tempfile.TemporaryDirectory(prefix="bench_input_") as directory:
      _tfrecord_ab(_write(Path(directory), FORMAT_TFRECORD)[0], batch_sizes)
    return
  if any(size > FLAGS.num_instances for size in batch_sizes):
    raise UserError(f"--batch_sizes={FLAGS.batch_sizes} must not exceed --num_instances={FLAGS.num_instances}")
  rows = []
  with tempfile.TemporaryDirectory(prefix="bench_input_") as directory:
    for file_format in (FORMAT_NATIVE, FORMAT_TFRECORD):
      data, write_seconds = _write(Path(directory), file_format)
      print(f"wrote {FLAGS.num_instances} {file_format} instances in {write_seconds:.1f} s", flush=True)
      for batch_size in batch_sizes:
        pipeline = PretrainingInput(data, batch_size, seed=0)
        sync = _rate(lambda: next(pipeline), FLAGS.seconds)  # noqa: B023 (called right here)
        with Prefetcher(PretrainingInput(data, batch_size, seed=1), FLAGS.prefetch) as prefetcher:
          threaded = _rate(lambda: next(prefetcher), FLAGS.seconds)
        rows.append((file_format, batch_size, sync, threaded))

  print(
    f"\nhost: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; "
    f"{FLAGS.num_instances} instances of {FLAGS.max_seq_length} tokens / {FLAGS.max_predictions_per_seq} "
    "predictions, files in the page cache, shuffled random access\n"
  )
  print("| format | batch | batches/s (sync) | batches/s (Prefetcher) | instances/s (Prefetcher) |")
  print("|---|---|---|---|---|")
  for file_format, batch_size, sync, threaded in rows:
    print(
      f"| {file_format} | {batch_size}x{FLAGS.max_seq_length} | {sync:,.0f} | {threaded:,.0f} | "
      f"{threaded * batch_size:,.0f} |"
    )

  backend = jax.default_backend()
  print(f"\ndynamic_mask, jitted, on {backend} ({jax.devices()[0].device_kind}):\n")
  print("| batch | per-piece ms/batch | whole-word ms/batch |")
  print("|---|---|---|")
  for batch_size in batch_sizes:
    print(
      f"| {batch_size}x{FLAGS.max_seq_length} | {_masking_ms(batch_size, False):.2f} | "
      f"{_masking_ms(batch_size, True):.2f} |"
    )


if __name__ == "__main__":
  run_absl(main)
