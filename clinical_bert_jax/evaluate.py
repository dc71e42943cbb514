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

import datetime
import json
import re
import time
from pathlib import Path
from typing import Callable, Sequence

from absl import flags, logging

from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax import fileio
from clinical_bert_jax.fileio import atomic_output_dir, check_output_dir

COMMANDS = ("mednli", "ner", "report")
PAPER_LEARNING_RATES = ["2e-5", "3e-5", "5e-5"]
PAPER_BATCH_SIZES = ["16", "32"]
PAPER_EPOCHS = {"mednli": ["3", "4"], "ner": ["2", "3", "4"]}
NER_TASKS = ("i2b2_2006", "i2b2_2010", "i2b2_2012", "i2b2_2014", "bio")
LIST_EXAMPLES = {"learning_rate": "2e-5,3e-5", "train_batch_size": "16,32", "num_train_epochs": "3,4", "seeds": "1,2,3"}

FLAGS = flags.FLAGS


def _parse_list(flag: str, values: Sequence[str], convert: Callable[[str], float | int]) -> list:
  parsed = []
  for value in values:
    try:
      number = convert(value)
    except ValueError:
      raise UserError(
        f"--{flag}: {value!r} is not a valid number; pass a comma list such as --{flag}={LIST_EXAMPLES[flag]}"
      ) from None
    if number <= 0 and flag != "seeds":
      raise UserError(f"--{flag}: {value} must be positive")
    parsed.append(number)
  if not parsed:
    raise UserError(f"--{flag} is empty; give at least one value")
  return parsed


def _require(*names: str) -> None:
  missing = [f"--{name}" for name in names if not FLAGS[name].value]
  if missing:
    raise UserError(f"missing required flag(s) {', '.join(missing)}; see docs/evaluation.md")


def _positive_or_none(name: str) -> int | None:
  value = FLAGS[name].value
  if value is not None and value <= 0:
    raise UserError(f"--{name}={value} must be positive")
  return value


def _grid_from_flags(command: str) -> tuple[list, list[int]]:
  """The grid points and seeds the flags ask for (the paper's grid where a flag is not given)."""
  from clinical_bert_jax.eval_tasks import grid

  if not 0 <= FLAGS.warmup_proportion < 1:
    raise UserError(f"--warmup_proportion={FLAGS.warmup_proportion} must be in [0, 1)")
  points = grid.grid_points(
    _parse_list("learning_rate", FLAGS.learning_rate or PAPER_LEARNING_RATES, float),
    _parse_list("train_batch_size", FLAGS.train_batch_size or PAPER_BATCH_SIZES, int),
    _parse_list("num_train_epochs", FLAGS.num_train_epochs or PAPER_EPOCHS[command], int),
    FLAGS.warmup_proportion,
  )
  seeds = _parse_list("seeds", FLAGS.seeds, int)
  if len(set(seeds)) != len(seeds):
    raise UserError(f"--seeds={','.join(FLAGS.seeds)} repeats a seed")
  return points, seeds


