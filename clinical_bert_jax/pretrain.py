"""Pretraining command line: `python -m clinical_bert_jax.pretrain --flagfile=experiments/discharge.cfg`.

Flag names follow Google's `run_pretraining.py` where it has one (input_file, output_dir, init_checkpoint,
bert_config_file, train_batch_size, ...). `--output_dir` is the run's workdir (docs/ARCHITECTURE.md): rerunning the
same command resumes from its newest checkpoint; the parameters, optimizer state, step, RNG and input position are
restored, so the run continues exactly as if it had never stopped. The full guide is docs/pretraining.md.

This file turns flags into checked settings, prepares the workdir (config.json, vocab.txt, flags.txt, ...), loads the
initial checkpoint and data, and hands over to `train.train_and_evaluate`; the loop itself is in train.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from absl import flags, logging

from clinical_bert_jax import checkpointing, dp, fileio, input_pipeline, model_io, train
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.fileio import atomic_write
from clinical_bert_jax.masking import MaskingVocab
from clinical_bert_jax.optimizers import OPTIMIZER_NAMES
from clinical_bert_jax.records import PretrainingData, vocab_fingerprint

# Where the train step gets its masks (--masking of pretrain); not the data tool's DATA_MASKING_MODES.
TRAIN_MASKING_MODES = ("auto", "static", "dynamic")
FLAGS_FILE = "flags.txt"
TRAINING_INFO_FILE = "training_info.json"
# Per-process flags: not written to flags.txt, which describes the run, not one process of it.
_PROCESS_FLAGS = ("coordinator_address", "num_processes", "process_id")


@dataclasses.dataclass(frozen=True)
class PretrainOptions:
  """The paths and data-related settings of a run; `train` holds the loop's settings."""

  input_file: str
  output_dir: str
  train: train.TrainConfig
  eval_input_file: str | None = None
  init_checkpoint: str | None = None
  bert_config_file: str | None = None
  vocab_file: str | None = None
  max_seq_length: int = 128
  masking: str = "auto"
  export_hf_dir: str | None = None
  data_cache_dir: str | None = None  # local cache of gs:// shards (shard_cache)


@dataclasses.dataclass
class _Model:
  config: BertConfig
  vocab_file: Path  # always local (a copy of a gs:// one)
  params: Any | None  # host arrays of the init checkpoint; None: from scratch or resuming
  do_lower_case: bool | None


# ----------------------------------------------------------------------------------------------------- workdir
def prepare_workdir(path: str) -> Path:
  """Creates the workdir and proves it is writable (UserError otherwise); called once every input has been checked,
  so bad input never leaves an empty workdir behind."""
  if fileio.is_remote(path):  # object storage has no directories to create: prove that objects can be written
    fileio.check_writable(path, "--output_dir")
    return fileio.as_path(path)
  workdir = Path(path)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):  # a private name: every process of a run probes at once
      pass
  except OSError as error:
    raise UserError(f"--output_dir={path} is not a writable directory ({error.strerror}); choose another "
                    "path") from None
  return workdir


def is_resuming(workdir: Path) -> bool:
  fileio.check_bucket(workdir, "--output_dir")
  return bool(checkpointing.restorable_steps(workdir))


def _check_export_dir(path: str | None) -> None:
  """Fails before training if --export_hf_dir holds something other than an earlier export (never overwritten)."""
  if not path:
    return
  directory = fileio.as_path(path)
  fileio.check_bucket(directory, "--export_hf_dir")
  if directory.exists() and not directory.is_dir():
    raise UserError(f"--export_hf_dir={path} exists and is not a directory; choose another path")
  if directory.is_dir() and any(directory.iterdir()) and not _is_hf_export(directory):
    raise UserError(f"--export_hf_dir={path} is not empty and does not hold an earlier export; choose an empty or "
                    "new directory")


def _is_hf_export(directory: Path) -> bool:
  return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------------- model
