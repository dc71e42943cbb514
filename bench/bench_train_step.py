"""Train-step speed: compile time, step time, sequences/s, tokens/s, model TFLOP/s per device and MFU.

Runs `train.train_step` exactly as `pretrain` does (same runtime classes, optimizer, sharding, buffer donation) on a
synthetic batch that stays on the device, so the numbers are the step alone: no input pipeline, no logging, no
checkpoints. FLOPs are counted as in `metrics_io.train_flops_per_sequence` (sparse MLM head, bidirectional attention
in full); MFU uses the device's dense bf16 peak from `metrics_io.PEAK_BF16_FLOPS` (none on CPU).

  python bench/bench_train_step.py                           # auto: tiny+demo on CPU, demo+BERT-Base on accelerators
  python bench/bench_train_step.py --models=base --batch_size=256 --compute_dtypes=bfloat16 --parallelisms=pjit

Prints a markdown table and writes it into the `## train step` section of BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from absl import flags

from clinical_bert_jax import metrics_io, optimizers, train
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError, run_absl

REPO = Path(__file__).resolve().parents[1]
SECTION = "## train step"
MODELS = {
    "tiny": dict(vocab_size=45, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "demo": dict(vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "base": dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["auto"], f"Any of {', '.join(MODELS)}; auto: tiny,demo on CPU, demo,base otherwise.")
flags.DEFINE_integer("batch_size", 32, "Global batch size (the paper's 32).")
flags.DEFINE_integer("seq_length", 128, "Sequence length.")
flags.DEFINE_integer("predictions", 20, "Masked-LM prediction slots per sequence.")
flags.DEFINE_list("compute_dtypes", ["float32", "bfloat16"], "Compute dtypes to measure.")
flags.DEFINE_list("parallelisms", ["pjit", "pmap"], "pjit and/or pmap (data parallel over all devices).")
flags.DEFINE_integer("steps", 10, "Timed steps (after the warm-up steps).")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after compilation.")
flags.DEFINE_bool("update_benchmarks_md", True, "Write the table into BENCHMARKS.md.")


def synthetic_batch(batch: int, seq_length: int, predictions: int, vocab_size: int, seed: int = 0) -> dict:
  """Full-length sequences, two segments, `predictions` masked slots each: the step's worst (and usual) case."""
  rng = np.random.default_rng(seed)
  positions = np.sort(np.stack([rng.choice(np.arange(1, seq_length), predictions, replace=False)
                                for _ in range(batch)]), axis=1).astype(np.int32)
  return {"input_ids": rng.integers(5, vocab_size, (batch, seq_length), dtype=np.int32),
          "input_mask": np.ones((batch, seq_length), np.int32),
          "segment_ids": (np.arange(seq_length) >= seq_length // 2).astype(np.int32)[None].repeat(batch, 0),
          "masked_lm_positions": positions,
          "masked_lm_ids": rng.integers(5, vocab_size, (batch, predictions), dtype=np.int32),
          "masked_lm_weights": np.ones((batch, predictions), np.float32),
          "next_sentence_labels": rng.integers(0, 2, (batch,), dtype=np.int32)}


def measure(model_name: str, compute_dtype: str, parallelism: str) -> dict:
  config = BertConfig(**MODELS[model_name], max_position_embeddings=max(512, FLAGS.seq_length))
  cfg = train.TrainConfig(num_train_steps=10_000, num_warmup_steps=100, learning_rate=5e-5,
                          train_batch_size=FLAGS.batch_size, max_predictions_per_seq=FLAGS.predictions,
                          compute_dtype=compute_dtype, parallelism=parallelism)
  train.validate_config(cfg)
  tx = optimizers.make_optimizer(cfg.optimizer, cfg.learning_rate, cfg.num_train_steps, cfg.num_warmup_steps)
  init_key, train_key, eval_key = jax.random.split(jax.random.key(0), 3)
  runtime = train.make_runtime(cfg, config, tx, None, None, jax.random.key_data(eval_key))
  state = runtime.init_state(None, init_key, np.asarray(jax.random.key_data(train_key)))
  batch = runtime.put_batch(synthetic_batch(FLAGS.batch_size, FLAGS.seq_length, FLAGS.predictions,
                                            config.vocab_size))
  started = time.perf_counter()
  state, stats = runtime.train_step(state, batch, 0)
  jax.block_until_ready(stats)
  compile_seconds = time.perf_counter() - started
  for _ in range(FLAGS.warmup_steps):
    state, stats = runtime.train_step(state, batch, 0)
  jax.block_until_ready(stats)
  started = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, stats = runtime.train_step(state, batch, 0)
  jax.block_until_ready(stats)
  step_seconds = (time.perf_counter() - started) / FLAGS.steps

  sequences_per_second = FLAGS.batch_size / step_seconds
  flops = metrics_io.train_flops_per_sequence(config, FLAGS.seq_length, FLAGS.predictions)
  flops_per_device = sequences_per_second * flops / runtime.num_devices
  peak = metrics_io.peak_flops_per_device(jax.devices()[0].device_kind)
  parameters = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(runtime.host_params(state)))
  return {"model": f"{model_name} ({parameters / 1e6:.2f}M)", "dtype": compute_dtype, "parallelism": parallelism,
          "devices": runtime.num_devices, "compile s": f"{compile_seconds:.1f}", "step ms": f"{1e3 * step_seconds:.1f}",
          "seq/s": f"{sequences_per_second:,.0f}", "tokens/s": f"{sequences_per_second * FLAGS.seq_length:,.0f}",
          "TFLOP/s/device": f"{flops_per_device / 1e12:.3f}", "MFU": f"{100 * flops_per_device / peak:.1f}%" if peak
          else "n/a"}


def machine() -> str:
  load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
  return (f"{jax.device_count()} × {jax.devices()[0].device_kind} ({jax.default_backend()} backend), "
          f"{platform.machine()} host with {os.cpu_count()} cores (load average {load} at the end), "
          f"jax {jax.__version__}")


def update_benchmarks_md(path: Path, section: str) -> None:
  text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
  pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
  text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
  path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])}")
  models = FLAGS.models
  if models == ["auto"]:
    models = ["tiny", "demo"] if jax.default_backend() == "cpu" else ["demo", "base"]
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    raise UserError(f"--models: unknown {unknown}; use any of {', '.join(MODELS)}")
  rows = [measure(model, dtype, parallelism) for model in models for dtype in FLAGS.compute_dtypes
          for parallelism in FLAGS.parallelisms]
  header = list(rows[0])
  table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                    ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows])
  command = (f"python bench/bench_train_step.py --models={','.join(models)} --batch_size={FLAGS.batch_size} "
             f"--seq_length={FLAGS.seq_length} --predictions={FLAGS.predictions} "
             f"--compute_dtypes={','.join(FLAGS.compute_dtypes)} --parallelisms={','.join(FLAGS.parallelisms)} "
             f"--steps={FLAGS.steps}")
  section = (f"{SECTION}\n\n`{command}` on {machine()}. The jitted train step alone (forward, backward, bert_adam "
             "update, donated state) on a device-resident synthetic batch of full-length sequences; global batch "
             "split over all devices; FLOPs as in docs/pretraining.md (sparse MLM head, bidirectional attention in "
             "full); MFU against the dense bf16 peak (n/a where the device has no entry).\n\n" + table + "\n")
  print(section)
  if FLAGS.update_benchmarks_md:
    update_benchmarks_md(REPO / "BENCHMARKS.md", section)


if __name__ == "__main__":
  run_absl(main)
