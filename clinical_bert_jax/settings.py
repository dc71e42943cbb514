"""One declaration per setting: a dataclass field carries its flag (type, default, help, choices, Google's name).

`setting(...)` declares a field of a settings dataclass (`train.TrainConfig`, `pretrain.PretrainOptions`);
`define_flags(cls, module_name)` defines one absl flag per declared field, and `from_flags(cls)` builds the dataclass
from the parsed flags. Fields declared without `setting` (e.g. a nested dataclass) are not flags. The flag's type
comes from the field's annotation (`bool`, `int`, `float`, `str`, optionally `| None`); a field whose value is not a
flag type (e.g. `--profile_steps=START,END` → a tuple) is declared with `flag_type=str` and a `parse` function that
turns the flag's string into the field's value.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Callable, Sequence

from absl import flags

from clinical_bert_jax.errors import UserError

_FLAG_TYPES = {
  bool: flags.DEFINE_bool,
  int: flags.DEFINE_integer,
  float: flags.DEFINE_float,
  str: flags.DEFINE_string,
  list: flags.DEFINE_list,
}  # list: a comma list (field: a tuple, parse=tuple)


def setting(
  default: Any = dataclasses.MISSING,
  *,
  help: str,
  choices: Sequence[str] | None = None,  # noqa: A002
  google: bool = False,
  flag_type: type | None = None,
  parse: Callable[[Any], Any] | None = None,
) -> Any:
  """A dataclass field that is also a command-line flag of the same name.

  Args:
    default: the field's and the flag's default; absent: a required field and a required flag.
    help: the flag's help text.
    choices: the allowed values (an enum flag).
    google: the name is Google's `run_pretraining.py` flag name.
    flag_type: the flag's type when it differs from the field's (with `parse`).
    parse: turns the parsed flag value into the field's value (e.g. "10,20" → (10, 20)).
  """
  metadata = {
    "help": help,
    "choices": None if choices is None else list(choices),
    "google": google,
    "flag_type": flag_type,
    "parse": parse,
  }
  return dataclasses.field(default=default, metadata=metadata)


def flag_fields(cls: type) -> list[dataclasses.Field]:
  """The fields of `cls` declared with `setting`, in declaration order."""
  return [field for field in dataclasses.fields(cls) if "help" in field.metadata]


def _flag_type(cls: type, field: dataclasses.Field) -> type:
  if field.metadata["flag_type"] is not None:
    return field.metadata["flag_type"]
  hint = typing.get_type_hints(cls)[field.name]
  if isinstance(hint, types.UnionType):  # `str | None`
    hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
  if hint not in _FLAG_TYPES:
    raise TypeError(f"{cls.__name__}.{field.name}: {hint} is not a flag type; declare flag_type and parse")
  return hint


def define_flags(cls: type, module_name: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one flag per `setting` field of `cls`, owned by `module_name` (what `get_flags_for_module` lists and
  `--help` shows as that module's flags, as if the module had called `flags.DEFINE_*` itself)."""
  # absl files the flags of a module run as a script (`python -m`) under sys.argv[0], not "__main__".
  registered_name = sys.argv[0] if module_name == "__main__" else module_name
  required = []
  for field in flag_fields(cls):
    default = None if field.default is dataclasses.MISSING else field.default
    if field.default is dataclasses.MISSING:
      required.append(field.name)
    if field.metadata["choices"] is not None:
      flags.DEFINE_enum(
        field.name,
        default,
        field.metadata["choices"],
        field.metadata["help"],
        flag_values=flag_values,
        module_name=registered_name,
      )
    else:
      flag_type = _flag_type(cls, field)
      if flag_type is list and default is not None:
        default = list(default)
      _FLAG_TYPES[flag_type](
        field.name, default, field.metadata["help"], flag_values=flag_values, module_name=registered_name
      )
    if registered_name != module_name:
      flag_values.register_flag_by_module_id(id(sys.modules[module_name]), flag_values[field.name])
  if required:
    flags.mark_flags_as_required(required, flag_values=flag_values)


def check_choices(options: Any) -> None:
  """UserError naming the flag when a `setting` field declared with `choices` holds another value (None is "not
  given"). The flags enforce this themselves; it matters for options built in Python."""
  for field in flag_fields(type(options)):
    choices, value = field.metadata["choices"], getattr(options, field.name)
    if choices is not None and value is not None and value not in choices:
      raise UserError(f"--{field.name}={value!r} is not known; use one of {', '.join(choices)}")


def from_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS, **others: Any) -> Any:
  """`cls` from the parsed flags of its `setting` fields (through their `parse`); `others` fill the other fields."""
  values = {}
  for field in flag_fields(cls):
    value = flag_values[field.name].value
    parse = field.metadata["parse"]
    values[field.name] = parse(value) if parse is not None else value
  return cls(**values, **others)