def resolve_model(options: PretrainOptions, workdir: Path, resuming: bool) -> _Model:
  """Model config, vocabulary and initial weights: from the workdir when resuming, else from the init checkpoint
  (`hf:DIR`, `tf:PREFIX`, our model directory or another workdir) or a from-scratch `--bert_config_file`."""
  if resuming:
    config = BertConfig.load(fileio.local_copy(workdir / "config.json"))
    if options.bert_config_file and BertConfig.load(_local(options.bert_config_file, "--bert_config_file")) != config:
      raise UserError(f"--bert_config_file={options.bert_config_file} differs from {workdir}/config.json of the run "
                      "being resumed; use a new --output_dir for a different model")
    vocab_file = _local(options.vocab_file, "--vocab_file") if options.vocab_file else fileio.local_copy(
        workdir / "vocab.txt")
    local_dir = fileio.local_files(workdir, ("tokenizer_config.json",)) if fileio.is_remote(workdir) else workdir
    return _Model(config, vocab_file, None, model_io.read_do_lower_case(local_dir, None))
  if options.init_checkpoint:
    loaded = model_io.load_model(options.init_checkpoint, bert_config_file=options.bert_config_file,
                                 vocab_file=options.vocab_file)
    vocab_file = _local(options.vocab_file, "--vocab_file") if options.vocab_file else loaded.vocab_file
    if vocab_file is None:
      raise UserError(f"--init_checkpoint={options.init_checkpoint} has no vocab.txt; pass --vocab_file")
    return _Model(loaded.config, vocab_file, loaded.params, loaded.do_lower_case)
  if not options.bert_config_file:
    raise UserError("pass --init_checkpoint (continue pretraining a model) or --bert_config_file (train from scratch)")
  if not options.vocab_file:
    raise UserError("--vocab_file is required when training from scratch (--bert_config_file without "
                    "--init_checkpoint)")
  return _Model(BertConfig.load(_local(options.bert_config_file, "--bert_config_file")),
                _local(options.vocab_file, "--vocab_file"), None, None)


def _local(path: str, flag: str) -> Path:
  """The local path of a small input (a download of a gs:// one); missing remote files fail here, naming `flag`."""
  return fileio.local_copy(path, flag)


def _check_vocab(model: _Model) -> tuple[str, int]:
  if not model.vocab_file.is_file():
    raise UserError(f"vocabulary {model.vocab_file} not found; check --vocab_file")
  sha256, size = vocab_fingerprint(model.vocab_file)
  if size != model.config.vocab_size:
    raise UserError(f"vocabulary {model.vocab_file} has {size} entries but the model has vocab_size="
                    f"{model.config.vocab_size}; pass the vocabulary the model was built with")
  return sha256, size


# -------------------------------------------------------------------------------------------------------- data
def _open_data(pattern: str, flag: str, options: PretrainOptions, vocab: tuple[str, int]) -> PretrainingData:
  return input_pipeline.open_pretraining_data(
      pattern, vocab_size=vocab[1], vocab_sha256=vocab[0], max_seq_length=options.max_seq_length,
      max_predictions_per_seq=options.train.max_predictions_per_seq, flag=flag, cache_dir=options.data_cache_dir)


def _check_casing(data: PretrainingData, flag: str, model: _Model) -> None:
  """Data tokenised with another casing than the model's would train on [UNK]s (or on pieces the model never saw)."""
  data_lower = (data.manifest or {}).get("do_lower_case")
  if data_lower is not None and model.do_lower_case is not None and bool(data_lower) != model.do_lower_case:
    def describe(lower: bool) -> str:
      return "uncased (do_lower_case=true)" if lower else "cased (do_lower_case=false)"

    raise UserError(f"{flag}: casing mismatch: the data's manifest says {describe(bool(data_lower))} but the model (vocabulary "
                    f"{model.vocab_file}) is {describe(model.do_lower_case)}; regenerate the data with "
                    f"create_pretraining_data --do_lower_case={str(model.do_lower_case).lower()}")