def run_task(command: str) -> Path:
  """Runs the grid for `mednli` or `ner` and writes the run folder; returns it.

  Every input is checked before torch and transformers are even imported, so mistakes cost seconds.
  """
  from clinical_bert_jax.eval_tasks import grid, hf_checkpoint, mednli, ner, report

  _require("model_dir", "data_dir", "output_dir")
  if command == "ner" and not FLAGS.task:
    raise UserError(f"ner needs --task, one of {', '.join(NER_TASKS)}")
  if command == "mednli" and FLAGS.task:
    raise UserError("--task is for ner only; mednli has a single label set")
  if command == "mednli" and FLAGS["split"].present:
    raise UserError("--split is for ner only; mednli uses its train/dev/test files as given")
  points, seeds = _grid_from_flags(command)
  max_train, max_eval = _positive_or_none("max_train_examples"), _positive_or_none("max_eval_examples")
  eval_batch_size = _positive_or_none("eval_batch_size")
  if FLAGS.model_name is not None and not re.fullmatch(r"[\w+-][\w.+-]*", FLAGS.model_name):
    raise UserError(f"--model_name={FLAGS.model_name!r} must be a plain folder name (letters, digits, . _ + -)")

  checkpoint = hf_checkpoint.open_checkpoint(FLAGS.model_dir)
  max_seq_length = FLAGS.max_seq_length
  if not 3 <= max_seq_length <= checkpoint.config.max_position_embeddings:
    raise UserError(
      f"--max_seq_length={max_seq_length} must be between 3 and the model's max_position_embeddings "
      f"({checkpoint.config.max_position_embeddings})"
    )
  encoder = hf_checkpoint.WordPieceEncoder.for_checkpoint(checkpoint)
  model_name = FLAGS.model_name or checkpoint.name
  dataset = Path(FLAGS.data_dir).resolve().name
  if command == "mednli":
    task = mednli.MedNliTask(FLAGS.data_dir, encoder, max_seq_length, max_train, max_eval)
    run_key = "mednli"
  else:
    task = ner.NerTask(FLAGS.task, FLAGS.data_dir, encoder, max_seq_length, max_train, max_eval, FLAGS.split)
    run_key = FLAGS.task if FLAGS.task != "bio" else f"bio-{dataset}"
  output_root = Path(FLAGS.output_dir)
  run_dir = output_root / model_name / run_key
  check_output_dir(run_dir, FLAGS.overwrite)

  import torch
  import transformers

  from clinical_bert_jax.eval_tasks import training

  device = hf_checkpoint.resolve_device(FLAGS.device)
  optimizer_name = task.optimizer if FLAGS.optimizer == "paper" else FLAGS.optimizer
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
  with atomic_output_dir(run_dir, overwrite=FLAGS.overwrite) as staging:
    summary, selected_predictions = grid.run_grid(points, seeds, task.metric, run_one)
    with open(staging / "test_predictions.txt", "w", encoding="utf-8") as handle:
      task.write_test_predictions(handle, selected_predictions)
    results = {
      "format": report.RESULTS_FORMAT,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "task": FLAGS.task if command == "ner" else "mednli",
      "dataset": dataset,
      "model_name": model_name,
      "model_dir": FLAGS.model_dir if fileio.is_remote(FLAGS.model_dir) else str(Path(FLAGS.model_dir).resolve()),
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


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise UserError(
      f"usage: python -m clinical_bert_jax.evaluate {{{'|'.join(COMMANDS)}}} --flags... "
      f"(got {' '.join(argv[1:]) or 'no command'})"
    )
  command = argv[1]
  if FLAGS.data_dir and fileio.is_remote(FLAGS.data_dir):  # gs:// inputs are read from local copies
    FLAGS.data_dir = str(fileio.local_copy(FLAGS.data_dir, "--data_dir"))
  if FLAGS.output_dir and fileio.is_remote(FLAGS.output_dir):  # a gs:// comparison folder is mirrored locally
    remote = FLAGS.output_dir
    with fileio.mirrored_dir(remote, "--output_dir") as local:
      FLAGS.output_dir = str(local)
      _run(command)
    return
  _run(command)


def _run(command: str) -> None:
  if command == "report":
    from clinical_bert_jax.eval_tasks import report

    _require("output_dir")
    print(f"table: {report.write_report(FLAGS.output_dir)}")
    return
  run_task(command)


def define_flags() -> None:
  """Flags are defined only when run as a program, so that importing this module never clashes with other tools."""
  flags.DEFINE_string(
    "model_dir",
    None,
    "Hugging Face BERT directory (config.json, model.safetensors or "
    "pytorch_model.bin, vocab.txt or a BERT tokenizer.json, optional tokenizer_config.json).",
  )
  flags.DEFINE_string("model_name", None, "Row name of this model in results.md (default: the model directory's name).")
  flags.DEFINE_string(
    "data_dir", None, "mednli: folder with one train/dev/test *.jsonl each; ner: folder with train/dev/test BIO files."
  )
  flags.DEFINE_string(
    "output_dir",
    None,
    "Comparison folder: this run is written to OUTPUT_DIR/<model_name>/<task>/ "
    "and OUTPUT_DIR/results.md is regenerated.",
  )
  flags.DEFINE_enum("task", None, NER_TASKS, "ner only: label set (i2b2 task) or `bio` for any other BIO corpus.")
  flags.DEFINE_list("learning_rate", None, "Comma list (default: the paper's 2e-5,3e-5,5e-5).")
  flags.DEFINE_list("train_batch_size", None, "Comma list (default: 16,32).")
  flags.DEFINE_list("num_train_epochs", None, "Comma list (default: mednli 3,4; ner 2,3,4).")
  flags.DEFINE_list("seeds", ["42"], "Comma list of seeds; every grid point is trained once per seed.")
  flags.DEFINE_float("warmup_proportion", 0.1, "Fraction of the updates spent in linear warmup.")
  flags.DEFINE_integer("max_seq_length", 150, "Word pieces per example including [CLS]/[SEP] (the paper's 150).")
  flags.DEFINE_integer("eval_batch_size", 32, "Batch size for dev/test prediction (does not change the results).")
  flags.DEFINE_integer("max_train_examples", None, "Use only the first N training examples (quick runs).")
  flags.DEFINE_integer("max_eval_examples", None, "Use only the first N dev and the first N test examples.")
  flags.DEFINE_enum(
    "split",
    "paper",
    ["paper", "given"],
    "ner only: `paper` = run_ner.py's re-split (train+dev "
    "pooled, seed-42 shuffle, 9 chunks: train on 0-7, select on 8; official test); `given` = the "
    "files' train/dev as they are.",
  )
  flags.DEFINE_enum(
    "optimizer",
    "paper",
    ["paper", "google_adamw_pt", "bert_adam_pt"],
    "Fine-tuning optimizer; "
    "paper = what the original script of the task used (ner: google_adamw_pt, mednli: bert_adam_pt).",
  )
  flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "Where to fine-tune; auto = cuda when available.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing OUTPUT_DIR/<model_name>/<task>/.")


if __name__ == "__main__":
  define_flags()
  run_absl(main, positional_args=True)
