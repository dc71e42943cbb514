"""Pretraining command line: `python -m clinical_bert_jax.pretrain --flagfile=experiments/discharge.cfg`.

Flag names follow Google's `run_pretraining.py` where it has one (input_file, output_dir, init_checkpoint,
bert_config_file, train_batch_size, ...). `--output_dir` is the run's workdir (docs/ARCHITECTURE.md): rerunning the
same command resumes from its newest checkpoint; the parameters, optimizer state, step, RNG and input position are
restored, so the run continues exactly as if it had never stopped. The full guide is docs/pretraining.md.

This file turns flags into checked settings, prepares the workdir (config.json, vocab.txt, flags.txt, ...), loads the
initial checkpoint and data, and hands over to `train.train_and_evaluate`; the loop itself is in train.py.
"""

from __future__ import annotations

from clinical_bert_jax import host_memory

if __name__ == "__main__":  # first, before anything below allocates: this may re-execute the command
  host_memory.use_transparent_huge_pages()

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

from clinical_bert_jax import checkpointing, fileio, input_pipeline, model_io, settings, train
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.fileio import atomic_write
from clinical_bert_jax.masking import MaskingVocab
from clinical_bert_jax.records import PretrainingData, vocab_fingerprint
from clinical_bert_jax.settings import setting

# Where the train step gets its masks (--masking of pretrain); not the data tool's DATA_MASKING_MODES.
TRAIN_MASKING_MODES = ("auto", "static", "dynamic")
FLAGS_FILE = "flags.txt"
TRAINING_INFO_FILE = "training_info.json"
# Per-process flags: not written to flags.txt, which describes the run, not one process of it.
_PROCESS_FLAGS = ("coordinator_address", "num_processes", "process_id")


@dataclasses.dataclass(frozen=True)
class PretrainOptions:
  """The paths and data-related settings of a run; `train` holds the loop's settings. Each field declared with
  `settings.setting` is a flag of this command (`google=True`: Google's `run_pretraining.py` name)."""

  input_file: str = setting(
    help="Training data: comma-separated globs of .cbj shards or Google TFRecords, or data "
    "directories (from create_pretraining_data).",
    google=True,
  )
  output_dir: str = setting(help="The run's workdir: checkpoints, metrics, flags. Rerunning resumes.", google=True)
  train: train.TrainConfig = dataclasses.field(default_factory=train.TrainConfig)
  eval_input_file: str | None = setting(None, help="Held-out data (same formats as --input_file); none: no evaluation.")
  init_checkpoint: str | None = setting(
    None,
    help="Model to continue pretraining: hf:DIR (Hugging Face), tf:PREFIX "
    "(Google TF checkpoint; needs --bert_config_file), our model directory or a "
    "pretraining workdir. Optimizer state and step start fresh. Absent: train "
    "from scratch.",
    google=True,
  )
  bert_config_file: str | None = setting(
    None,
    help="Model config (HF config.json or Google bert_config.json); required from scratch and with tf:PREFIX.",
    google=True,
  )
  vocab_file: str | None = setting(
    None, help="vocab.txt; default: the init checkpoint's (or the workdir's on resume).", google=True
  )
  max_seq_length: int = setting(128, help="Sequence length of the data (checked against the shards).", google=True)
  masking: str = setting(
    "auto",
    choices=TRAIN_MASKING_MODES,
    help="static: the masks stored in the data (Google); "
    "dynamic: new masks every step on the device; auto: dynamic only for data written with "
    "masking=none.",
  )
  export_hf_dir: str | None = setting(None, help="At the end, export the model here as a Hugging Face directory.")
  # local cache of gs:// shards (shard_cache)
  data_cache_dir: str | None = setting(
    None,
    help="Local folder caching gs:// training shards (verified by their "
    "checksums); default ~/.cache/clinical_bert_jax/shards.",
  )

  def validate(self) -> None:
    """The one check of the settings, before anything is read or written (the data's fit is `train.check_data_fit`,
    once the data is open)."""
    if self.masking not in TRAIN_MASKING_MODES:
      raise UserError(f"--masking={self.masking!r} is not known; use one of {', '.join(TRAIN_MASKING_MODES)}")
    if self.max_seq_length < 1:
      raise UserError(f"--max_seq_length={self.max_seq_length} must be at least 1")
    self.train.validate()


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
    raise UserError(
      f"--output_dir={path} is not a writable directory ({error.strerror}); choose another path"
    ) from None
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
    raise UserError(
      f"--export_hf_dir={path} is not empty and does not hold an earlier export; choose an empty or new directory"
    )


def _is_hf_export(directory: Path) -> bool:
  return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------------- model