def _uses_dynamic_masking(data: PretrainingData, masking: str, flag: str) -> bool:
  """Whether the train step must mask `data` itself; UserError for unmasked data with --masking=static."""
  unmasked = input_pipeline.needs_dynamic_masking(data)
  if masking == "static" and unmasked:
    raise UserError(f"{flag}: the data carries no masked-LM predictions (written with masking=none); pass "
                    "--masking=dynamic (or auto)")
  return masking == "dynamic" or unmasked


def _check_batches_fit(cfg: train.TrainConfig, train_data: PretrainingData,
                       eval_data: PretrainingData | None) -> None:
  """The input pipeline would refuse these too, but only after the workdir is written: check before."""
  if cfg.train_batch_size > len(train_data):
    raise UserError(f"--train_batch_size={cfg.train_batch_size} needs {cfg.train_batch_size} sequences per step but "
                    f"--input_file has only {len(train_data)} instances; lower it or generate more data")
  if dp.is_enabled(cfg.dp_noise_multiplier, cfg.dp_l2_clip):
    dp.check_against_data(cfg.train_batch_size, cfg.grad_accum_steps, len(train_data), cfg.dp_delta)
  if eval_data is not None and cfg.eval_batch_size > len(eval_data):
    raise UserError(f"--eval_batch_size={cfg.eval_batch_size} is larger than the {len(eval_data)} instances of "
                    "--eval_input_file; lower it")


# ------------------------------------------------------------------------------------------------------- setup
def _write_run_files(workdir: Path, model: _Model, options: PretrainOptions, flagfile_text: str | None) -> None:
  """config.json, vocab.txt, tokenizer_config.json, training_info.json, flags.txt: what `model_io.load_model`,
  export and a rerun need."""
  config_path = workdir / "config.json"
  if config_path.exists():
    if BertConfig.load(fileio.local_copy(config_path)) != model.config:
      raise UserError(f"{config_path} describes another model than this run's; use a new --output_dir")
  else:
    model.config.save_hf(config_path)
  if fileio.is_remote(workdir) or model.vocab_file.resolve() != (workdir / "vocab.txt").resolve():
    with atomic_write(workdir / "vocab.txt", mode="wb") as handle:
      handle.write(model.vocab_file.read_bytes())
  if model.do_lower_case is not None:
    with atomic_write(workdir / "tokenizer_config.json") as handle:
      json.dump({"do_lower_case": model.do_lower_case}, handle)
  info = {"max_seq_length": options.max_seq_length,
          "max_predictions_per_seq": options.train.max_predictions_per_seq,
          "num_train_steps": options.train.num_train_steps, "init_checkpoint": options.init_checkpoint}
  with atomic_write(workdir / TRAINING_INFO_FILE) as handle:
    json.dump(info, handle, indent=2)
  if flagfile_text is not None:
    with atomic_write(workdir / FLAGS_FILE) as handle:
      handle.write(flagfile_text)


def check_options(options: PretrainOptions) -> None:
  """Cheap checks of everything that does not need the data or the model (fail before any work)."""
  cfg = options.train
  if options.masking not in TRAIN_MASKING_MODES:
    raise UserError(f"--masking={options.masking!r} is not known; use one of {', '.join(TRAIN_MASKING_MODES)}")
  for flag, value in (("--max_seq_length", options.max_seq_length), ("--train_batch_size", cfg.train_batch_size),
                      ("--max_predictions_per_seq", cfg.max_predictions_per_seq),
                      ("--save_checkpoints_steps", cfg.save_checkpoints_steps),
                      ("--keep_checkpoints", cfg.keep_checkpoints), ("--log_every_steps", cfg.log_every_steps),
                      ("--eval_batch_size", cfg.eval_batch_size), ("--max_eval_steps", cfg.max_eval_steps)):
    if value < 1:
      raise UserError(f"{flag}={value} must be at least 1")
  if cfg.eval_every_steps < 0:
    raise UserError(f"--eval_every_steps={cfg.eval_every_steps} must be >= 0 (0: evaluate at the start and end only)")
  if cfg.seed < 0:
    raise UserError(f"--seed={cfg.seed} must be a non-negative integer")
  if not 0.0 < cfg.masked_lm_prob <= 1.0:  # also rejects NaN
    raise UserError(f"--masked_lm_prob={cfg.masked_lm_prob} must be in (0, 1]")
  train.validate_config(cfg)


