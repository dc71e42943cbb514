"""TFDS builders (data_prep.tfds_builders): built on tiny public/synthetic data, read back with and without TensorFlow.

The TF-less check (build one dataset, read three) runs in a subprocess whose import system refuses `tensorflow`.
(Setting `sys.modules['tensorflow'] = None` does not work with tensorflow-datasets 4.9: etils decides "TensorFlow is
loaded" from the mere presence of that key and then fails to use it, so a meta-path blocker simulates "not
installed".)
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from clinical_bert_jax.errors import UserError
from data_prep import conll, format_mimic, i2b2
from data_prep.tfds_builders import build, mednli
from tests.cli_util import REPO, assert_one_line_error, run_module

pytestmark = pytest.mark.slow  # TensorFlow Datasets builds

SNLI_DIR = Path(__file__).parent / "data" / "nli" / "snli-mednli-schema"
ACI_NOTES = REPO / "data_prep" / "demo_corpus" / "NOTEEVENTS_aci_bench.csv"
SYNTHETIC_NOTES = REPO / "data_prep" / "demo_corpus" / "NOTEEVENTS_synthetic.csv"
I2B2_FIXTURES = Path(__file__).parent / "fixtures" / "i2b2"

_WITHOUT_TENSORFLOW = r"""
import importlib.abc, importlib.machinery, json, sys

class RefuseTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      return importlib.machinery.ModuleSpec(name, self)
  def create_module(self, spec):
    raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
  def exec_module(self, module):
    raise AssertionError("unreachable")

sys.meta_path.insert(0, RefuseTensorFlow())
import tensorflow_datasets as tfds
import data_prep.tfds_builders

