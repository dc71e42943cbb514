"""Pretraining end to end: a small run learns, the CLI writes its workdir, bad input fails with one line.

The data is a synthetic "language" with structure a tiny BERT learns in a few hundred steps: every document walks
through a cycle of word ids one step at a time, so a masked word is its left neighbour plus one, and a random second
segment (NSP label 1) breaks the walk at the segment boundary. Helpers here are reused by the other engine tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_util import XLA_TEST_FLAG, assert_one_line_error, run_module
from clinical_bert_jax import checkpointing, metrics_io, pretrain, train
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.records import NativeShardWriter, TFRecordWriter, vocab_fingerprint, write_manifest

pytestmark = pytest.mark.slow  # trains and spawns pretrain

SEQ_LEN = 32
PREDICTIONS = 5
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CYCLE = 20  # word ids walk through a cycle of this many words
VOCAB_SIZE = len(SPECIALS) + CYCLE
CLS, SEP, MASK = 2, 3, 4
TINY_MODEL = {
  "vocab_size": VOCAB_SIZE,
  "hidden_size": 32,
  "num_hidden_layers": 2,
  "num_attention_heads": 2,
  "intermediate_size": 64,
  "max_position_embeddings": SEQ_LEN,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
}


def write_vocab(path: Path) -> Path:
  path.write_text("".join(f"{token}\n" for token in SPECIALS + tuple(f"w{i}" for i in range(CYCLE))), encoding="utf-8")
  return path


def write_model_config(path: Path, **changes) -> Path:
  path.write_text(json.dumps({**TINY_MODEL, **changes}), encoding="utf-8")
  return path


def make_instances(count: int, seed: int, masked: bool = True) -> list[dict[str, np.ndarray]]:
  """Sequence pairs of the cycle walk with Google-style static masks (15%, 80/10/10) or none."""
  rng = np.random.default_rng(seed)
  instances = []
  for _ in range(count):
    length_a, length_b = int(rng.integers(4, 14)), int(rng.integers(4, 14))
    start = int(rng.integers(CYCLE))
    is_random_next = int(rng.integers(2))
    start_b = int(rng.integers(CYCLE)) if is_random_next else start + length_a
    words_a = [len(SPECIALS) + (start + i) % CYCLE for i in range(length_a)]
    words_b = [len(SPECIALS) + (start_b + i) % CYCLE for i in range(length_b)]
    tokens = [CLS] + words_a + [SEP] + words_b + [SEP]
    num_tokens = len(tokens)
    input_ids = np.zeros(SEQ_LEN, np.int32)
    slots = PREDICTIONS if masked else 0
    positions, labels, weights = np.zeros(slots, np.int32), np.zeros(slots, np.int32), np.zeros(slots, np.float32)
    if masked:
      candidates = [i for i, token in enumerate(tokens) if token not in (CLS, SEP)]
      count_predictions = min(PREDICTIONS, max(1, round(num_tokens * 0.15)))
      chosen = np.sort(rng.choice(candidates, count_predictions, replace=False))
      positions[:count_predictions], labels[:count_predictions] = chosen, [tokens[i] for i in chosen]
      weights[:count_predictions] = 1.0
      for i in chosen:
        draw = rng.random()
        tokens[i] = MASK if draw < 0.8 else tokens[i] if draw < 0.9 else int(rng.integers(VOCAB_SIZE))
    input_ids[:num_tokens] = tokens
    index = np.arange(SEQ_LEN)
    instances.append(
      {
        "input_ids": input_ids,
        "input_mask": (index < num_tokens).astype(np.int32),
        "segment_ids": ((index >= len(words_a) + 2) & (index < num_tokens)).astype(np.int32),
        "masked_lm_positions": positions,
        "masked_lm_ids": labels,
        "masked_lm_weights": weights,
        "next_sentence_labels": np.int32(is_random_next),
      }
    )
  return instances


def write_dataset(
  directory: Path,
  vocab_file: Path,
  count: int,
  seed: int,
  num_shards: int = 2,
  masked: bool = True,
  tfrecord: bool = False,
) -> Path:
  """Shards + manifest like create_pretraining_data writes them (TFRecords: Google's files, no manifest)."""
  directory.mkdir(parents=True, exist_ok=True)
  instances = make_instances(count, seed, masked)
  infos = []
  for shard in range(num_shards):
    suffix, writer_class = (".tfrecord", TFRecordWriter) if tfrecord else (".cbj", NativeShardWriter)
    with writer_class(
      directory / f"part-{shard:05d}-of-{num_shards:05d}{suffix}", SEQ_LEN, PREDICTIONS if masked else 0, VOCAB_SIZE
    ) as writer:
      writer.write_many(instances[shard::num_shards])
    infos.append(writer.info)
  if not tfrecord:
    sha256, size = vocab_fingerprint(vocab_file)
    write_manifest(
      directory,
      {
        "format": "cbj",
        "vocab_sha256": sha256,
        "vocab_size": size,
        "do_lower_case": False,
        "max_seq_length": SEQ_LEN,
        "max_predictions_per_seq": PREDICTIONS if masked else 0,
        "masking": "static" if masked else "none",
        "shards": infos,
      },
    )
  return directory


@dataclasses.dataclass
class Corpus:
  vocab: Path
  model_config: Path
  train: Path
  eval: Path


def make_corpus(
  root: Path, train_count: int = 512, eval_count: int = 64, masked: bool = True, tfrecord: bool = False
) -> Corpus:
  root.mkdir(parents=True, exist_ok=True)
  vocab = write_vocab(root / "vocab.txt")
  return Corpus(
    vocab,
    write_model_config(root / "bert_config.json"),
    write_dataset(root / "train", vocab, train_count, seed=1, masked=masked, tfrecord=tfrecord),
    write_dataset(root / "eval", vocab, eval_count, seed=2, masked=masked, num_shards=1),
  )


def tiny_options(corpus: Corpus, workdir: Path, **train_changes) -> pretrain.PretrainOptions:
  cfg = train.TrainConfig(
    num_train_steps=40,
    num_warmup_steps=4,
    learning_rate=2e-3,
    train_batch_size=16,
    max_predictions_per_seq=PREDICTIONS,
    optimizer="adamw",
    save_checkpoints_steps=20,
    log_every_steps=10,
    eval_every_steps=20,
    eval_batch_size=16,
    max_eval_steps=4,
    seed=7,
  )
  return pretrain.PretrainOptions(
    input_file=str(corpus.train),
    output_dir=str(workdir),
    train=dataclasses.replace(cfg, **train_changes),
    eval_input_file=str(corpus.eval),
    bert_config_file=str(corpus.model_config),
    vocab_file=str(corpus.vocab),
    max_seq_length=SEQ_LEN,
    masking="static",
  )


def cli_args(corpus: Corpus, workdir: Path, **overrides) -> list[str]:
  """The flags of `tiny_options` for the command line."""
  flags = {
    "input_file": corpus.train,
    "eval_input_file": corpus.eval,
    "output_dir": workdir,
    "bert_config_file": corpus.model_config,
    "vocab_file": corpus.vocab,
    "max_seq_length": SEQ_LEN,
    "max_predictions_per_seq": PREDICTIONS,
    "train_batch_size": 16,
    "num_train_steps": 40,
    "num_warmup_steps": 4,
    "learning_rate": 2e-3,
    "optimizer": "adamw",
    "save_checkpoints_steps": 20,
    "log_every_steps": 10,
    "eval_every_steps": 20,
    "eval_batch_size": 16,
    "max_eval_steps": 4,
    "seed": 7,
    "masking": "static",
    **overrides,
  }
  return [f"--{name}={value}" for name, value in flags.items()]


def deterministic_records(workdir: Path) -> list[dict]:
  """metrics.jsonl without the wall-clock `perf/*` values."""
  return [
    {key: value for key, value in record.items() if not key.startswith("perf/")}
    for record in metrics_io.read_metrics(workdir / metrics_io.METRICS_FILE)
  ]


def pretrain_command(*args: str) -> list[str]:
  return [sys.executable, "-m", "clinical_bert_jax.pretrain", *args]


def subprocess_env(compile_cache: Path, devices: int = 1, **extra: str) -> dict[str, str]:
  """Environment of a child run: `devices` CPU devices (one by default, so children do not fight over the test
  machine's cores) and the test run's persistent compilation cache (the `compile_cache` fixture, tests/conftest.py)."""
  return {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {XLA_TEST_FLAG}",
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    **extra,
  }


# ------------------------------------------------------------------------------------------------------ tests
LEARNING_RUN = {
  "num_train_steps": 400,
  "num_warmup_steps": 30,
  "learning_rate": 1e-2,
  "train_batch_size": 32,
  "save_checkpoints_steps": 50,
  "log_every_steps": 10,
  "eval_every_steps": 200,
  "keep_checkpoints": 3,
}


def test_cli_run_learns_and_leaves_a_complete_workdir(tmp_path, compile_cache):
  """A demo-sized run from scratch: the loss falls and held-out MLM accuracy rises far above its start; the workdir
  holds everything docs/ARCHITECTURE.md promises; flags.txt reruns the run (a no-op resume); the export loads."""
  corpus = make_corpus(tmp_path / "data", train_count=2048)
  workdir, export = tmp_path / "run", tmp_path / "hf"
  env = subprocess_env(compile_cache)
  done = subprocess.run(
    pretrain_command(*cli_args(corpus, workdir, **LEARNING_RUN), f"--export_hf_dir={export}"),
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "step 400/400 | loss" in done.stdout and "seq/s" in done.stdout and "ETA" in done.stdout

  records = deterministic_records(workdir)
  train_losses = [record["train/loss"] for record in records if "train/loss" in record]
  evals = {record["step"]: record for record in records if "eval/mlm_accuracy" in record}
  assert len(train_losses) == 40 and sorted(evals) == [0, 200, 400]
  assert np.mean(train_losses[-5:]) < np.mean(train_losses[:5]) - 0.7
  assert evals[400]["eval/loss"] < evals[0]["eval/loss"] - 0.7
  assert evals[400]["eval/mlm_accuracy"] > evals[0]["eval/mlm_accuracy"] + 0.2
  assert all(key in records[-1] for key in ("eval/mlm_loss", "eval/nsp_loss", "eval/nsp_accuracy"))
  perf = [record for record in metrics_io.read_metrics(workdir / metrics_io.METRICS_FILE) if "perf/seq_per_s" in record]
  assert perf and all(record["perf/tokens_per_s"] == SEQ_LEN * record["perf/seq_per_s"] for record in perf)
  assert not any("perf/mfu" in record for record in perf)  # a CPU has no entry in the peak-FLOP table

  assert BertConfig.load(workdir / "config.json") == BertConfig.from_dict(TINY_MODEL)
  assert (workdir / "vocab.txt").read_bytes() == corpus.vocab.read_bytes()
  assert (workdir / metrics_io.LOSS_CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert list(workdir.glob("events.out.tfevents.*"))
  assert json.loads((workdir / pretrain.TRAINING_INFO_FILE).read_text())["max_seq_length"] == SEQ_LEN
  flag_lines = (workdir / pretrain.FLAGS_FILE).read_text().splitlines()
  assert "--num_train_steps=400" in flag_lines and f"--input_file={corpus.train}" in flag_lines
  assert not any(line.startswith("--process_id") for line in flag_lines)

  again = subprocess.run(
    pretrain_command(f"--flagfile={workdir / pretrain.FLAGS_FILE}"),
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming" in again.stdout and "step 400/400" not in again.stdout
  assert deterministic_records(workdir) == records

  hf_config = json.loads((export / "config.json").read_text())
  assert hf_config["vocab_size"] == VOCAB_SIZE and hf_config["architectures"] == ["BertForPreTraining"]
  assert (export / "model.safetensors").is_file() and (export / "vocab.txt").read_bytes() == corpus.vocab.read_bytes()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
  return make_corpus(tmp_path_factory.mktemp("corpus"), train_count=64, eval_count=32)


def _fails(options: pretrain.PretrainOptions, *fragments: str) -> str:
  with pytest.raises(UserError) as raised:
    pretrain.run(options, print_fn=lambda line: None)
  message = str(raised.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_bad_data_fails_with_one_line_naming_the_flag(corpus, tmp_path):
  options = tiny_options(corpus, tmp_path / "run")
  _fails(
    dataclasses.replace(options, input_file=str(tmp_path / "missing" / "*.cbj")), "--input_file=", "matches no files"
  )
  _fails(dataclasses.replace(options, input_file=" "), "--input_file is empty")
  _fails(dataclasses.replace(options, eval_input_file=str(tmp_path / "none-*.tfrecord")), "--eval_input_file=")
  empty = tmp_path / "empty"
  empty.mkdir()
  _fails(dataclasses.replace(options, input_file=str(empty)), "matches no files")
  # Same size, other tokens: the data was built for another vocabulary.
  other_vocab = tmp_path / "other_vocab.txt"
  other_vocab.write_text(corpus.vocab.read_text().replace("w1\n", "wOne\n"))
  _fails(dataclasses.replace(options, vocab_file=str(other_vocab)), "vocabulary mismatch", "--input_file=")
  _fails(dataclasses.replace(options, max_seq_length=16), "max_seq_length mismatch", "--max_seq_length=32")
  _fails(
    dataclasses.replace(
      options,
      masking="static",
      input_file=str(write_dataset(tmp_path / "unmasked", corpus.vocab, 16, seed=3, num_shards=1, masked=False)),
    ),
    "no masked-LM predictions",
    "--masking=dynamic",
  )
  assert not (tmp_path / "run").exists()


def test_bad_settings_fail_before_any_work(corpus, tmp_path):
  options = tiny_options(corpus, tmp_path / "run")
  replace = lambda **changes: dataclasses.replace(options, train=dataclasses.replace(options.train, **changes))
  _fails(replace(train_batch_size=12), "--train_batch_size", "cannot be split evenly", "multiple of 8")
  _fails(replace(train_batch_size=16, grad_accum_steps=3), "not divisible by --grad_accum_steps=3")
  _fails(replace(eval_batch_size=4), "--eval_batch_size")
  _fails(replace(optimizer="sgd"), "--optimizer='sgd' is not known")
  _fails(replace(mesh_data=3), "mesh sizes")
  _fails(replace(parallelism="tpu"), "--parallelism='tpu'")
  _fails(dataclasses.replace(options, masking="sometimes"), "--masking='sometimes'")
  file_in_the_way = tmp_path / "a_file"
  file_in_the_way.write_text("not a directory\n")
  _fails(
    dataclasses.replace(options, output_dir=str(file_in_the_way / "run")), "--output_dir=", "not a writable directory"
  )
  _fails(dataclasses.replace(options, export_hf_dir=str(file_in_the_way)), "--export_hf_dir=")
  _fails(dataclasses.replace(options, bert_config_file=None), "--init_checkpoint", "--bert_config_file")
  _fails(replace(seed=-1), "--seed=-1")
  _fails(replace(masked_lm_prob=float("nan")), "--masked_lm_prob=nan")
  _fails(replace(train_batch_size=8 * 4096), "--train_batch_size=32768", "instances")
  _fails(replace(eval_batch_size=8 * 4096), "--eval_batch_size=32768", "instances")
  assert not (tmp_path / "run").exists()  # bad input leaves no workdir behind


def test_unreadable_init_checkpoints_fail_with_one_line(corpus, tmp_path):
  options = tiny_options(corpus, tmp_path / "run")
  _fails(dataclasses.replace(options, init_checkpoint=str(tmp_path / "nowhere")), "not found")
  broken = tmp_path / "broken_hf"
  broken.mkdir()
  (broken / "config.json").write_text(json.dumps(TINY_MODEL))
  (broken / "model.safetensors").write_bytes(b"\x00\x01 definitely not safetensors")
  _fails(dataclasses.replace(options, init_checkpoint=f"hf:{broken}"), "model.safetensors")
  assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
  # A learning rate of 1e30 (reached after a 1-step warmup) blows the parameters up within a few steps.
  options = dataclasses.replace(
    tiny_options(
      corpus, tmp_path / "run", learning_rate=1e30, num_warmup_steps=1, save_checkpoints_steps=1, num_train_steps=12
    ),
    eval_input_file=None,
  )
  message = _fails(options, "training diverged", "non-finite")
  bad_step = int(message.split("at step ")[1].split(";")[0])
  good_steps = checkpointing.restorable_steps(tmp_path / "run")
  assert 1 < bad_step <= 12 and good_steps and max(good_steps) == bad_step - 1
  assert f"last good checkpoint is step {bad_step - 1}" in message


def test_cli_reports_flag_problems_in_one_line(corpus, tmp_path, compile_cache):
  env = subprocess_env(compile_cache)
  missing = run_module("clinical_bert_jax.pretrain", f"--flagfile={tmp_path / 'nope.cfg'}", env=env)
  assert missing.returncode == 2
  assert_one_line_error(missing, "nope.cfg")
  misspelt = run_module("clinical_bert_jax.pretrain", *cli_args(corpus, tmp_path / "run"), "--optimiser=lamb", env=env)
  assert_one_line_error(misspelt, "optimiser")
  unknown = run_module("clinical_bert_jax.pretrain", *cli_args(corpus, tmp_path / "run", optimizer="sgd"), env=env)
  assert_one_line_error(unknown, "--optimizer")
  bad_data = run_module("clinical_bert_jax.pretrain", *cli_args(corpus, tmp_path / "run", max_seq_length=16), env=env)
  assert bad_data.returncode == 2
  assert_one_line_error(bad_data, "max_seq_length mismatch")


def test_flop_count_matches_the_reference_numbers():
  # bert-pretraining.md §9.1: BERT-Base, S=128, 20 slots: 181.7M forward FLOPs per input token with the sparse head.
  base = BertConfig()
  forward_per_token = metrics_io.train_flops_per_sequence(base, 128, 20) / 3 / 128
  assert abs(forward_per_token - 181.7e6) / 181.7e6 < 1e-3
  assert metrics_io.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics_io.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
  assert metrics_io.peak_flops_per_device("TPU v5 lite") == 197e12
  assert metrics_io.peak_flops_per_device("cpu") is None