def run(options: PretrainOptions, flagfile_text: str | None = None,
        print_fn: Callable[[str], None] = print) -> train.TrainResult:
  """The whole command: checks, workdir, model, data, training, export. Returns the loop's result."""
  check_options(options)
  _check_export_dir(options.export_hf_dir)
  workdir = fileio.as_path(options.output_dir)
  resuming = is_resuming(workdir)
  model = resolve_model(options, workdir, resuming)
  if options.max_seq_length > model.config.max_position_embeddings:
    raise UserError(f"--max_seq_length={options.max_seq_length} exceeds the model's max_position_embeddings="
                    f"{model.config.max_position_embeddings}")
  vocab = _check_vocab(model)
  train_data = _open_data(options.input_file, "--input_file", options, vocab)
  eval_data = (_open_data(options.eval_input_file, "--eval_input_file", options, vocab)
               if options.eval_input_file else None)
  _check_casing(train_data, "--input_file", model)
  if eval_data is not None:
    _check_casing(eval_data, "--eval_input_file", model)
  train_dynamic = _uses_dynamic_masking(train_data, options.masking, "--input_file")
  eval_dynamic = eval_data is not None and _uses_dynamic_masking(eval_data, "auto", "--eval_input_file")
  masking_vocab = MaskingVocab.from_vocab_file(model.vocab_file) if train_dynamic or eval_dynamic else None
  train_vocab = masking_vocab if train_dynamic else None
  eval_vocab = masking_vocab if eval_dynamic else None

  _check_batches_fit(options.train, train_data, eval_data)

  prepare_workdir(options.output_dir)
  if jax.process_index() == 0:
    _write_run_files(workdir, model, options, flagfile_text)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("pretrain: workdir ready")
  micro_batch = options.train.train_batch_size  # a whole step's batch, split into micro-batches on the device
  print_fn(f"process {jax.process_index()}/{jax.process_count()}: {'resuming' if resuming else 'starting'} pretraining "
           f"in {workdir}: {len(train_data)} training instances, {'dynamic' if train_dynamic else 'static'} masking, "
           f"{jax.device_count()} device(s); this process reads {micro_batch // jax.process_count()} of every "
           f"{micro_batch} sequences")
  result = train.train_and_evaluate(options.train, model.config, workdir, train_data, eval_data, train_vocab,
                                    eval_vocab, init_params=model.params, print_fn=print_fn)
  if result.completed and options.export_hf_dir and jax.process_index() == 0:
    if result.start_step < result.step or not _is_hf_export(fileio.as_path(options.export_hf_dir)):
      _export(workdir, result.step, options.export_hf_dir)
    print_fn(f"exported the final model to {options.export_hf_dir} (Hugging Face BertForPreTraining)")
  return result


def _export(workdir: Path, step: int, export_dir: str) -> None:
  """`python -m clinical_bert_jax.convert to_hf` on the final checkpoint (convert.export_hf, with its logits check).

  A child process on the CPU: the PyTorch check should not run inside the trainer's memory, and the trainer still
  holds the accelerator (a TPU cannot be opened by a second process).
  """
  command = [sys.executable, "-m", "clinical_bert_jax.convert", "to_hf", f"--checkpoint_dir={workdir}",
             f"--step={step}", f"--output_dir={export_dir}", "--overwrite"]
  finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if finished.returncode != 0:
    reason = next((line[len("error: "):] for line in finished.stderr.splitlines() if line.startswith("error: ")),
                  f"exit status {finished.returncode}")
    raise UserError(f"export to --export_hf_dir={export_dir} failed ({reason}); training finished: export later with "
                    f"python -m clinical_bert_jax.convert to_hf --checkpoint_dir={workdir} --output_dir=DIR")


