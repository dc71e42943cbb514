"""Each training setting is declared once (settings.setting): the flags and the dataclasses come from that one field."""

from __future__ import annotations

import dataclasses

import pytest
from absl import flags

from clinical_bert_jax import pretrain, settings, train
from clinical_bert_jax.errors import UserError


def _flag_values(*argv: str) -> flags.FlagValues:
  values = flags.FlagValues()
  settings.define_flags(pretrain.PretrainOptions, "test_settings", values)
  settings.define_flags(train.TrainConfig, "test_settings", values)
  values(["pretrain", *argv])
  return values


def test_every_declared_field_is_a_flag_with_its_default_and_help():
  values = _flag_values("--input_file=x", "--output_dir=y")
  for cls in (pretrain.PretrainOptions, train.TrainConfig):
    for field in settings.flag_fields(cls):
      flag = values[field.name]
      assert flag.help.endswith(field.metadata["help"])  # enum flags put "<a|b|c>: " first
      if field.default is not dataclasses.MISSING:
        assert flag.default == field.default
  assert {field.name for field in dataclasses.fields(train.TrainConfig)} - {
    field.name for field in settings.flag_fields(train.TrainConfig)
  } == {"prefetch_batches"}
  assert values["optimizer"].parser.enum_values == list(train.optimizers.OPTIMIZER_CHOICES)
  assert values["compute_dtype"].parser.enum_values == list(train.COMPUTE_DTYPES)


def test_flags_build_the_same_dataclasses_as_their_defaults():
  values = _flag_values("--input_file=x", "--output_dir=y")
  options = settings.from_flags(pretrain.PretrainOptions, values, train=settings.from_flags(train.TrainConfig, values))
  assert options == pretrain.PretrainOptions(input_file="x", output_dir="y")
  assert options.train == train.TrainConfig()


def test_flag_values_are_parsed_into_the_fields():
  values = _flag_values(
    "--input_file=x",
    "--output_dir=y",
    "--profile_steps=3,5",
    "--lr_schedule=bert",
    "--train_batch_size=64",
    "--noasync_checkpointing",
    "--learning_rate=1e-4",
  )
  cfg = settings.from_flags(train.TrainConfig, values)
  assert (cfg.profile_steps, cfg.lr_schedule, cfg.train_batch_size, cfg.async_checkpointing, cfg.learning_rate) == (
    (3, 5),
    "bert",
    64,
    False,
    1e-4,
  )
  with pytest.raises(UserError, match="--profile_steps=5,3 needs 1 <= START <= END"):
    settings.from_flags(train.TrainConfig, _flag_values("--input_file=x", "--output_dir=y", "--profile_steps=5,3"))


def test_required_settings_are_required_flags():
  with pytest.raises(flags.IllegalFlagValueError, match="output_dir"):
    _flag_values("--input_file=x")
