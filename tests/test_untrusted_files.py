"""Untrusted files (docs/reliability.md): the code never unpickles what a user hands it, and a manifest cannot point
a reader outside its own directory.

The scanner parses every Python file of the project with `ast` (so comments, strings and docs do not count, and
`from pickle import load as x` is still caught) and flags the calls that run code from a file: `pickle`/`joblib`/
`dill`/`cloudpickle` loads, `torch.load` without `weights_only=True`, `np.load(..., allow_pickle=True)`, `yaml.load`
without a safe loader, and any `trust_remote_code=True`. Each pattern is fed to the scanner in a snippet first, so a
scanner that stopped seeing one fails here.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from cli_util import REPO, assert_one_line_error, run_module
from clinical_bert_jax import records
from clinical_bert_jax.errors import UserError

SCANNED = ("clinical_bert_jax", "data_prep", "bench", "scripts")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "joblib", "dill", "cloudpickle", "shelve"}
PICKLE_CALLS = {"load", "loads", "Unpickler", "open"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
  """`a.b.c` of a Name/Attribute chain with the first name resolved through the file's imports ('' otherwise)."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return ""
  parts.append(aliases.get(node.id, node.id))
  return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
  return next((keyword.value for keyword in call.keywords if keyword.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
  return isinstance(node, ast.Constant) and node.value is True


def scan_source(source: str, filename: str = "<snippet>") -> list[str]:
  """'file:line: what' for each unsafe deserialisation in `source`."""
  tree = ast.parse(source, filename)
  aliases: dict[str, str] = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
  found = []
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.keyword)
      and node.arg == "trust_remote_code"
      and not (isinstance(node.value, ast.Constant) and node.value.value is False)
    ):
      found.append(f"{filename}:{node.value.lineno}: trust_remote_code not False")
    if not isinstance(node, ast.Call):
      continue
    name = _dotted(node.func, aliases)
    module, _, function = name.rpartition(".")
    where = f"{filename}:{node.lineno}: {name}"
    if module.split(".")[0] in PICKLE_MODULES and function in PICKLE_CALLS:
      found.append(f"{where} unpickles")
    elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
      found.append(f"{where} without weights_only=True")
    elif name in ("numpy.load", "numpy.lib.npyio.load") and not (
      isinstance(_keyword(node, "allow_pickle"), ast.Constant)
      and _keyword(node, "allow_pickle").value is False
      or _keyword(node, "allow_pickle") is None
    ):
      found.append(f"{where} with allow_pickle")
    elif name in ("yaml.load", "yaml.load_all"):
      loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
      if loader is None or _dotted(loader, aliases).rpartition(".")[2] not in SAFE_YAML_LOADERS:
        found.append(f"{where} without a safe Loader")
    elif name in ("yaml.unsafe_load", "yaml.full_load", "pandas.read_pickle"):
      found.append(f"{where} unpickles or runs code")
  return found


@pytest.mark.parametrize(
  "snippet",
  [
    "import pickle\npickle.load(open('x', 'rb'))",
    "import pickle\npickle.loads(data)",
    "from pickle import load as read\nread(handle)",
    "import cPickle as cp\ncp.Unpickler(handle).load()",
    "import torch\ntorch.load('model.bin')",
    "import torch\ntorch.load('model.bin', weights_only=False)",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "import numpy as np\nflag = True\nnp.load('a.npy', allow_pickle=flag)",
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)",
    "import joblib\njoblib.load('model.joblib')",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import pandas as pd\npd.read_pickle('frame.pkl')",
  ],
)
def test_the_scanner_flags_each_unsafe_pattern(snippet):
  assert len(scan_source(snippet)) == 1, snippet


@pytest.mark.parametrize(
  "snippet",
  [
    "import torch\ntorch.load('model.bin', weights_only=True)",
    "import numpy as np\nnp.load('a.npy')\nnp.load('b.npy', allow_pickle=False)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)\nyaml.safe_load(text)",
    "import json\njson.load(handle)",
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=False)",
    "# pickle.load(handle) in a comment\ntext = 'torch.load(x)'",
  ],
)
def test_the_scanner_passes_safe_calls(snippet):
  assert scan_source(snippet) == [], snippet


