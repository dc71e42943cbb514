"""format_mimic throughput and memory: notes/s and peak RSS with 1 and 2 worker processes.

Builds one NOTEEVENTS CSV from the demo corpus (ACI-BENCH + synthetic notes) repeated --repeat times in a temporary
directory, then formats it once per worker count, each run in a fresh Python process so that its peak RSS is its own:
the parent (CSV reader + shard writer) via RUSAGE_SELF and the largest worker via RUSAGE_CHILDREN. CPU seconds of
all processes next to the wall time show whether the workers actually got a core each (on a busy machine they do not).
Prints a markdown table for BENCHMARKS.md (`## format_mimic`).

  python bench/bench_format_mimic.py --repeat=20 --workers=1,2
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from absl import flags

from clinical_bert_jax.errors import UserError, run_absl

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeat", 20, "how many times the demo corpus is repeated in the benchmark input")
flags.DEFINE_list("workers", ["1", "2"], "worker counts to measure")
flags.DEFINE_enum("section_bugs", "original", ["original", "fixed"], "section splitter mode")

DEMO_CORPUS = Path(__file__).resolve().parents[1] / "data_prep" / "demo_corpus"
DEMO_FILES = ("NOTEEVENTS_aci_bench.csv", "NOTEEVENTS_synthetic.csv")

# Runs in a child process: one timed format_notes call, then its own and its workers' peak RSS as JSON.
_RUN_ONE = """
import json, resource, sys, time
from data_prep.format_mimic import format_notes
source, output, workers, bugs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
manifest = format_notes(source, output, num_workers=workers, section_bugs=bugs)
seconds = time.perf_counter() - start
parent, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": seconds, "manifest": manifest,
                  "cpu_seconds": parent.ru_utime + parent.ru_stime + workers.ru_utime + workers.ru_stime,
                  "parent_rss_kib": parent.ru_maxrss, "worker_rss_kib": workers.ru_maxrss}))
"""


def build_input(path: Path, repeat: int) -> int:
  """Writes the demo files' rows `repeat` times under one header (bytes are copied: one row is not UTF-8)."""
  header, bodies = None, []
  for name in DEMO_FILES:
    first, _, body = (DEMO_CORPUS / name).read_bytes().partition(b"\n")
    if header not in (None, first):
      raise UserError(f"{name}: header differs from {DEMO_FILES[0]}; the demo files must share the NOTEEVENTS header")
    header = first
    bodies.append(body if body.endswith(b"\n") else body + b"\n")
  with path.open("wb") as handle:
    handle.write(header + b"\n")
    for _ in range(repeat):
      for body in bodies:
        handle.write(body)
  return path.stat().st_size


def run_once(source: Path, output: Path, workers: int, section_bugs: str) -> dict:
  result = subprocess.run(
    [sys.executable, "-c", _RUN_ONE, str(source), str(output), str(workers), section_bugs],
    capture_output=True,
    text=True,
    check=False,
  )
  if result.returncode != 0:
    raise UserError(f"benchmark run with {workers} worker(s) failed: {result.stderr.strip().splitlines()[-1:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str]) -> None:
  del argv
  workers = [int(value) for value in FLAGS.workers]
  if FLAGS.repeat < 1 or any(value < 1 for value in workers):
    raise UserError("--repeat and every --workers value must be at least 1")
  with tempfile.TemporaryDirectory(prefix="bench_format_mimic-") as scratch:
    source = Path(scratch) / "NOTEEVENTS_demo_x.csv"
    size = build_input(source, FLAGS.repeat)
    print(
      f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
      f"Python {platform.python_version()}; input: demo corpus x{FLAGS.repeat} = {size / 1e6:.1f} MB; "
      f"--section_bugs={FLAGS.section_bugs}\n"
    )
    print(
      "| workers | notes formatted | sentences | seconds | notes/s | input MB/s | CPU s (all processes) "
      "| peak RSS parent | peak RSS worker |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for index, count in enumerate(workers):
      run = run_once(source, Path(scratch) / f"out-{index}", count, FLAGS.section_bugs)
      manifest = run["manifest"]
      formatted = (
        manifest["notes_written"] + manifest["skipped"]["section_splitter_error"] + manifest["skipped"]["no_sentences"]
      )
      worker_rss = f"{run['worker_rss_kib'] / 1024:.0f} MiB" if count > 1 else "-"
      print(
        f"| {count} | {formatted} | {manifest['sentences']} | {run['seconds']:.2f} | "
        f"{formatted / run['seconds']:.0f} | {size / 1e6 / run['seconds']:.1f} | {run['cpu_seconds']:.2f} | "
        f"{run['parent_rss_kib'] / 1024:.0f} MiB | {worker_rss} |"
      )


if __name__ == "__main__":
  run_absl(main)