# ------------------------------------------------------------------------------------------------------- flags
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command's flags (called from `__main__` only, so importing this module defines nothing)."""
  defaults = train.TrainConfig()
  # Google's run_pretraining.py names.
  flags.DEFINE_string("input_file", None, "Training data: comma-separated globs of .cbj shards or Google TFRecords, "
                      "or data directories (from create_pretraining_data).")
  flags.DEFINE_string("output_dir", None, "The run's workdir: checkpoints, metrics, flags. Rerunning resumes.")
  flags.DEFINE_string("init_checkpoint", None, "Model to continue pretraining: hf:DIR (Hugging Face), tf:PREFIX "
                      "(Google TF checkpoint; needs --bert_config_file), our model directory or a pretraining "
                      "workdir. Optimizer state and step start fresh. Absent: train from scratch.")
  flags.DEFINE_string("bert_config_file", None, "Model config (HF config.json or Google bert_config.json); required "
                      "from scratch and with tf:PREFIX.")
  flags.DEFINE_string("vocab_file", None, "vocab.txt; default: the init checkpoint's (or the workdir's on resume).")
  flags.DEFINE_integer("train_batch_size", defaults.train_batch_size,
                       "Global batch size (sequences per optimizer update, all devices).")
  flags.DEFINE_integer("max_seq_length", 128, "Sequence length of the data (checked against the shards).")
  flags.DEFINE_integer("max_predictions_per_seq", defaults.max_predictions_per_seq,
                       "Masked-LM prediction slots per sequence (checked against statically masked shards).")
  flags.DEFINE_integer("num_train_steps", defaults.num_train_steps, "Optimizer updates in total.")
  flags.DEFINE_integer("num_warmup_steps", defaults.num_warmup_steps, "Learning-rate warmup updates.")
  flags.DEFINE_float("learning_rate", defaults.learning_rate, "Peak learning rate.")
  flags.DEFINE_integer("save_checkpoints_steps", defaults.save_checkpoints_steps,
                       "Save a checkpoint every N steps (and at the end, and on SIGTERM).")
  flags.DEFINE_integer("eval_batch_size", defaults.eval_batch_size, "Global eval batch size.")
  flags.DEFINE_integer("max_eval_steps", defaults.max_eval_steps, "At most this many eval batches per evaluation.")
  # Ours.
  flags.DEFINE_string("eval_input_file", None, "Held-out data (same formats as --input_file); none: no evaluation.")
  flags.DEFINE_integer("eval_every_steps", defaults.eval_every_steps,
                       "Evaluate every N steps (0: only at the start and the end).")
  flags.DEFINE_enum("optimizer", defaults.optimizer, list(OPTIMIZER_NAMES),
                    "bert_adam (Google's AdamWeightDecay), adamw or lamb.")
  flags.DEFINE_string("lr_schedule", None, "bert (Google's, with the jump after warmup) or warmup_linear; default "
                      "depends on --optimizer.")
  flags.DEFINE_float("weight_decay", defaults.weight_decay, "Decoupled weight decay (not on LayerNorm and biases).")
  flags.DEFINE_float("clip_norm", defaults.clip_norm, "Global gradient-norm clipping (0: off).")
  flags.DEFINE_integer("grad_accum_steps", defaults.grad_accum_steps,
                       "Split each global batch into N sequential micro-batches (same update, less memory).")
  flags.DEFINE_bool("scan_layers", defaults.scan_layers, "Compile one encoder layer and scan it (faster compiles for "
                    "deep models; checkpoints keep per-layer names).")
  flags.DEFINE_enum("remat", defaults.remat, ["none", "full", "dots"], "Activation checkpointing per encoder layer: "
                    "none, full (recompute each layer in the backward pass) or dots (keep matmul outputs).")
  flags.DEFINE_enum("compute_dtype", defaults.compute_dtype, list(train.COMPUTE_DTYPES),
                    "Activation/matmul dtype; parameters and optimizer state stay float32.")
  flags.DEFINE_enum("masking", "auto", list(TRAIN_MASKING_MODES), "static: the masks stored in the data (Google); "
                    "dynamic: new masks every step on the device; auto: dynamic only for data written with "
                    "masking=none.")
  flags.DEFINE_bool("whole_word_mask", defaults.whole_word_mask, "Dynamic masking: mask whole words.")
  flags.DEFINE_float("masked_lm_prob", defaults.masked_lm_prob, "Dynamic masking: fraction of tokens predicted.")
  flags.DEFINE_enum("parallelism", defaults.parallelism, list(train.PARALLELISMS),
                    "pjit: jit over a (data, fsdp, tensor) mesh, multi-host; pmap: classic single-process data "
                    "parallelism.")
  flags.DEFINE_integer("mesh_data", defaults.mesh_data, "pjit mesh: data-parallel size (-1: all remaining devices).")
  flags.DEFINE_integer("mesh_fsdp", defaults.mesh_fsdp, "pjit mesh: FSDP size (parameters sharded).")
  flags.DEFINE_integer("mesh_tensor", defaults.mesh_tensor, "pjit mesh: tensor-parallel size.")
  flags.DEFINE_integer("keep_checkpoints", defaults.keep_checkpoints, "Keep the newest K checkpoints.")
  flags.DEFINE_bool("async_checkpointing", defaults.async_checkpointing, "Write checkpoints in the background.")
  flags.DEFINE_integer("seed", defaults.seed, "Seed of initialisation, data order, dropout and dynamic masks.")
  flags.DEFINE_integer("log_every_steps", defaults.log_every_steps, "Log metrics every N steps.")
  flags.DEFINE_string("export_hf_dir", None, "At the end, export the model here as a Hugging Face directory.")
  flags.DEFINE_float("dp_noise_multiplier", defaults.dp_noise_multiplier, "DP-SGD noise multiplier σ: Gaussian noise "
                     "of std σ·C on the sum of clipped per-example gradients (docs/privacy.md). Needs --dp_l2_clip.")
  flags.DEFINE_float("dp_l2_clip", defaults.dp_l2_clip, "DP-SGD per-example gradient L2 bound C (0: DP off).")
  flags.DEFINE_float("dp_delta", defaults.dp_delta, "DP-SGD: the δ at which ε is reported (metrics, model card).")
  flags.DEFINE_enum("dp_accountant", defaults.dp_accountant, ["rdp", "pld"], "DP-SGD accountant (dp-accounting).")
  flags.DEFINE_string("compilation_cache_dir", None, "Persistent XLA compilation cache (local or gs://): a rerun or "
                      "resume skips compiling the train step again.")
  flags.DEFINE_string("profile_steps", None, "START,END: write a jax.profiler trace of these steps to "
                      "WORKDIR/profile (TensorBoard profile plugin, Perfetto).")
  flags.DEFINE_string("data_cache_dir", None, "Local folder caching gs:// training shards (verified by their "
                      "checksums); default ~/.cache/clinical_bert_jax/shards.")
  flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0 (jax.distributed), or "
                      "auto (Cloud TPU pods, SLURM: JAX finds the processes).")
  flags.DEFINE_integer("num_processes", 1, "Multi-process: number of processes.")
  flags.DEFINE_integer("process_id", 0, "Multi-process: this process's index.")
  flags.mark_flags_as_required(["input_file", "output_dir"])


