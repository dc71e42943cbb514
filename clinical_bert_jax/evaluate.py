"""Fine-tune and evaluate a BERT on MedNLI or a BIO NER task, and build the paper's Table 2 from the results.

    python -m clinical_bert_jax.evaluate mednli --model_dir=HF_DIR --data_dir=MEDNLI_DIR --output_dir=OUT
    python -m clinical_bert_jax.evaluate ner --task=i2b2_2010 --model_dir=HF_DIR --data_dir=BIO_DIR --output_dir=OUT
    python -m clinical_bert_jax.evaluate report --output_dir=OUT

Each evaluation runs the hyperparameter grid (comma lists; defaults are the paper's grid) for every seed, selects
the configuration on dev and reports its test score. It writes `OUT/<model_name>/<task>/` (results.json,
test_predictions.txt) and regenerates `OUT/results.md`, a Table-2 layout over every results.json under OUT, so
evaluating several models into one OUT gives one comparison table. See docs/evaluation.md.
"""

from __future__ import annotations

from clinical_bert_jax import host_memory

if __name__ == "__main__":  # first, before anything below allocates: this may re-execute the command
  host_memory.use_transparent_huge_pages()

import dataclasses
import datetime
import json
import re
import time
from pathlib import Path
from typing import Callable, Sequence

from absl import logging

from clinical_bert_jax import fileio, settings
from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.fileio import atomic_output_dir, check_output_dir
from clinical_bert_jax.settings import setting

COMMANDS = ("mednli", "ner", "report")
PAPER_LEARNING_RATES = (2e-5, 3e-5, 5e-5)
PAPER_BATCH_SIZES = (16, 32)
PAPER_EPOCHS = {"mednli": (3, 4), "ner": (2, 3, 4)}
NER_TASKS = ("i2b2_2006", "i2b2_2010", "i2b2_2012", "i2b2_2014", "bio")
SPLITS = ("paper", "given")
LIST_EXAMPLES = {"learning_rate": "2e-5,3e-5", "train_batch_size": "16,32", "num_train_epochs": "3,4", "seeds": "1,2,3"}


