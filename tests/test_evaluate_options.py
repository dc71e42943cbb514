"""`evaluate`'s options: one declaration per flag (`EvaluateOptions`), one validation, a library entry point (`run`).

The flag table below is what `evaluate` defined before its settings moved into `EvaluateOptions`: names, defaults
and choices must not drift (docs/evaluation.md lists them). `split`'s flag default is None, which means `paper` for
ner and lets mednli refuse any `--split`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from absl import flags

from clinical_bert_jax import evaluate, settings
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.evaluate import EvaluateOptions

SNLI = Path(__file__).parent / "data" / "nli" / "snli-mednli-schema"

FLAG_DEFAULTS = {
  "model_dir": None,
  "model_name": None,
  "data_dir": None,
  "output_dir": None,
  "task": None,
  "learning_rate": None,
  "train_batch_size": None,
  "num_train_epochs": None,
  "seeds": ["42"],
  "warmup_proportion": 0.1,
  "max_seq_length": 150,
  "eval_batch_size": 32,
  "max_train_examples": None,
  "max_eval_examples": None,
  "split": None,
  "optimizer": "paper",
  "device": "auto",
  "overwrite": False,
}


def parsed(*argv: str) -> EvaluateOptions:
  flag_values = flags.FlagValues()
  settings.define_flags(EvaluateOptions, evaluate.__name__, flag_values)
  flag_values(["evaluate", *argv])
  return settings.from_flags(EvaluateOptions, flag_values)


def test_flags_keep_their_names_defaults_and_choices():
  flag_values = flags.FlagValues()
  settings.define_flags(EvaluateOptions, evaluate.__name__, flag_values)
  defined = {flag.name: flag for flag in flag_values.get_flags_for_module(evaluate.__name__)}
  assert sorted(defined) == sorted(FLAG_DEFAULTS)
  for name, default in FLAG_DEFAULTS.items():
    value = defined[name].default
    assert (value if name != "seeds" else [str(seed) for seed in value]) == default, name
  assert defined["task"].parser.enum_values == list(evaluate.NER_TASKS)
  assert defined["split"].parser.enum_values == ["paper", "given"]
  assert defined["optimizer"].parser.enum_values == ["paper", "google_adamw_pt", "bert_adam_pt"]
  assert defined["device"].parser.enum_values == ["auto", "cpu", "cuda"]


def test_flags_become_typed_options():
  options = parsed("--learning_rate=2e-5,5e-5", "--train_batch_size=16", "--seeds=1,2", "--split=given")
  assert options.learning_rate == (2e-5, 5e-5) and options.train_batch_size == (16,) and options.seeds == (1, 2)
  assert options.num_train_epochs is None and options.split == "given"
  assert parsed().seeds == (42,) and parsed("--learning_rate=").learning_rate is None  # empty: the paper's grid
  paper_grid = parsed().grid("mednli")  # the paper's 3 learning rates x 2 batch sizes x 2 epochs
  assert len(paper_grid) == 12 and sorted({point.learning_rate for point in paper_grid}) == [2e-5, 3e-5, 5e-5]
  assert {point.num_train_epochs for point in parsed().grid("ner")} == {2, 3, 4}
  with pytest.raises(UserError, match=r"^--train_batch_size: 'x' is not a valid number; pass a comma list"):
    parsed("--train_batch_size=16,x")


REQUIRED = dict(model_dir="m", data_dir="d", output_dir="o")


@pytest.mark.parametrize(
  "command, changes, message",
  [
    ("mednli", dict(model_dir=None, output_dir=None), "missing required flag(s) --model_dir, --output_dir"),
    ("report", dict(output_dir=None), "missing required flag(s) --output_dir"),
    ("ner", {}, "ner needs --task"),
    ("mednli", dict(task="bio"), "--task is for ner only"),
    ("mednli", dict(split="paper"), "--split is for ner only"),
    ("ner", dict(task="bio", split="random"), "--split='random' is not known"),
    ("ner", dict(task="i2b2_2099"), "--task='i2b2_2099' is not known; use one of i2b2_2006"),
    ("mednli", dict(optimizer="sgd"), "--optimizer='sgd' is not known; use one of paper, google_adamw_pt"),
    ("mednli", dict(warmup_proportion=1.0), "--warmup_proportion=1.0 must be in [0, 1)"),
    ("mednli", dict(learning_rate=(1e-5, -1e-5)), "--learning_rate: -1e-05 must be positive"),
    ("mednli", dict(seeds=()), "--seeds is empty"),
    ("mednli", dict(seeds=(1, 2, 1)), "--seeds=1,2,1 repeats a seed"),
    ("mednli", dict(eval_batch_size=0), "--eval_batch_size=0 must be positive"),
    ("mednli", dict(model_name="../up"), "--model_name='../up' must be a plain folder name"),
    ("mednli", dict(device="tpu"), "--device='tpu' is not known"),
    ("classify", {}, "unknown command 'classify'"),
  ],
)
def test_validate_names_the_flag_before_anything_is_read(command, changes, message, tmp_path):
  options = EvaluateOptions(**{**REQUIRED, "output_dir": str(tmp_path / "out"), **changes})
  with pytest.raises(UserError) as error:
    evaluate.run(command, options)  # model_dir "m" does not exist: validation comes first
  assert message in str(error.value) and "\n" not in str(error.value)
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_library_entry_point_runs_mednli_from_an_options_object(tiny_hf_dir, tmp_path):
  assert "model_name" not in flags.FLAGS  # evaluate's flags are not even defined: nothing below reads them
  options = EvaluateOptions(
    model_dir=str(tiny_hf_dir),
    model_name="tiny",
    data_dir=str(SNLI),
    output_dir=str(tmp_path),
    learning_rate=(1e-3,),
    train_batch_size=(8,),
    num_train_epochs=(1,),
    seeds=(3,),
    max_seq_length=64,
    max_train_examples=16,
    max_eval_examples=8,
    device="cpu",
  )
  run_dir = evaluate.run("mednli", options)
  assert run_dir == tmp_path / "tiny" / "mednli"
  results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
  assert results["settings"]["seeds"] == [3] and results["settings"]["optimizer"] == "bert_adam_pt"
  assert results["data_sizes"] == {"train": 16, "dev": 8, "test": 8}
  assert [run["seed"] for point in results["grid"] for run in point["runs"]] == [3]
  assert evaluate.run("report", EvaluateOptions(output_dir=str(tmp_path))) == tmp_path / "results.md"
  assert "| tiny |" in (tmp_path / "results.md").read_text(encoding="utf-8")