def options_from_flags() -> PretrainOptions:
  cfg = train.TrainConfig(
      num_train_steps=FLAGS.num_train_steps, num_warmup_steps=FLAGS.num_warmup_steps,
      learning_rate=FLAGS.learning_rate, train_batch_size=FLAGS.train_batch_size,
      max_predictions_per_seq=FLAGS.max_predictions_per_seq, optimizer=FLAGS.optimizer,
      lr_schedule=FLAGS.lr_schedule, weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip_norm,
      grad_accum_steps=FLAGS.grad_accum_steps, whole_word_mask=FLAGS.whole_word_mask,
      masked_lm_prob=FLAGS.masked_lm_prob, compute_dtype=FLAGS.compute_dtype, parallelism=FLAGS.parallelism,
      mesh_data=FLAGS.mesh_data, mesh_fsdp=FLAGS.mesh_fsdp, mesh_tensor=FLAGS.mesh_tensor, seed=FLAGS.seed,
      save_checkpoints_steps=FLAGS.save_checkpoints_steps, keep_checkpoints=FLAGS.keep_checkpoints,
      async_checkpointing=FLAGS.async_checkpointing, log_every_steps=FLAGS.log_every_steps,
      eval_every_steps=FLAGS.eval_every_steps, eval_batch_size=FLAGS.eval_batch_size,
      max_eval_steps=FLAGS.max_eval_steps, dp_noise_multiplier=FLAGS.dp_noise_multiplier,
      dp_l2_clip=FLAGS.dp_l2_clip, dp_delta=FLAGS.dp_delta, dp_accountant=FLAGS.dp_accountant,
      profile_steps=parse_profile_steps(FLAGS.profile_steps), scan_layers=FLAGS.scan_layers, remat=FLAGS.remat)
  return PretrainOptions(
      input_file=FLAGS.input_file, output_dir=FLAGS.output_dir, train=cfg, eval_input_file=FLAGS.eval_input_file,
      init_checkpoint=FLAGS.init_checkpoint, bert_config_file=FLAGS.bert_config_file, vocab_file=FLAGS.vocab_file,
      max_seq_length=FLAGS.max_seq_length, masking=FLAGS.masking, export_hf_dir=FLAGS.export_hf_dir,
      data_cache_dir=FLAGS.data_cache_dir)