def resolve_model(options: PretrainOptions, workdir: Path, resuming: bool) -> _Model:
  """Model config, vocabulary and initial weights: from the workdir when resuming, else from the init checkpoint
  (`hf:DIR`, `tf:PREFIX`, our model directory or another workdir) or a from-scratch `--bert_config_file`."""
  if resuming:
    config = BertConfig.load(fileio.local_copy(workdir / "config.json"))
    if options.bert_config_file and BertConfig.load(_local(options.bert_config_file, "--bert_config_file")) != config:
      raise UserError(
        f"--bert_config_file={options.bert_config_file} differs from {workdir}/config.json of the run "
        "being resumed; use a new --output_dir for a different model"
      )
    vocab_file = (
      _local(options.vocab_file, "--vocab_file") if options.vocab_file else fileio.local_copy(workdir / "vocab.txt")
    )
    local_dir = fileio.local_files(workdir, ("tokenizer_config.json",)) if fileio.is_remote(workdir) else workdir
    return _Model(config, vocab_file, None, model_io.read_do_lower_case(local_dir, None))
  if options.init_checkpoint:
    loaded = model_io.load_model(
      options.init_checkpoint, bert_config_file=options.bert_config_file, vocab_file=options.vocab_file
    )
    vocab_file = _local(options.vocab_file, "--vocab_file") if options.vocab_file else loaded.vocab_file
    if vocab_file is None:
      raise UserError(f"--init_checkpoint={options.init_checkpoint} has no vocab.txt; pass --vocab_file")
    return _Model(loaded.config, vocab_file, loaded.params, loaded.do_lower_case)
  if not options.bert_config_file:
    raise UserError("pass --init_checkpoint (continue pretraining a model) or --bert_config_file (train from scratch)")
  if not options.vocab_file:
    raise UserError(
      "--vocab_file is required when training from scratch (--bert_config_file without --init_checkpoint)"
    )
  return _Model(
    BertConfig.load(_local(options.bert_config_file, "--bert_config_file")),
    _local(options.vocab_file, "--vocab_file"),
    None,
    None,
  )


def _local(path: str, flag: str) -> Path:
  """The local path of a small input (a download of a gs:// one); missing remote files fail here, naming `flag`."""
  return fileio.local_copy(path, flag)


def _check_vocab(model: _Model) -> tuple[str, int]:
  if not model.vocab_file.is_file():
    raise UserError(f"vocabulary {model.vocab_file} not found; check --vocab_file")
  sha256, size = vocab_fingerprint(model.vocab_file)
  if size != model.config.vocab_size:
    raise UserError(
      f"vocabulary {model.vocab_file} has {size} entries but the model has vocab_size="
      f"{model.config.vocab_size}; pass the vocabulary the model was built with"
    )
  return sha256, size


# -------------------------------------------------------------------------------------------------------- data
def _open_data(pattern: str, flag: str, options: PretrainOptions, vocab: tuple[str, int]) -> PretrainingData:
  return input_pipeline.open_pretraining_data(
    pattern,
    vocab_size=vocab[1],
    vocab_sha256=vocab[0],
    max_seq_length=options.max_seq_length,
    max_predictions_per_seq=options.train.max_predictions_per_seq,
    flag=flag,
    cache_dir=options.data_cache_dir,
  )


def _check_casing(data: PretrainingData, flag: str, model: _Model) -> None:
  """Data tokenised with another casing than the model's would train on [UNK]s (or on pieces the model never saw)."""
  data_lower = (data.manifest or {}).get("do_lower_case")
  if data_lower is not None and model.do_lower_case is not None and bool(data_lower) != model.do_lower_case:

    def describe(lower: bool) -> str:
      return "uncased (do_lower_case=true)" if lower else "cased (do_lower_case=false)"

    raise UserError(
      f"{flag}: casing mismatch: the data's manifest says {describe(bool(data_lower))} but the model "
      f"(vocabulary {model.vocab_file}) is {describe(model.do_lower_case)}; regenerate the data with "
      f"create_pretraining_data --do_lower_case={str(model.do_lower_case).lower()}"
    )


def _uses_dynamic_masking(data: PretrainingData, masking: str, flag: str) -> bool:
  """Whether the train step must mask `data` itself; UserError for unmasked data with --masking=static."""
  unmasked = input_pipeline.needs_dynamic_masking(data)
  if masking == "static" and unmasked:
    raise UserError(
      f"{flag}: the data carries no masked-LM predictions (written with masking=none); pass --masking=dynamic (or auto)"
    )
  return masking == "dynamic" or unmasked


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
  info = {
    "max_seq_length": options.max_seq_length,
    "max_predictions_per_seq": options.train.max_predictions_per_seq,
    "num_train_steps": options.train.num_train_steps,
    "init_checkpoint": options.init_checkpoint,
  }
  with atomic_write(workdir / TRAINING_INFO_FILE) as handle:
    json.dump(info, handle, indent=2)
  if flagfile_text is not None:
    with atomic_write(workdir / FLAGS_FILE) as handle:
      handle.write(flagfile_text)


