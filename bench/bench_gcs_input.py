"""Training input from gs:// (through a GCS API emulator on loopback) against the same shards on local disk.

Writes synthetic native shards (seq 128, 20 predictions, vocab 28,996), uploads them with their manifest to a
`gcp-storage-emulator` bucket started in this process, then measures:

* cold open: `open_pretraining_data(gs://...)` with an empty `--data_cache_dir` (download + checksum + open), MB/s;
* warm open: the same with the cache filled (size/checksum check only);
* instances/s of `PretrainingInput` through the `Prefetcher` from the gs:// data and from the local original (the
  peer, measured in the same run).

The emulator serves from memory over loopback, so the download rate is an upper bound of nothing in particular
(a real bucket in the TPU's region reads at several hundred MB/s per VM); the training-time loader rate is what the
cache buys: it equals the local rate. Prints a markdown table for BENCHMARKS.md (`## input from gs://`).

  python bench/bench_gcs_input.py --num_instances=20000 --seconds=3
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_input_pipeline as local_bench  # noqa: E402  (its synthetic instances and flags)
from clinical_bert_jax import fileio, records  # noqa: E402
from clinical_bert_jax.errors import run_absl  # noqa: E402
from clinical_bert_jax.input_pipeline import Prefetcher, PretrainingInput, open_pretraining_data  # noqa: E402
from gcs_emulator import running_emulator  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_shards", 4, "shards the instances are split into")
flags.DEFINE_integer("repeats", 3, "measurements per configuration and source (median reported)")


def _write_shards(directory: Path) -> None:
  per_shard = -(-FLAGS.num_instances // FLAGS.num_shards)
  blocks = local_bench._synthetic_blocks(
    FLAGS.num_instances, FLAGS.max_seq_length, FLAGS.max_predictions_per_seq, FLAGS.vocab_size
  )
  instances = [instance for block in blocks for instance in block]
  infos = []
  for index in range(FLAGS.num_shards):
    name = records.shard_file_name("bench", index, FLAGS.num_shards)
    with records.NativeShardWriter(
      directory / name, FLAGS.max_seq_length, FLAGS.max_predictions_per_seq, FLAGS.vocab_size
    ) as writer:
      writer.write_many(instances[index * per_shard : (index + 1) * per_shard])
    infos.append(writer.info)
  records.write_manifest(
    directory,
    {
      "format": records.FORMAT_NATIVE,
      "vocab_sha256": None,
      "vocab_size": FLAGS.vocab_size,
      "do_lower_case": False,
      "max_seq_length": FLAGS.max_seq_length,
      "max_predictions_per_seq": FLAGS.max_predictions_per_seq,
      "masking": "static",
      "shards": [info.to_json() for info in infos],
    },
  )


def _open(pattern: str, cache: Path):
  return open_pretraining_data(
    pattern,
    vocab_size=FLAGS.vocab_size,
    vocab_sha256=None,
    max_seq_length=FLAGS.max_seq_length,
    max_predictions_per_seq=FLAGS.max_predictions_per_seq,
    cache_dir=str(cache),
  )


def main(argv) -> None:
  del argv
  rows = []
  with tempfile.TemporaryDirectory(prefix="bench_gcs_") as directory, running_emulator(("bench",)):
    local = Path(directory) / "shards"
    local.mkdir()
    _write_shards(local)
    size = sum(path.stat().st_size for path in local.glob("*.cbj"))
    fileio.upload_tree(local, "gs://bench/shards")
    cache = Path(directory) / "cache"
    start = time.perf_counter()
    remote = _open("gs://bench/shards", cache)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    remote = _open("gs://bench/shards", cache)
    warm = time.perf_counter() - start
    peer = _open(str(local), cache)
    for batch_size in (int(size) for size in FLAGS.batch_sizes):
      rates: dict[str, list[float]] = {"remote": [], "peer": []}
      for repeat in range(FLAGS.repeats):  # alternating, so load changes on a shared machine hit both alike
        for name, data in (("remote", remote), ("peer", peer))[:: 1 if repeat % 2 == 0 else -1]:
          with Prefetcher(PretrainingInput(data, batch_size, seed=1), FLAGS.prefetch) as prefetcher:
            rates[name].append(local_bench._rate(lambda: next(prefetcher), FLAGS.seconds) * batch_size)
      rows.append((batch_size, statistics.median(rates["remote"]), statistics.median(rates["peer"])))
  print(
    f"\nhost: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; "
    f"{FLAGS.num_instances} instances in {FLAGS.num_shards} native shards ({size / 2**20:.1f} MiB); "
    f"cold open (download + checksum + open) {cold:.2f} s = {size / 2**20 / cold:.1f} MiB/s, "
    f"warm open (cached) {warm:.2f} s\n"
  )
  print("| batch | instances/s from gs:// (cached), median | instances/s local (peer), median | ratio |")
  print("|---|---|---|---|")
  for batch_size, from_gcs, from_local in rows:
    print(
      f"| {batch_size}x{FLAGS.max_seq_length} | {from_gcs:,.0f} | {from_local:,.0f} | {from_gcs / from_local:.2f} |"
    )


if __name__ == "__main__":
  run_absl(main)