def plain(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
    value = value.tolist() if hasattr(value, "tolist") else value
    return [plain(v) for v in value] if isinstance(value, list) else value
  return value

data_dir, tf_free_data_dir, i2b2_2006_release, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
from data_prep.tfds_builders import build
build.build("i2b2/2006", i2b2_2006_release, tf_free_data_dir)  # generation works without TensorFlow too
result = {"built_without_tensorflow": len(tfds.data_source("i2b2/2006", data_dir=tf_free_data_dir,
                                                           download=False)["train"])}
for name in names:
  sources = tfds.data_source(name, data_dir=data_dir, download=False)
  result[name] = {split: [{k: plain(v) for k, v in source[i].items()} for i in range(len(source))]
                  for split, source in sources.items()}
try:
  import tensorflow
  result["tensorflow_importable"] = True
except ImportError:
  result["tensorflow_importable"] = False
result["tensorflow_loaded"] = "tensorflow" in sys.modules
print(json.dumps(result))
"""


def _manual_dir(tmp_path_factory, name, files):
  directory = tmp_path_factory.mktemp(name)
  for path in files:
    shutil.copy(path, directory / path.name)
  return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Every builder prepared once into one data_dir: {dataset name: builder}."""
  tfds.disable_progress_bar()
  data_dir = str(tmp_path_factory.mktemp("tfds_data"))
  manual = {
    "mednli": _manual_dir(tmp_path_factory, "mednli", sorted(SNLI_DIR.glob("*.jsonl"))),
    "clinical_notes/all_notes": _manual_dir(tmp_path_factory, "notes", [ACI_NOTES, SYNTHETIC_NOTES]),
    "clinical_notes/discharge_summary": _manual_dir(tmp_path_factory, "discharge", [SYNTHETIC_NOTES]),
    **{f"i2b2/{task}": I2B2_FIXTURES / task for task in i2b2.TASKS},
  }
  return data_dir, {name: build.build(name, str(directory), data_dir) for name, directory in manual.items()}


def _decoded(value):
  return value.decode() if isinstance(value, bytes) else value


def _examples(builder, split):
  source = builder.as_data_source()[split]
  return [source[i] for i in range(len(source))]


def test_builders_write_array_record(built):
  _, builders = built
  for name, builder in builders.items():
    assert builder.info.file_format.value == "array_record", name
    assert list(Path(builder.data_dir).glob("*.array_record-*")), name


def test_mednli_holds_every_pair_with_its_label(built):
  _, builders = built
  builder = builders["mednli"]
  assert builder.info.features["label"].names == ["contradiction", "entailment", "neutral"]
  for split, file_split in (("train", "train"), ("dev", "dev"), ("test", "test")):
    expected = {
      record["pairID"]: record
      for _, record in mednli.read_mednli_jsonl(SNLI_DIR / f"snli_mednli_schema_{file_split}.jsonl")
    }
    examples = _examples(builder, split)
    assert len(examples) == len(expected) == builder.info.splits[split].num_examples
    for example in examples:
      record = expected[example["pair_id"].decode()]
      assert example["premise"].decode() == record["sentence1"]
      assert example["hypothesis"].decode() == record["sentence2"]
      assert builder.info.features["label"].int2str(example["label"]) == record["gold_label"]


@pytest.mark.parametrize("task", i2b2.TASKS)
def test_i2b2_from_the_raw_release_equals_the_converter_output(built, task):
  _, builders = built
  builder = builders[f"i2b2/{task}"]
  names = builder.info.features["labels"].feature.names
  assert names == i2b2.label_list(task)
  expected = i2b2.convert_release(task, I2B2_FIXTURES / task).splits
  for split, sentences in expected.items():
    examples = sorted(_examples(builder, split), key=lambda e: e["index"])
    assert [tuple(w.decode() for w in e["words"]) for e in examples] == [s.words for s in sentences]
    assert [tuple(names[i] for i in e["labels"]) for e in examples] == [s.labels for s in sentences]


def test_i2b2_from_converted_bio_files(tmp_path):
  conversion = i2b2.convert_release("2012", I2B2_FIXTURES / "2012")
  i2b2.write_conversion(conversion, tmp_path / "bio")
  builder = build.build("i2b2/2012", str(tmp_path / "bio"), str(tmp_path / "data"))
  assert {split: info.num_examples for split, info in builder.info.splits.items()} == {
    split: len(sentences) for split, sentences in conversion.splits.items()
  }
  # Labels outside the task's label set are refused, naming the file.
  conll.write_bio(tmp_path / "bio" / "dev.tsv", [conll.Sentence(["x"], ["B-PLANET"])])
  with pytest.raises(UserError, match=r"dev\.tsv: 1 word\(s\) carry labels outside the allowed set: 'B-PLANET'"):
    build.build("i2b2/2012", str(tmp_path / "bio"), str(tmp_path / "data2"))
  assert not (tmp_path / "data2" / "i2b2" / "2012" / "1.0.0").exists()


def test_clinical_notes_match_iter_notes(built):
  _, builders = built
  for name, files, categories in (
    ("clinical_notes/all_notes", [ACI_NOTES, SYNTHETIC_NOTES], None),
    ("clinical_notes/discharge_summary", [SYNTHETIC_NOTES], ["Discharge summary"]),
  ):
    expected = {
      f"{path.name}:{note.row_id}": note
      for path in files
      for note in format_mimic.iter_notes(path, categories=categories)
    }
    examples = _examples(builders[name], "train")
    assert len(examples) == len(expected) > 0
    by_id = {}
    for example in examples:
      by_id.setdefault(example["row_id"].decode(), []).append(example)
    for note in expected.values():
      assert any(
        e["text"].decode() == note.text and e["category"].decode() == note.category for e in by_id[note.row_id]
      )
    if categories:
      assert {e["category"].decode() for e in examples} == {"Discharge summary"}


def test_reading_and_building_work_without_tensorflow(built, tmp_path):
  data_dir, builders = built
  names = ["mednli", "i2b2/2010", "clinical_notes/discharge_summary"]
  result = subprocess.run(
    [sys.executable, "-c", _WITHOUT_TENSORFLOW, data_dir, str(tmp_path), str(I2B2_FIXTURES / "2006"), *names],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  read = json.loads(result.stdout.strip().splitlines()[-1])
  assert read["tensorflow_importable"] is False and read["tensorflow_loaded"] is False
  assert read["built_without_tensorflow"] == builders["i2b2/2006"].info.splits["train"].num_examples
  for name in names:
    for split, examples in read[name].items():
      in_process = _examples(builders[name], split)
      assert len(examples) == len(in_process) > 0
      key = "pair_id" if name == "mednli" else ("index" if name.startswith("i2b2") else "row_id")
      assert sorted(e[key] for e in examples) == sorted(_decoded(e[key]) for e in in_process)
  first_i2b2 = min(read["i2b2/2010"]["test"], key=lambda e: e["index"])
  assert first_i2b2["words"] == list(i2b2.convert_release("2010", I2B2_FIXTURES / "2010").splits["test"][0].words)


def test_bad_mednli_lines_are_reported_by_file_and_line(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for path in SNLI_DIR.glob("*.jsonl"):
    shutil.copy(path, manual / path.name)
  dev = manual / "snli_mednli_schema_dev.jsonl"
  lines = dev.read_text().splitlines()
  record = json.loads(lines[2])
  record["gold_label"] = "maybe"
  dev.write_text("\n".join(lines[:2] + [json.dumps(record)] + lines[3:]) + "\n")
  with pytest.raises(UserError, match=r"snli_mednli_schema_dev\.jsonl:3: gold_label is not one of"):
    build.build("mednli", str(manual), str(tmp_path / "data"))
  del record["sentence2"]
  dev.write_text("\n".join(lines[:2] + [json.dumps(record)]) + "\n")
  with pytest.raises(UserError, match=r"dev\.jsonl:3: missing or non-string key\(s\) sentence2"):
    build.build("mednli", str(manual), str(tmp_path / "data"))
  assert not list((tmp_path / "data").glob("mednli/*/dataset_info.json"))  # nothing half-built
  shutil.copy(dev, manual / "mli_dev_v1.jsonl")
  with pytest.raises(UserError, match=r"2 files .* for the MedNLI dev split"):
    build.build("mednli", str(manual), str(tmp_path / "data"))


def test_missing_manual_files_and_unknown_datasets(tmp_path):
  with pytest.raises(UserError, match="mednli: the manual download directory is missing or empty; Put mli_train"):
    build.build("mednli", str(tmp_path / "absent"), str(tmp_path / "data"))
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "readme.txt").write_text("not notes")
  with pytest.raises(UserError, match=r"no NOTEEVENTS\*\.csv or .* file"):
    build.build("clinical_notes/all_notes", str(tmp_path / "notes"), str(tmp_path / "data"))
  with pytest.raises(UserError, match="i2b2 needs a config, one of 2006, 2010, 2012, 2014"):
    build.make_builder("i2b2")
  result = run_module(
    "data_prep.tfds_builders.build", "--dataset=squad", f"--manual_dir={tmp_path}", f"--data_dir={tmp_path / 'data'}"
  )
  assert_one_line_error(result, "--dataset=squad: unknown dataset; choose one of clinical_notes/all_notes")
