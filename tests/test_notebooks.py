"""The notebooks in notebooks/ work as shipped.

quickstart.ipynb runs end to end on its tiny model. colab_tpu_pretraining.ipynb runs as its CPU dry run; the commands it
prints must name our real modules, their real flags, an existing flagfile and setup.cfg extras, and must hand each
step's output to the next step. Notebooks run in a fresh interpreter whose working directory, HOME and temporary
directory are under tmp_path, so nothing is written into the repository.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_util import REPO

pytestmark = pytest.mark.slow  # runs the notebooks

NOTEBOOKS = REPO / "notebooks"
NOTEBOOK_NAMES = ("quickstart.ipynb", "colab_tpu_pretraining.ipynb")
PROBE_MARKER = "@@notebook-probe@@"
# Executes every code cell of argv[1] in order in one namespace, then prints eval(argv[2]) there as JSON.
RUNNER = f"""
import json, sys
notebook, probe = sys.argv[1], sys.argv[2]
with open(notebook, encoding="utf-8") as handle:
  cells = json.load(handle)["cells"]
namespace = {{"__name__": "__main__"}}
for index, cell in enumerate(cells):
  if cell["cell_type"] == "code":
    exec(compile("".join(cell["source"]), f"{{notebook}} cell {{index}}", "exec"), namespace)