def parse_profile_steps(value: str | None) -> tuple[int, int] | None:
  if not value:
    return None
  try:
    start, end = (int(part) for part in value.split(","))
  except ValueError:
    raise UserError(f"--profile_steps={value} must be START,END (two step numbers, e.g. 10,20)") from None
  if not 1 <= start <= end:
    raise UserError(f"--profile_steps={value} needs 1 <= START <= END")
  return start, end


def use_compilation_cache(directory: str | None) -> None:
  """Points JAX's persistent compilation cache at `directory` (local or gs://, through etils.epath)."""
  if not directory:
    return
  if fileio.is_remote(directory):
    fileio.check_writable(directory, "--compilation_cache_dir")
  jax.config.update("jax_compilation_cache_dir", directory)


def resolved_flagfile() -> str:
  """This command's flags with their resolved values, one per line: `--flagfile=WORKDIR/flags.txt` reruns the run."""
  lines = []
  for flag in FLAGS.get_flags_for_module(__name__):
    if flag.name in _PROCESS_FLAGS or flag.value is None:
      continue
    lines.append(flag.serialize())
  return "\n".join(sorted(lines)) + "\n"


def initialize_distributed() -> None:
  """`jax.distributed.initialize` for multi-process runs (before anything touches a device).

  `--coordinator_address=auto` lets JAX find the processes itself (Cloud TPU pods, SLURM); otherwise process 0's
  HOST:PORT, `--num_processes` and `--process_id` are given explicitly.
  """
  if FLAGS.coordinator_address == "auto":
    jax.distributed.initialize()
    return
  if FLAGS.num_processes == 1:
    return
  if not FLAGS.coordinator_address:
    raise UserError(f"--num_processes={FLAGS.num_processes} needs --coordinator_address=HOST:PORT of process 0")
  if not 0 <= FLAGS.process_id < FLAGS.num_processes:
    raise UserError(f"--process_id={FLAGS.process_id} must be in [0, --num_processes={FLAGS.num_processes})")
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                             process_id=FLAGS.process_id)


def main(argv: Sequence[str]) -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it
  initialize_distributed()
  use_compilation_cache(FLAGS.compilation_cache_dir)
  result = run(options_from_flags(), resolved_flagfile())
  if not result.completed:
    logging.info("stopped at step %d before --num_train_steps=%d; rerun to continue", result.step,
                 FLAGS.num_train_steps)


if __name__ == "__main__":
  define_flags()
  run_absl(main)