def _number_list(flag: str, convert: Callable[[str], float | int], empty_is_none: bool = True) -> Callable:
  """The `parse` of a comma-list flag: its strings as numbers (a one-line error names the flag); an empty list is
  None (the paper's grid) where `empty_is_none`."""

  def parse(values: Sequence[str] | None) -> tuple | None:
    if values is None or (empty_is_none and not values):
      return None
    parsed = []
    for value in values:
      try:
        parsed.append(convert(value))
      except ValueError:
        raise UserError(
          f"--{flag}: {value!r} is not a valid number; pass a comma list such as --{flag}={LIST_EXAMPLES[flag]}"
        ) from None
    return tuple(parsed)

  return parse


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
  """The settings of the three commands; each field is also the flag of the same name (settings.setting).

  The grid lists are numbers here (None: the paper's grid for the command); `split` None means not given (ner then
  uses `paper`; mednli refuses any `--split`).
  """

  model_dir: str | None = setting(
    None,
    help="Hugging Face BERT directory (config.json, model.safetensors or "
    "pytorch_model.bin, vocab.txt or a BERT tokenizer.json, optional tokenizer_config.json).",
  )
  model_name: str | None = setting(
    None, help="Row name of this model in results.md (default: the model directory's name)."
  )
  data_dir: str | None = setting(
    None, help="mednli: folder with one train/dev/test *.jsonl each; ner: folder with train/dev/test BIO files."
  )
  output_dir: str | None = setting(
    None,
    help="Comparison folder: this run is written to OUTPUT_DIR/<model_name>/<task>/ "
    "and OUTPUT_DIR/results.md is regenerated.",
  )
  task: str | None = setting(
    None, choices=NER_TASKS, help="ner only: label set (i2b2 task) or `bio` for any other BIO corpus."
  )
  learning_rate: tuple[float, ...] | None = setting(
    None,
    flag_type=list,
    parse=_number_list("learning_rate", float),
    help="Comma list (default: the paper's 2e-5,3e-5,5e-5).",
  )
  train_batch_size: tuple[int, ...] | None = setting(
    None, flag_type=list, parse=_number_list("train_batch_size", int), help="Comma list (default: 16,32)."
  )
  num_train_epochs: tuple[int, ...] | None = setting(
    None,
    flag_type=list,
    parse=_number_list("num_train_epochs", int),
    help="Comma list (default: mednli 3,4; ner 2,3,4).",
  )
  seeds: tuple[int, ...] = setting(
    (42,),
    flag_type=list,
    parse=_number_list("seeds", int, empty_is_none=False),
    help="Comma list of seeds; every grid point is trained once per seed.",
  )
  warmup_proportion: float = setting(0.1, help="Fraction of the updates spent in linear warmup.")
  max_seq_length: int = setting(150, help="Word pieces per example including [CLS]/[SEP] (the paper's 150).")
  eval_batch_size: int | None = setting(32, help="Batch size for dev/test prediction (does not change the results).")
  max_train_examples: int | None = setting(None, help="Use only the first N training examples (quick runs).")
  max_eval_examples: int | None = setting(None, help="Use only the first N dev and the first N test examples.")
  split: str | None = setting(
    None,
    choices=SPLITS,
    help="ner only: `paper` (the default) = run_ner.py's re-split (train+dev "
    "pooled, seed-42 shuffle, 9 chunks: train on 0-7, select on 8; official test); `given` = the "
    "files' train/dev as they are.",
  )
  optimizer: str = setting(
    "paper",
    choices=("paper", "google_adamw_pt", "bert_adam_pt"),
    help="Fine-tuning optimizer; "
    "paper = what the original script of the task used (ner: google_adamw_pt, mednli: bert_adam_pt).",
  )
  device: str = setting("auto", choices=("auto", "cpu", "cuda"), help="Where to fine-tune; auto = cuda when available.")
  overwrite: bool = setting(False, help="Replace an existing OUTPUT_DIR/<model_name>/<task>/.")

  def validate(self, command: str) -> None:
    """The one check of the settings of `command`, before any model or data is read and anything is written (the
    model-dependent `--max_seq_length` bound is checked once the checkpoint is open)."""
    if command not in COMMANDS:
      raise UserError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    if command == "report":
      self._require("output_dir")
      return
    self._require("model_dir", "data_dir", "output_dir")
    if command == "ner" and not self.task:
      raise UserError(f"ner needs --task, one of {', '.join(NER_TASKS)}")
    if command == "mednli" and self.task:
      raise UserError("--task is for ner only; mednli has a single label set")
    if command == "mednli" and self.split is not None:
      raise UserError("--split is for ner only; mednli uses its train/dev/test files as given")
    settings.check_choices(self)  # --task, --split, --optimizer, --device
    if not 0 <= self.warmup_proportion < 1:
      raise UserError(f"--warmup_proportion={self.warmup_proportion} must be in [0, 1)")
    for name in ("learning_rate", "train_batch_size", "num_train_epochs"):
      for value in getattr(self, name) or ():
        if value <= 0:
          raise UserError(f"--{name}: {value} must be positive")
    if not self.seeds:
      raise UserError("--seeds is empty; give at least one value")
    if len(set(self.seeds)) != len(self.seeds):
      raise UserError(f"--seeds={','.join(map(str, self.seeds))} repeats a seed")
    for name in ("eval_batch_size", "max_train_examples", "max_eval_examples"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise UserError(f"--{name}={value} must be positive")
    if self.model_name is not None and not re.fullmatch(r"[\w+-][\w.+-]*", self.model_name):
      raise UserError(f"--model_name={self.model_name!r} must be a plain folder name (letters, digits, . _ + -)")

  def _require(self, *names: str) -> None:
    missing = [f"--{name}" for name in names if not getattr(self, name)]
    if missing:
      raise UserError(f"missing required flag(s) {', '.join(missing)}; see docs/evaluation.md")

  def grid(self, command: str) -> list:
    """The grid points the options ask for (the paper's grid where a list is not given)."""
    from clinical_bert_jax.eval_tasks import grid

    return grid.grid_points(
      list(self.learning_rate or PAPER_LEARNING_RATES),
      list(self.train_batch_size or PAPER_BATCH_SIZES),
      list(self.num_train_epochs or PAPER_EPOCHS[command]),
      self.warmup_proportion,
    )


def run_task(command: str, options: EvaluateOptions) -> Path:
  """Runs the grid for `mednli` or `ner` with validated, local `options` (see `run`) and writes the run folder;
  returns it.

  Every input is checked before torch and transformers are even imported, so mistakes cost seconds.
  """
  from clinical_bert_jax.eval_tasks import grid, hf_checkpoint, mednli, ner, report

  points, seeds = options.grid(command), list(options.seeds)
  max_train, max_eval = options.max_train_examples, options.max_eval_examples
  eval_batch_size = options.eval_batch_size

  checkpoint = hf_checkpoint.open_checkpoint(options.model_dir)
  max_seq_length = options.max_seq_length
  if not 3 <= max_seq_length <= checkpoint.config.max_position_embeddings:
    raise UserError(
      f"--max_seq_length={max_seq_length} must be between 3 and the model's max_position_embeddings "
      f"({checkpoint.config.max_position_embeddings})"
    )
  encoder = hf_checkpoint.WordPieceEncoder.for_checkpoint(checkpoint)
  model_name = options.model_name or checkpoint.name
  dataset = Path(options.data_dir).resolve().name
  if command == "mednli":
    task = mednli.MedNliTask(options.data_dir, encoder, max_seq_length, max_train, max_eval)
    run_key = "mednli"
  else:
    task = ner.NerTask(
      options.task, options.data_dir, encoder, max_seq_length, max_train, max_eval, options.split or "paper"
    )
    run_key = options.task if options.task != "bio" else f"bio-{dataset}"
  output_root = Path(options.output_dir)
  run_dir = output_root / model_name / run_key
  check_output_dir(run_dir, options.overwrite)

  import torch
  import transformers

  from clinical_bert_jax.eval_tasks import training

  device = hf_checkpoint.resolve_device(options.device)
  optimizer_name = task.optimizer if options.optimizer == "paper" else options.optimizer
  logging.info(
    "%s on %s: train %d, dev %d, test %d examples; %d grid points × %d seeds on %s",
    run_key,
    dataset,
    len(task.train),
    len(task.dev),
    len(task.test),
    len(points),
    len(seeds),
    device,
  )

  def run_one(point: grid.Hyperparameters, seed: int) -> grid.RunOutcome:
    training.seed_everything(seed)
    model = hf_checkpoint.load_pretrained(checkpoint, task.model_class, num_labels=task.num_labels)
    description = f"lr={point.learning_rate:g} bs={point.train_batch_size} ep={point.num_train_epochs} seed={seed}"
    train_summary = training.fine_tune(
      model, task.train, point, seed, device, encoder.pad_id, description, optimizer_name
    )
    scores = {}
    for split, examples in (("dev", task.dev), ("test", task.test)):
      predictions = training.predict(model, examples, eval_batch_size, device, encoder.pad_id)
      scores[split] = task.score(split, predictions)
    del model
    if device.type == "cuda":
      torch.cuda.empty_cache()
    return grid.RunOutcome(scores["dev"][0], scores["test"][0], train_summary, scores["test"][1])

  started = time.monotonic()
  with atomic_output_dir(run_dir, overwrite=options.overwrite) as staging:
    summary, selected_predictions = grid.run_grid(points, seeds, task.metric, run_one)
    with open(staging / "test_predictions.txt", "w", encoding="utf-8") as handle:
      task.write_test_predictions(handle, selected_predictions)
    results = {
      "format": report.RESULTS_FORMAT,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "task": options.task if command == "ner" else "mednli",
      "dataset": dataset,
      "model_name": model_name,
      "model_dir": options.model_dir if fileio.is_remote(options.model_dir) else str(Path(options.model_dir).resolve()),
      "do_lower_case": checkpoint.do_lower_case,
      "data_sizes": {"train": len(task.train), "dev": len(task.dev), "test": len(task.test)},
      "settings": {
        "max_seq_length": max_seq_length,
        "eval_batch_size": eval_batch_size,
        "device": str(device),
        "optimizer": optimizer_name,
        "max_train_examples": max_train,
        "max_eval_examples": max_eval,
        "seeds": seeds,
      },
      **task.details(),
      **summary,
      "elapsed_seconds": round(time.monotonic() - started, 1),
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    with open(staging / report.RESULTS_FILE, "w", encoding="utf-8") as handle:
      json.dump(results, handle, indent=2)
      handle.write("\n")
  selected = summary["selected"]
  logging.info(
    "selected lr=%g batch=%d epochs=%d: dev %s %.4f, test %.4f ± %.4f",
    selected["learning_rate"],
    selected["train_batch_size"],
    selected["num_train_epochs"],
    task.metric,
    selected["dev_mean"],
    selected["test_mean"],
    selected["test_std"],
  )
  print(
    f"{run_key}: test {task.metric} {selected['test_mean']:.4f} ± {selected['test_std']:.4f} "
    f"(selected on dev: lr {selected['learning_rate']:g}, batch {selected['train_batch_size']}, "
    f"epochs {selected['num_train_epochs']}); written to {run_dir}"
  )
  print(f"table: {report.write_report(output_root)}")
  return run_dir


def run(command: str, options: EvaluateOptions) -> Path:
  """The whole command (`mednli`, `ner` or `report`) with `options`: validated once, before anything is read or
  written; a gs:// `data_dir` is read from a local copy and a gs:// `output_dir` is mirrored locally. Returns the run
  folder (`report`: results.md)."""
  options.validate(command)
  if options.data_dir and fileio.is_remote(options.data_dir):  # gs:// inputs are read from local copies
    options = dataclasses.replace(options, data_dir=str(fileio.local_copy(options.data_dir, "--data_dir")))
  if options.output_dir and fileio.is_remote(options.output_dir):  # a gs:// comparison folder is mirrored locally
    with fileio.mirrored_dir(options.output_dir, "--output_dir") as local:
      return _run_local(command, dataclasses.replace(options, output_dir=str(local)))
  return _run_local(command, options)


def _run_local(command: str, options: EvaluateOptions) -> Path:
  if command == "report":
    from clinical_bert_jax.eval_tasks import report

    table = report.write_report(options.output_dir)
    print(f"table: {table}")
    return Path(table)
  return run_task(command, options)


# ------------------------------------------------------------------------------------------- command line
def from_flags() -> EvaluateOptions:
  """The options of the parsed flags: the only place in this module that reads them."""
  return settings.from_flags(EvaluateOptions)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise UserError(
      f"usage: python -m clinical_bert_jax.evaluate {{{'|'.join(COMMANDS)}}} --flags... "
      f"(got {' '.join(argv[1:]) or 'no command'})"
    )
  run(argv[1], from_flags())


def define_flags() -> None:
  """Flags are defined only when run as a program, so that importing this module never clashes with other tools."""
  settings.define_flags(EvaluateOptions, __name__)


if __name__ == "__main__":
  define_flags()
  run_absl(main, positional_args=True)