def run(
  options: PretrainOptions, flagfile_text: str | None = None, print_fn: Callable[[str], None] = print
) -> train.TrainResult:
  """The whole command: checks, workdir, model, data, training, export. Returns the loop's result."""
  options.validate()
  _check_export_dir(options.export_hf_dir)
  workdir = fileio.as_path(options.output_dir)
  resuming = is_resuming(workdir)
  model = resolve_model(options, workdir, resuming)
  if options.max_seq_length > model.config.max_position_embeddings:
    raise UserError(
      f"--max_seq_length={options.max_seq_length} exceeds the model's max_position_embeddings="
      f"{model.config.max_position_embeddings}"
    )
  vocab = _check_vocab(model)
  train_data = _open_data(options.input_file, "--input_file", options, vocab)
  eval_data = (
    _open_data(options.eval_input_file, "--eval_input_file", options, vocab) if options.eval_input_file else None
  )
  _check_casing(train_data, "--input_file", model)
  if eval_data is not None:
    _check_casing(eval_data, "--eval_input_file", model)
  train_dynamic = _uses_dynamic_masking(train_data, options.masking, "--input_file")
  eval_dynamic = eval_data is not None and _uses_dynamic_masking(eval_data, "auto", "--eval_input_file")
  masking_vocab = MaskingVocab.from_vocab_file(model.vocab_file) if train_dynamic or eval_dynamic else None
  train_vocab = masking_vocab if train_dynamic else None
  eval_vocab = masking_vocab if eval_dynamic else None

  train.check_data_fit(options.train, train_data, eval_data)

  prepare_workdir(options.output_dir)
  if jax.process_index() == 0:
    _write_run_files(workdir, model, options, flagfile_text)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("pretrain: workdir ready")
  micro_batch = options.train.train_batch_size  # a whole step's batch, split into micro-batches on the device
  print_fn(
    f"process {jax.process_index()}/{jax.process_count()}: {'resuming' if resuming else 'starting'} pretraining "
    f"in {workdir}: {len(train_data)} training instances, {'dynamic' if train_dynamic else 'static'} masking, "
    f"{jax.device_count()} device(s); this process reads {micro_batch // jax.process_count()} of every "
    f"{micro_batch} sequences"
  )
  result = train.train_and_evaluate(
    options.train,
    model.config,
    workdir,
    train_data,
    eval_data,
    train_vocab,
    eval_vocab,
    init_params=model.params,
    print_fn=print_fn,
  )
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
  command = [
    sys.executable,
    "-m",
    "clinical_bert_jax.convert",
    "to_hf",
    f"--checkpoint_dir={workdir}",
    f"--step={step}",
    f"--output_dir={export_dir}",
    "--overwrite",
  ]
  finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if finished.returncode != 0:
    reason = next(
      (line[len("error: ") :] for line in finished.stderr.splitlines() if line.startswith("error: ")),
      f"exit status {finished.returncode}",
    )
    raise UserError(
      f"export to --export_hf_dir={export_dir} failed ({reason}); training finished: export later with "
      f"python -m clinical_bert_jax.convert to_hf --checkpoint_dir={workdir} --output_dir=DIR"
    )


# ------------------------------------------------------------------------------------------------------- flags
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command's flags (called from `__main__` only, so importing this module defines nothing): one per
  setting of `PretrainOptions` and `train.TrainConfig`, and the per-process and cache flags that are not settings of
  the run."""
  settings.define_flags(PretrainOptions, __name__)
  settings.define_flags(train.TrainConfig, __name__)
  flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "Persistent XLA compilation cache (local or gs://): a rerun or resume skips compiling the train step again.",
  )
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-process: HOST:PORT of process 0 (jax.distributed), or "
    "auto (Cloud TPU pods, SLURM: JAX finds the processes).",
  )
  flags.DEFINE_integer("num_processes", 1, "Multi-process: number of processes.")
  flags.DEFINE_integer("process_id", 0, "Multi-process: this process's index.")


def options_from_flags() -> PretrainOptions:
  return settings.from_flags(PretrainOptions, train=settings.from_flags(train.TrainConfig))


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
  jax.distributed.initialize(
    coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes, process_id=FLAGS.process_id
  )


def main(argv: Sequence[str]) -> None:
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it
  initialize_distributed()
  use_compilation_cache(FLAGS.compilation_cache_dir)
  result = run(options_from_flags(), resolved_flagfile())
  if not result.completed:
    logging.info(
      "stopped at step %d before --num_train_steps=%d; rerun to continue", result.step, FLAGS.num_train_steps
    )


if __name__ == "__main__":
  define_flags()
  run_absl(main)