print({PROBE_MARKER!r} + json.dumps(eval(probe, namespace)))
"""
OUR_PACKAGES = ("clinical_bert_jax", "data_prep")


def execute_notebook(name: str, probe: str, tmp_path: Path) -> tuple[object, str, dict[str, Path]]:
  """Runs notebooks/NAME; returns the probe's value, everything the cells printed, and the sandbox directories."""
  sandbox = {part: tmp_path / part for part in ("cwd", "home", "tmp")}
  for directory in sandbox.values():
    directory.mkdir()
  env = {**os.environ, "HOME": str(sandbox["home"]), "TMPDIR": str(sandbox["tmp"])}
  result = subprocess.run(
    [sys.executable, "-c", RUNNER, str(NOTEBOOKS / name), probe],
    cwd=sandbox["cwd"],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  printed, marker, probed = result.stdout.rpartition(PROBE_MARKER)
  assert marker, result.stdout[-2000:]
  return json.loads(probed), printed, sandbox


# --------------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_is_valid_nbformat4_without_outputs(name):
  notebook = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
  assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 5
  assert notebook["metadata"]["kernelspec"]["language"] == "python"
  ids = [cell["id"] for cell in notebook["cells"]]
  assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cell_id) for cell_id in ids)
  for cell in notebook["cells"]:
    assert cell["cell_type"] in ("code", "markdown") and isinstance(cell["metadata"], dict)
    assert cell["source"] and all(isinstance(line, str) for line in cell["source"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: cell {cell['id']} has outputs"
      compile("".join(cell["source"]), f"{name}:{cell['id']}", "exec")


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_links_point_to_existing_files(name):
  notebook = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
  markdown = "".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "markdown")
  links = [link for link in re.findall(r"\]\(([^)\s]+)\)", markdown) if "://" not in link]
  assert links
  missing = [link for link in links if not (NOTEBOOKS / link.split("#")[0]).exists()]
  assert not missing, f"{name} links to missing files: {missing}"


# -------------------------------------------------------------------------------------------------- quickstart
QUICKSTART_PROBE = """{
    "config": [bert.config.num_hidden_layers, bert.config.hidden_size, bert.config.vocab_size],
    "do_lower_case": bert.loaded.do_lower_case,
    "vocab": vocab,
    "num_sentences": len(sentences),
    "input_ids": outputs["input_ids"].tolist(),
    "attention_mask": outputs["attention_mask"].tolist(),
    "hidden_states": [list(array.shape) for array in outputs["hidden_states"]],
    "last_hidden_is_sequence_output": bool((outputs["hidden_states"][-1] == outputs["sequence_output"]).all()),
    "shapes": {name: list(outputs[name].shape) for name in
               ("sequence_output", "pooled_output", "mlm_logits", "nsp_logits")},
    "guesses": guesses,
    "pair_token_types": pair["token_type_ids"].tolist(),
    "is_next_probability": is_next_probability,
    "workdir_left": workdir.exists(),
}"""


def test_quickstart_runs_and_produces_model_outputs(tmp_path):
  probed, printed, sandbox = execute_notebook("quickstart.ipynb", QUICKSTART_PROBE, tmp_path)
  layers, hidden, vocab_size = probed["config"]
  assert (layers, hidden, vocab_size) == (2, 32, len(probed["vocab"]))
  assert probed["do_lower_case"] is False  # the notebook's cased vocabulary survived the conversion
  assert "cased" in printed and "flax_params.safetensors" in printed

  batch, length = len(probed["input_ids"]), len(probed["input_ids"][0])
  assert batch == probed["num_sentences"] == 2
  assert probed["hidden_states"] == [[batch, length, hidden]] * (layers + 1)
  assert probed["last_hidden_is_sequence_output"]
  assert probed["shapes"] == {
    "sequence_output": [batch, length, hidden],
    "pooled_output": [batch, hidden],
    "mlm_logits": [batch, length, vocab_size],
    "nsp_logits": [batch, 2],
  }
  cls_id, sep_id = probed["vocab"].index("[CLS]"), probed["vocab"].index("[SEP]")
  for ids, mask in zip(probed["input_ids"], probed["attention_mask"]):
    real = sum(mask)
    assert ids[0] == cls_id and ids[real - 1] == sep_id and mask == [1] * real + [0] * (length - real)
  assert 0 in probed["attention_mask"][0]  # the shorter first sentence is padded, as the notebook says

  (one_mask,) = probed["guesses"]  # one [MASK] in "The patient was [MASK] home"
  assert len(one_mask) == 5
  probabilities = [probability for _, probability in one_mask]
  assert all(token in probed["vocab"] for token, _ in one_mask)
  assert all(0 < p <= 1 for p in probabilities) and probabilities == sorted(probabilities, reverse=True)
  assert sum(probabilities) <= 1 + 1e-5

  (segments,) = probed["pair_token_types"]
  assert segments[0] == 0 and segments[-1] == 1 and segments == sorted(segments)
  assert 0 < probed["is_next_probability"] < 1

  assert not probed["workdir_left"]  # the last cell cleans up its temporary directory
  assert not any(sandbox["cwd"].iterdir())


# ---------------------------------------------------------------------------------------------- TPU (dry run)
def printed_commands(printed: str) -> list[list[str]]:
  """The `$ ...` lines, continuation lines joined, split like a shell; `cd DIR &&` and `VAR=value` prefixes dropped."""
  commands = []
  for line in printed.replace("\\\n", " ").splitlines():
    if not line.startswith("$ "):
      continue
    words = shlex.split(line[2:], comments=True)
    if "&&" in words:
      words = words[words.index("&&") + 1 :]
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
      words.pop(0)
    commands.append(words)
  return commands


def defined_flags(module: str, cwd: Path) -> dict[str, bool]:
  """Flag name -> is boolean, from `python -m MODULE --helpfull` (the module's own flags and absl's)."""
  result = subprocess.run(
    [sys.executable, "-m", module, "--helpfull"], capture_output=True, text=True, cwd=cwd, timeout=120
  )
  found = {match[1]: bool(match[0]) for match in re.findall(r"(?m)^  --(\[no\])?(\w+):", result.stdout)}
  assert "flagfile" in found, f"{module} --helpfull: {result.stderr[-2000:]}"
  return found


def flag_values(arguments: list[str]) -> dict[str, str]:
  return dict(argument[2:].partition("=")[::2] for argument in arguments if argument.startswith("--"))


def flagfile_arguments(path: Path) -> list[str]:
  """The flags of a flagfile in order, nested `--flagfile=` lines expanded in place (absl reads their paths relative
  to the working directory: the commands run from the repository root)."""
  arguments = []
  for line in (line.strip() for line in path.read_text(encoding="utf-8").splitlines()):
    if line.startswith("--flagfile="):
      arguments += flagfile_arguments(REPO / line.partition("=")[2])
    elif line and not line.startswith("#"):
      arguments.append(line)
  return arguments


def assert_flags_exist(module: str, arguments: list[str], flags: dict[str, bool]) -> None:
  for argument in arguments:
    assert argument.startswith("--"), f"{module}: unexpected argument {argument!r}"
    name = argument[2:].partition("=")[0]
    negated_boolean = name.startswith("no") and flags.get(name[2:]) is True
    assert name in flags or negated_boolean, f"{module} has no flag --{name}"


def test_tpu_notebook_dry_run_prints_commands_with_existing_modules_and_flags(tmp_path):
  probed, printed, sandbox = execute_notebook("colab_tpu_pretraining.ipynb", "RUN_ON_TPU", tmp_path)
  assert probed is False  # shipped as a dry run
  assert not any(sandbox["cwd"].iterdir()) and not any(sandbox["home"].iterdir())  # it ran nothing

  commands = printed_commands(printed)
  ours: dict[str, list[list[str]]] = {}
  for words in commands:
    if words[:2] == ["python", "-m"] and words[2].split(".")[0] in OUR_PACKAGES:
      ours.setdefault(words[2], []).append(words[3:])
  assert set(ours) == {
    "data_prep.format_mimic",
    "data_prep.create_pretraining_data",
    "clinical_bert_jax.pretrain",
    "clinical_bert_jax.convert",
  }

  from clinical_bert_jax.convert import COMMANDS

  for module, invocations in ours.items():
    flags = defined_flags(module, sandbox["cwd"])
    for arguments in invocations:
      if module == "clinical_bert_jax.convert":
        assert arguments[0] in COMMANDS
        arguments = arguments[1:]
      assert_flags_exist(module, arguments, flags)
      flagfile = flag_values(arguments).get("flagfile")
      if flagfile:
        assert not Path(flagfile).is_absolute() and (REPO / flagfile).is_file(), flagfile  # relative to the checkout
        assert_flags_exist(module, flagfile_arguments(REPO / flagfile), flags)

  (install,) = [words for words in commands if words[:4] == ["python", "-m", "pip", "install"]]
  extras = set(re.fullmatch(r"\.\[([\w,]+)\]", install[-1])[1].split(","))
  setup = configparser.ConfigParser()
  setup.read(REPO / "setup.cfg")
  assert "tpu" in extras and extras <= set(setup["options.extras_require"])


def test_tpu_notebook_steps_hand_their_outputs_to_the_next_step(tmp_path):
  from data_prep.format_mimic import category_stem

  _, printed, _ = execute_notebook("colab_tpu_pretraining.ipynb", "RUN_ON_TPU", tmp_path)
  steps: dict[str, list[dict[str, str]]] = {}  # "module" or "module subcommand" -> flags of each invocation
  for words in printed_commands(printed):
    if words[:2] == ["python", "-m"]:
      subcommand = [word for word in words[3:4] if not word.startswith("-")]
      steps.setdefault(" ".join(words[2:3] + subcommand), []).append(flag_values(words[3:]))
  (notes,) = steps["data_prep.format_mimic"]
  train, heldout = steps["data_prep.create_pretraining_data"]
  (init,) = steps["clinical_bert_jax.convert from_tf"]
  (pretrain,) = steps["clinical_bert_jax.pretrain"]
  (export,) = steps["clinical_bert_jax.convert to_hf"]

  # format_mimic writes DIR/<stem>-00000.txt, -00001.txt, ...: the first is held out, the train glob takes the rest.
  stem = category_stem(notes["categories"])
  written = [f"{stem}-{index:05d}.txt" for index in range(120)]
  for instances in (train, heldout):
    assert str(Path(instances["input"]).parent) == notes["output_dir"]
  assert [name for name in written if fnmatch.fnmatch(name, Path(heldout["input"]).name)] == written[:1]
  assert [name for name in written if fnmatch.fnmatch(name, Path(train["input"]).name)] == written[1:]

  # pretrain starts from the converted model and reads both shard sets, built with its vocabulary and the shapes it
  # trains with; convert to_hf reads its workdir.
  effective = {**flag_values(flagfile_arguments(REPO / pretrain["flagfile"])), **pretrain}
  assert effective["init_checkpoint"] == init["output_dir"]
  assert (effective["bert_config_file"], effective["vocab_file"]) == (
    str(Path(init["output_dir"]) / "config.json"),
    str(Path(init["output_dir"]) / "vocab.txt"),
  )
  assert (effective["input_file"], effective["eval_input_file"]) == (train["output_dir"], heldout["output_dir"])
  for instances in (train, heldout):
    assert instances["vocab_file"] == effective["vocab_file"]
    assert (instances["max_seq_length"], instances["max_predictions_per_seq"]) == (
      effective["max_seq_length"],
      effective["max_predictions_per_seq"],
    )
  assert export["checkpoint_dir"] == effective["output_dir"]
  assert export["output_dir"] != effective["export_hf_dir"]


def test_tpu_notebook_stops_with_one_message_when_jax_sees_no_tpu(tmp_path):
  """RUN_ON_TPU = True on a machine without a TPU: the platform check stops the notebook before anything long."""
  notebook = json.loads((NOTEBOOKS / "colab_tpu_pretraining.ipynb").read_text(encoding="utf-8"))
  for cell in notebook["cells"]:
    cell["source"] = [re.sub(r"^RUN_ON_TPU = False\b", "RUN_ON_TPU = True", line) for line in cell["source"]]
  armed = tmp_path / "armed.ipynb"
  armed.write_text(json.dumps(notebook), encoding="utf-8")
  sandbox = tmp_path / "cwd"
  sandbox.mkdir()
  env = {**os.environ, "HOME": str(sandbox), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, "-c", RUNNER, str(armed), "RUN_ON_TPU"],
    cwd=sandbox,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
    "RUN_ON_TPU = True but JAX sees no TPU (backend: cpu); choose Runtime -> Change runtime type -> TPU (or run on "
    "a Cloud TPU VM), or set RUN_ON_TPU = False for a dry run"
  ]
  assert "$ " not in result.stdout and not any(sandbox.iterdir())  # no command ran, nothing was written
