"""Train-step speed side by side with Hugging Face PyTorch: one framework per process, the same model and batch.

One side (prints progress, then ONE JSON line as the last line of its output):

  python -m bench.train_step --config=base --framework=ours          # the step `pretrain` runs (train.make_runtime)
  python -m bench.train_step --config=base --framework=hf_pytorch    # BertForPreTraining + torch AdamW
  python -m bench.train_step --config=tiny --framework=ours --dtype=bfloat16 --batch_size=64 --steps=20

The comparison (`make bench`): both frameworks alternated, each side in a fresh process, `--repeats` times, the
median per side; writes the table with ratios into the `## train step` section of BENCHMARKS.md:

  python -m bench.train_step --framework=both --configs=tiny,base --repeats=2

Both sides: seq 128, 20 masked positions per sequence (all weights 1), two segments, dropout 0.1 on, global-norm
clipping at 1.0, AdamW (ours: `--optimizer=adamw` through `optimizers.make_optimizer`; theirs: `torch.optim.AdamW`),
fp32 unless `--dtype` says otherwise. Timed: the median of `--steps` steps after `--warmup_steps` untimed ones; the
batch stays in memory (no input pipeline). `compile_s` is the first step's time minus the median step (JAX: trace +
compile; PyTorch: first-call allocations). `matmul_peak_gflops` is the best of 20 runs of a 1024x768 @ 768x3072
matmul in the same framework, dtype and process; `fraction_of_peak` = the model FLOPs a step computes / step time /
that peak. Model FLOPs as `metrics_io.train_flops_per_sequence` (3 x forward, attention in full); ours computes the
MLM head at the 20 prediction slots only, HF's `BertForPreTraining` at all 128 positions, so each side's
`model_gflops_per_seq` counts what it computes and `useful_fraction_of_peak` counts the sparse-head FLOPs for both.
`peak_rss_gb` is the process's maximum resident set (getrusage), imports included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from absl import flags
from clinical_bert_jax import host_memory

REPO = Path(__file__).resolve().parents[1]
SECTION = "## train step"
HUGE_PAGE_SIDES = {"ours": "ours only, as users run each", "both": "both sides", "none": "neither side"}
SEQ_LENGTH, PREDICTIONS = 128, 20
CONFIGS = {  # model dims, default batch
  "tiny": (
    dict(vocab_size=28996, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    32,
  ),
  "base": (
    dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    8,
  ),
  "large": (
    dict(vocab_size=28996, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    4,
  ),
}
FRAMEWORKS = ("ours", "hf_pytorch")
MATMUL = (1024, 768, 3072)

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "tiny", list(CONFIGS), "Model: tiny, base (BERT-Base cased) or large (BERT-Large cased).")
flags.DEFINE_list("configs", ["tiny", "base"], "--framework=both: the configs to compare.")
flags.DEFINE_enum("framework", "both", [*FRAMEWORKS, "both"], "One side, or both alternated (writes BENCHMARKS.md).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters and optimizer stay fp32).")
flags.DEFINE_integer("batch_size", 0, "Sequences per step; 0: the config's (tiny 32, base 8, large 4).")
flags.DEFINE_integer("steps", 0, "Timed steps; 0: 5 for tiny, 2 otherwise.")
flags.DEFINE_integer("warmup_steps", 1, "Untimed steps after the first (compiling) one.")
flags.DEFINE_integer("repeats", 2, "--framework=both: processes per side for tiny, alternated.")
flags.DEFINE_integer("big_repeats", 2, "--framework=both: processes per side for base and large.")
flags.DEFINE_string("optimizer", "adamw", "Ours: optimizers.OPTIMIZER_NAMES (adamw matches torch's AdamW).")
flags.DEFINE_bool("scan_layers", False, "Ours: nn.scan over the encoder layers (train.TrainConfig.scan_layers).")
flags.DEFINE_string("remat", "none", "Ours: activation checkpointing none|full|dots (train.TrainConfig.remat).")
flags.DEFINE_integer("grad_accum_steps", 1, "Ours: micro-batches per step, accumulated inside the jitted step.")
flags.DEFINE_bool("compile_only", False, "Ours: only trace and compile the step (compile_s, peak RSS); no timing.")
flags.DEFINE_bool(
  "memory_only",
  False,
  "Ours: compile the step at each --memory_batch_sizes and report XLA's memory analysis (no step runs); with "
  "--memory_budget_gb, the largest batch whose estimated peak fits, from a linear fit over batch, compiled to check.",
)
flags.DEFINE_list("memory_batch_sizes", ["8", "32"], "--memory_only: batch sizes to compile.")
flags.DEFINE_float("memory_budget_gb", 0.0, "--memory_only: device memory budget in GiB (0: no search).")
flags.DEFINE_string("profile_dir", None, "Ours: write a jax.profiler trace of the timed steps here.")
flags.DEFINE_bool(
  "retain_heap",
  False,
  "--framework=both: run both sides with glibc malloc keeping freed memory (RETAIN_HEAP_TUNABLES: one arena, no "
  "mmap for large blocks, no trimming), so the step's large temporaries do not page-fault afresh every step.",
)
flags.DEFINE_enum(
  "huge_pages",
  "ours",
  ["ours", "both", "none"],
  "Which side runs with glibc.malloc.hugetlb=1 (clinical_bert_jax.host_memory): `ours` (default) as each framework "
  "runs for its users (our command lines switch it on themselves, a PyTorch script does not), `both`, or `none`. "
  "Ignored under --retain_heap.",
)
flags.DEFINE_bool("update_benchmarks_md", True, "--framework=both: write the table into BENCHMARKS.md.")


def synthetic_batch(batch: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Full-length sequences, two segments, PREDICTIONS sorted masked slots each (the step's usual case)."""
  rng = np.random.default_rng(seed)
  positions = np.sort(
    np.stack([rng.choice(np.arange(1, SEQ_LENGTH), PREDICTIONS, replace=False) for _ in range(batch)]), axis=1
  ).astype(np.int32)
  return {
    "input_ids": rng.integers(5, vocab_size, (batch, SEQ_LENGTH), dtype=np.int32),
    "input_mask": np.ones((batch, SEQ_LENGTH), np.int32),
    "segment_ids": (np.arange(SEQ_LENGTH) >= SEQ_LENGTH // 2).astype(np.int32)[None].repeat(batch, 0),
    "masked_lm_positions": positions,
    "masked_lm_ids": rng.integers(5, vocab_size, (batch, PREDICTIONS), dtype=np.int32),
    "masked_lm_weights": np.ones((batch, PREDICTIONS), np.float32),
    "next_sentence_labels": rng.integers(0, 2, (batch,), dtype=np.int32),
  }


_HOST_USAGE: dict[str, float] = {}  # per timed step: minor page faults, system and user CPU seconds (getrusage)
RETAIN_HEAP_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"


def _time_steps(step: Callable[[], None], steps: int, warmup_steps: int) -> tuple[float, list[float]]:
  """(first call seconds, timed step seconds); `step` must block until its result is ready. Also records the timed
  steps' page faults and CPU time in `_HOST_USAGE`."""
  started = time.perf_counter()
  step()
  first = time.perf_counter() - started
  for _ in range(warmup_steps):
    step()
  times = []
  before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    started = time.perf_counter()
    step()
    times.append(time.perf_counter() - started)
  after = resource.getrusage(resource.RUSAGE_SELF)
  _HOST_USAGE.update(
    minor_faults_per_step=(after.ru_minflt - before.ru_minflt) / max(steps, 1),
    system_cpu_s_per_step=(after.ru_stime - before.ru_stime) / max(steps, 1),
    user_cpu_s_per_step=(after.ru_utime - before.ru_utime) / max(steps, 1),
  )
  return first, times


def _best_gflops(matmul: Callable[[], None], repeats: int = 20) -> float:
  matmul()
  best = float("inf")
  for _ in range(repeats):
    started = time.perf_counter()
    matmul()
    best = min(best, time.perf_counter() - started)
  m, k, n = MATMUL
  return 2 * m * k * n / best / 1e9


def run_ours(dims: dict, batch_size: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  from clinical_bert_jax import train
  from clinical_bert_jax.config import BertConfig

  config = BertConfig(**dims)
  extra = {
    name: getattr(FLAGS, name)
    for name in ("scan_layers", "remat")
    if name in {field.name for field in dataclasses.fields(train.TrainConfig)}
  }
  cfg = train.TrainConfig(
    num_train_steps=10_000,
    num_warmup_steps=100,
    learning_rate=5e-5,
    train_batch_size=batch_size,
    max_predictions_per_seq=PREDICTIONS,
    optimizer=FLAGS.optimizer,
    compute_dtype=FLAGS.dtype,
    grad_accum_steps=FLAGS.grad_accum_steps,
    **extra,
  )
  cfg.validate()
  # Exactly the optimizer and runtime `train.train_and_evaluate` builds.
  tx = train.make_train_optimizer(cfg)
  init_key, train_key, eval_key = jax.random.split(jax.random.key(0), 3)
  runtime = train.make_runtime(cfg, config, tx, None, None, jax.random.key_data(eval_key))
  state = runtime.init_state(None, init_key, np.asarray(jax.random.key_data(train_key)))
  batch = runtime.put_batch(synthetic_batch(batch_size, config.vocab_size))
  holder = {"state": state}
  if FLAGS.memory_only:
    return {"memory": _memory_search(runtime, state, config.vocab_size), "versions": f"jax {jax.__version__}"}
  if FLAGS.compile_only:
    started = time.perf_counter()
    with runtime._mesh_context() if hasattr(runtime, "_mesh_context") else contextlib.nullcontext():
      runtime._train.lower(state, batch).compile()
    return {
      "compile_only_s": time.perf_counter() - started,
      "devices": runtime.num_devices,
      "versions": f"jax {jax.__version__}, {jax.devices()[0].device_kind}",
    }

  def step():
    holder["state"], stats = runtime.train_step(holder["state"], batch)
    jax.block_until_ready(stats)

  first, times = _time_steps(step, FLAGS.steps, FLAGS.warmup_steps)
  if FLAGS.profile_dir:
    with jax.profiler.trace(FLAGS.profile_dir):
      for _ in range(2):
        step()
  dtype = jnp.dtype(FLAGS.dtype)
  m, k, n = MATMUL
  a = jax.random.normal(jax.random.key(1), (m, k), dtype)
  b = jax.random.normal(jax.random.key(2), (k, n), dtype)
  matmul = jax.jit(jnp.matmul)
  peak = _best_gflops(lambda: matmul(a, b).block_until_ready())
  return {
    "first_s": first,
    "times": times,
    "matmul_peak_gflops": peak,
    "devices": runtime.num_devices,
    "versions": f"jax {jax.__version__}, {jax.devices()[0].device_kind}",
  }


def _step_memory(runtime, state, batch_size: int, vocab_size: int) -> dict[str, float]:
  """XLA's buffer assignment for the compiled step at `batch_size` (GiB): arguments (state + batch), outputs,
  temporaries and the estimated peak = arguments + outputs + temporaries - aliased (the donated state is updated in
  place)."""
  batch = runtime.put_batch(synthetic_batch(batch_size, vocab_size))
  with runtime._mesh_context():
    analysis = runtime._train.lower(state, batch).compile().memory_analysis()
  gib = lambda value: value / 2**30
  argument, output = gib(analysis.argument_size_in_bytes), gib(analysis.output_size_in_bytes)
  temp, alias = gib(analysis.temp_size_in_bytes), gib(analysis.alias_size_in_bytes)
  return {
    "batch_size": batch_size,
    "argument_gb": argument,
    "output_gb": output,
    "temp_gb": temp,
    "alias_gb": alias,
    "peak_gb": argument + output + temp - alias,
  }


def _memory_search(runtime, state, vocab_size: int) -> dict[str, Any]:
  points = [_step_memory(runtime, state, int(size), vocab_size) for size in FLAGS.memory_batch_sizes]
  result: dict[str, Any] = {"points": points}
  if FLAGS.memory_budget_gb > 0 and len(points) >= 2:
    sizes = np.array([point["batch_size"] for point in points], float)
    peaks = np.array([point["peak_gb"] for point in points])
    slope, intercept = np.polyfit(sizes, peaks, 1)
    predicted = int((FLAGS.memory_budget_gb - intercept) // slope)
    check = _step_memory(runtime, state, predicted, vocab_size)
    while (
      check["peak_gb"] > FLAGS.memory_budget_gb and predicted > 1
    ):  # the fit is an estimate: step down until it fits
      predicted = max(1, int(predicted * 0.95))
      check = _step_memory(runtime, state, predicted, vocab_size)
    result.update(
      budget_gb=FLAGS.memory_budget_gb,
      gb_per_sequence=float(slope),
      fixed_gb=float(intercept),
      largest_batch=predicted,
      largest_batch_check=check,
    )
  return result


def run_hf(dims: dict, batch_size: int) -> dict[str, Any]:
  import torch
  import transformers

  torch.manual_seed(0)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[FLAGS.dtype]
  config = transformers.BertConfig(
    **dims,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
  )
  model = transformers.BertForPreTraining(config)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, eps=1e-6)
  data = synthetic_batch(batch_size, config.vocab_size)
  labels = np.full((batch_size, SEQ_LENGTH), -100, np.int64)
  np.put_along_axis(labels, data["masked_lm_positions"], data["masked_lm_ids"], axis=1)
  inputs = {
    "input_ids": torch.from_numpy(data["input_ids"].astype(np.int64)),
    "attention_mask": torch.from_numpy(data["input_mask"].astype(np.int64)),
    "token_type_ids": torch.from_numpy(data["segment_ids"].astype(np.int64)),
    "labels": torch.from_numpy(labels),
    "next_sentence_label": torch.from_numpy(data["next_sentence_labels"].astype(np.int64)),
  }

  def step():
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
      loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  first, times = _time_steps(step, FLAGS.steps, FLAGS.warmup_steps)
  m, k, n = MATMUL
  a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
  with torch.no_grad():
    peak = _best_gflops(lambda: torch.matmul(a, b))
  return {
    "first_s": first,
    "times": times,
    "matmul_peak_gflops": peak,
    "devices": 1,
    "versions": f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
    f"{transformers.__version__}, attention {model.config._attn_implementation}",
  }


def run_one(config_name: str, framework: str) -> dict[str, Any]:
  from clinical_bert_jax import metrics_io
  from clinical_bert_jax.config import BertConfig

  dims, default_batch = CONFIGS[config_name]
  batch_size = FLAGS.batch_size or default_batch
  if FLAGS.steps <= 0:
    FLAGS.steps = 5 if config_name == "tiny" else 2
  measured = (run_ours if framework == "ours" else run_hf)(dims, batch_size)
  if FLAGS.memory_only:
    return {
      "config": config_name,
      "framework": framework,
      "dtype": FLAGS.dtype,
      "options": {"scan_layers": FLAGS.scan_layers, "remat": FLAGS.remat},
      **measured["memory"],
      "versions": measured["versions"],
    }
  if FLAGS.compile_only:
    return {
      "config": config_name,
      "framework": framework,
      "batch_size": batch_size,
      "dtype": FLAGS.dtype,
      "compile_s": measured["compile_only_s"],
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      "options": {"scan_layers": FLAGS.scan_layers, "remat": FLAGS.remat},
      "versions": measured["versions"],
    }
  config = BertConfig(**dims)
  sparse = metrics_io.train_flops_per_sequence(config, SEQ_LENGTH, PREDICTIONS)
  computed = sparse if framework == "ours" else metrics_io.train_flops_per_sequence(config, SEQ_LENGTH, SEQ_LENGTH)
  step_s = statistics.median(measured["times"])
  peak = measured["matmul_peak_gflops"] * 1e9 * measured["devices"]
  return {
    "config": config_name,
    "framework": framework,
    "dtype": FLAGS.dtype,
    "batch_size": batch_size,
    "seq_length": SEQ_LENGTH,
    "predictions": PREDICTIONS,
    "steps": len(measured["times"]),
    "seq_per_s": batch_size / step_s,
    "step_ms_median": 1e3 * step_s,
    "step_ms_all": [round(1e3 * value, 1) for value in measured["times"]],
    "compile_s": max(measured["first_s"] - step_s, 0.0),
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "matmul_peak_gflops": measured["matmul_peak_gflops"],
    "model_gflops_per_seq": computed / 1e9,
    "fraction_of_peak": computed * batch_size / step_s / peak,
    "useful_fraction_of_peak": sparse * batch_size / step_s / peak,
    **_HOST_USAGE,
    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    "options": {
      "optimizer": FLAGS.optimizer,
      "scan_layers": FLAGS.scan_layers,
      "remat": FLAGS.remat,
      "grad_accum_steps": FLAGS.grad_accum_steps,
    }
    if framework == "ours"
    else {},
    "versions": measured["versions"],
  }


# ---------------------------------------------------------------------------------------------- comparison
def _side(config_name: str, framework: str) -> dict[str, Any]:
  command = [
    sys.executable,
    "-m",
    "bench.train_step",
    f"--config={config_name}",
    f"--framework={framework}",
    f"--dtype={FLAGS.dtype}",
    f"--warmup_steps={FLAGS.warmup_steps}",
    f"--optimizer={FLAGS.optimizer}",
  ]
  command += [f"--huge_pages={'none' if FLAGS.retain_heap else FLAGS.huge_pages}"]
  command += [f"--batch_size={FLAGS.batch_size}"] if FLAGS.batch_size else []
  command += [f"--steps={FLAGS.steps}"] if FLAGS.steps else []
  print("$", " ".join(command[1:]), file=sys.stderr, flush=True)
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  if FLAGS.retain_heap:
    env["GLIBC_TUNABLES"] = RETAIN_HEAP_TUNABLES
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    raise RuntimeError(f"{' '.join(command[1:])} failed (exit {done.returncode}): {done.stderr[-2000:]}")
  result = json.loads(lines[-1])
  print(json.dumps(result), file=sys.stderr, flush=True)
  return result


def _row(config_name: str, ours: list[dict], theirs: list[dict]) -> str:
  med = lambda runs, key: statistics.median(run[key] for run in runs)

  def spread(runs: list[dict], key: str, fmt: str) -> str:
    low, high = (fmt.format(f(run[key] for run in runs)) for f in (min, max))
    return low if low == high else f"{low}–{high}"

  first = ours[0]
  return (
    f"| {config_name} (batch {first['batch_size']}) | {spread(ours, 'seq_per_s', '{:.2f}')} | "
    f"{spread(theirs, 'seq_per_s', '{:.2f}')} | **{med(ours, 'seq_per_s') / med(theirs, 'seq_per_s'):.2f}×** | "
    f"{med(ours, 'step_ms_median'):,.0f} / {med(theirs, 'step_ms_median'):,.0f} | "
    f"{med(ours, 'peak_rss_gb'):.2f} / {med(theirs, 'peak_rss_gb'):.2f} | "
    f"{med(ours, 'compile_s'):.1f} | {med(ours, 'matmul_peak_gflops'):.0f} / "
    f"{med(theirs, 'matmul_peak_gflops'):.0f}"
    f" | {100 * med(ours, 'fraction_of_peak'):.0f}% / {100 * med(theirs, 'fraction_of_peak'):.0f}% "
    f"({100 * med(theirs, 'useful_fraction_of_peak'):.0f}%) |"
  )


def compare(config_names: Sequence[str]) -> str:
  rows, versions = [], {}
  for config_name in config_names:
    runs = {framework: [] for framework in FRAMEWORKS}
    for repeat in range(FLAGS.repeats if config_name == "tiny" else FLAGS.big_repeats):
      order = FRAMEWORKS if repeat % 2 == 0 else FRAMEWORKS[::-1]
      for framework in order:
        result = _side(config_name, framework)
        runs[framework].append(result)
        versions[framework] = result["versions"]
    rows.append(_row(config_name, runs["ours"], runs["hf_pytorch"]))
  load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
  command = (
    f"python -m bench.train_step --framework=both --configs={','.join(config_names)} "
    f"--dtype={FLAGS.dtype} --repeats={FLAGS.repeats} --big_repeats={FLAGS.big_repeats}"
    + (f" --steps={FLAGS.steps}" if FLAGS.steps else "")
    + (" --retain_heap" if FLAGS.retain_heap else f" --huge_pages={FLAGS.huge_pages}")
  )
  header = (
    "| model | ours seq/s | HF PyTorch seq/s | ratio (medians) | step ms ours / HF | peak RSS GB ours / HF | "
    "compile s (ours) | matmul peak GFLOP/s ours / HF | fraction of peak ours / HF (HF useful) |"
  )
  return (
    f"{SECTION}\n\n`{command}` (`make bench`) on a {platform.machine()} host with {os.cpu_count()} cores, no "
    f"accelerator (CPU backend), shared with other jobs (load average {load} at the end): read the ratios, "
    f"measured in the same run, not the absolute times. Ours: {versions.get('ours')}; theirs: "
    f"{versions.get('hf_pytorch')}. Each side in its own process, alternated, {FLAGS.repeats} processes per "
    f"side for tiny and {FLAGS.big_repeats} for the others (ranges over processes, ratio of medians); "
    f"{FLAGS.dtype}, seq {SEQ_LENGTH}, {PREDICTIONS} masked "
    f"positions, dropout 0.1, clip 1.0, AdamW; huge pages (glibc.malloc.hugetlb=1) for "
    f"{'neither side (--retain_heap)' if FLAGS.retain_heap else HUGE_PAGE_SIDES[FLAGS.huge_pages]}; "
    f"model dims in `bench/train_step.py` (tiny: hidden 128, 2 layers, "
    f"vocab 28,996). Fraction of peak = model FLOPs a step computes / step time / the 1024x768 @ 768x3072 "
    f"matmul rate measured in the same process; HF computes the MLM head at all 128 positions, ours at the 20 "
    f"slots, so '(HF useful)' counts HF's rate with our sparse-head FLOPs.\n\n"
    + "\n".join([header, "|" + "---|" * 9] + rows)
    + "\n"
  )


def update_benchmarks_md(path: Path, section: str) -> None:
  """Replaces the `## train step` section up to the next `### `-free `## ` heading (subsections are kept if they
  are part of the section text)."""
  text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
  pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^### |^## |\Z)", re.S | re.M)
  text = (
    pattern.sub(lambda _: section + "\n", text, count=1)
    if pattern.search(text)
    else (text.rstrip("\n") + "\n\n" + section)
  )
  path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.framework == "both":
    unknown = sorted(set(FLAGS.configs) - set(CONFIGS))
    if unknown:
      raise SystemExit(f"--configs: unknown {unknown}; use any of {', '.join(CONFIGS)}")
    section = compare(FLAGS.configs)
    print(section)
    if FLAGS.update_benchmarks_md:
      update_benchmarks_md(REPO / "BENCHMARKS.md", section)
    return
  if FLAGS.huge_pages == "both" or (FLAGS.huge_pages == "ours" and FLAGS.framework == "ours"):
    host_memory.use_transparent_huge_pages()  # re-executes this side, as `pretrain` does, where it helps
  result = run_one(FLAGS.config, FLAGS.framework)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  from clinical_bert_jax.errors import run_absl

  run_absl(main)