def test_no_project_code_deserialises_untrusted_files():
  files = [path for folder in SCANNED for path in sorted((REPO / folder).rglob("*.py"))]
  assert len(files) > 50, "the scanner found too few files: is the layout different?"
  found = [hit for path in files for hit in scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
  assert found == []


# ------------------------------------------------------------------------------------------------------ manifests
BAD_NAMES = ["../x.cbj", "/etc/passwd", "gs://other/x.cbj", "sub/../../x.cbj", "C:/x.cbj", "..\\x.cbj", "", None]


def _write_data_with_manifest(directory: Path, bad_name, index: int = 1) -> None:
  """Two real native shards and their manifest, with entry `index` renamed to `bad_name`."""
  from test_pretrain import write_dataset, write_vocab

  write_dataset(directory, write_vocab(directory.parent / "vocab.txt"), 8, seed=1)
  manifest = json.loads((directory / records.MANIFEST_NAME).read_text())
  manifest["shards"][index]["name"] = bad_name
  (directory / records.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad_name", BAD_NAMES)
def test_manifest_entries_outside_their_directory_are_refused_on_read(tmp_path, bad_name):
  _write_data_with_manifest(tmp_path / "data", bad_name)
  with pytest.raises(UserError) as caught:
    records.read_manifest(tmp_path / "data")
  message = str(caught.value)
  assert "shards[1]" in message and records.MANIFEST_NAME in message and "\n" not in message
  if bad_name:
    assert bad_name not in message  # the entry is named by its index, its text is never echoed
  with pytest.raises(UserError, match=r"shards\[1\]"):
    records.PretrainingData.open(str(tmp_path / "data"))


@pytest.mark.parametrize("good_name", ["shard-00001.cbj", "sub/shard.cbj", "a..b.cbj"])
def test_confined_names_are_accepted(good_name):
  assert records.check_shard_names({"shards": [{"name": good_name}]}, "m.json") is None


@pytest.mark.slow  # runs the CLIs
def test_the_tools_refuse_a_manifest_pointing_outside_in_one_line(tmp_path):
  from test_pretrain import cli_args, make_corpus

  corpus = make_corpus(tmp_path / "corpus", train_count=32, eval_count=16)
  manifest_path = Path(corpus.train) / records.MANIFEST_NAME
  manifest = json.loads(manifest_path.read_text())
  for bad_name in ("../x.cbj", "/etc/passwd", "gs://other/x"):
    manifest["shards"][0]["name"] = bad_name
    manifest_path.write_text(json.dumps(manifest))
    result = run_module(
      "data_prep.convert_shards", f"--input={corpus.train}", f"--output_dir={tmp_path}/out", "--output_format=tfrecord"
    )
    line = assert_one_line_error(result, "shards[0]", str(manifest_path))
    assert bad_name not in line and result.returncode == 2
    assert not (tmp_path / "out").exists()
    result = run_module(
      "clinical_bert_jax.pretrain",
      *cli_args(corpus, tmp_path / "work"),
      env={"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    line = assert_one_line_error(result, "shards[0]")
    assert bad_name not in line and result.returncode == 2


def test_the_object_storage_cache_refuses_a_manifest_pointing_outside(tmp_path):
  """`gs://` data is listed by the shard cache from the bucket's manifest: the same check applies before any
  download (a name such as `../../other/x.cbj` would fetch another object and cache it outside its folder)."""
  from clinical_bert_jax import fileio, shard_cache
  from gcs_emulator import running_emulator

  _write_data_with_manifest(tmp_path / "data", "../../other/x.cbj", index=0)
  with running_emulator(("data",)):
    for path in sorted((tmp_path / "data").iterdir()):
      with fileio.atomic_write(f"gs://data/hostile/{path.name}", mode="wb") as handle:
        handle.write(path.read_bytes())
    with pytest.raises(UserError, match=r"shards\[0\] does not name a file inside") as caught:
      shard_cache.localize("gs://data/hostile", tmp_path / "cache", "--input_file")
    assert "other/x.cbj" not in str(caught.value)
  assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
