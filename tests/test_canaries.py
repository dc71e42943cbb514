"""data_prep.canaries: canaries land exactly where the canary list says, as often as asked, deterministically, and
the list of secrets never lands in a text directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_util import assert_one_line_error, run_module
from clinical_bert_jax.errors import UserError
from data_prep import canaries


def _text_dir(root: Path, files: int = 3, docs_per_file: int = 30) -> Path:
  """Google text format: sentences, a blank line after each document."""
  root.mkdir(parents=True)
  for f in range(files):
    blocks = []
    for d in range(docs_per_file):
      blocks.append("\n".join(f"Sentence {s} of document {d} in file {f} ." for s in range(1 + (d % 4))) + "\n")
    (root / f"discharge_summary-{f:05d}.txt").write_text("\n".join(blocks), encoding="utf-8")
  (root / "manifest.json").write_text(json.dumps({"format": "clinical_bert_jax.format_mimic/1"}), encoding="utf-8")
  return root


def _documents(directory: Path) -> list[tuple[str, list[str]]]:
  result = []
  for path in sorted(directory.glob("*.txt")):
    for block in path.read_text(encoding="utf-8").split("\n\n"):
      lines = [line for line in block.splitlines() if line.strip()]
      if lines:
        result.append((path.name, lines))
  return result


def test_canaries_go_where_the_list_says_as_often_as_asked(tmp_path):
  source = _text_dir(tmp_path / "text")
  summary = canaries.insert_canaries(
    source,
    tmp_path / "with",
    tmp_path / "secret" / "canaries.jsonl",
    repetitions=[0, 1, 4, 16],
    canaries_per_count=3,
    seed=5,
  )
  header, rows = canaries.read_canary_file(tmp_path / "secret" / "canaries.jsonl")
  assert header["template"] == canaries.DEFAULT_TEMPLATE and len(rows) == 12 == summary["canaries"]
  assert len({row["secret"] for row in rows}) == 12 and all(len(row["secret"]) == 6 for row in rows)
  output_docs = _documents(tmp_path / "with")
  original_docs = _documents(source)
  assert len(output_docs) == len(original_docs)  # inserted into documents, never as new documents
  texts = {row["text"]: row for row in rows}
  for (name, lines), (original_name, original_lines) in zip(output_docs, original_docs):
    assert name == original_name
    assert [line for line in lines if line not in texts] == original_lines  # the notes are untouched, in order
  for row in rows:
    assert row["secret"] in row["text"] and row["name"] in row["text"] and row["condition"] in row["text"]
    assert len(row["locations"]) == row["repetitions"]
    copies = [d for d, (_, lines) in enumerate(output_docs) if row["text"] in lines]
    assert len(copies) == row["repetitions"]  # one copy per document, in distinct documents
    for file_name, line in row["locations"]:
      assert (tmp_path / "with" / file_name).read_text(encoding="utf-8").splitlines()[line - 1] == row["text"]
  manifest = json.loads((tmp_path / "with" / "manifest.json").read_text(encoding="utf-8"))
  assert manifest["canaries"]["inserted_lines"] == 3 * (1 + 4 + 16)
  assert not any(row["secret"] in (tmp_path / "with" / "manifest.json").read_text() for row in rows)


def test_same_seed_same_bytes_other_seed_other_canaries(tmp_path):
  source = _text_dir(tmp_path / "text")
  outputs = []
  for run, seed in enumerate((1, 1, 2)):
    canaries.insert_canaries(source, tmp_path / f"out{run}", tmp_path / f"c{run}.jsonl", repetitions=[1, 4], seed=seed)
    outputs.append(
      (
        [p.read_bytes() for p in sorted((tmp_path / f"out{run}").iterdir())],
        (tmp_path / f"c{run}.jsonl").read_bytes().split(b"\n", 1)[1],
      )
    )  # the header names the dirs
  assert outputs[0] == outputs[1]
  assert outputs[0][1] != outputs[2][1] and outputs[0][0] != outputs[2][0]


@pytest.mark.parametrize(
  "template, fragment",
  [
    ("{name} was diagnosed with {condition} .", "secret slot {secret} exactly once"),
    ("{name} {secret} and {secret}", "exactly once (found 2)"),
    ("{name} {secret} {doctor}", "unknown slot(s) {doctor}"),
    ("{name {secret}", "not a valid format string"),
  ],
)
def test_bad_templates_are_refused(template, fragment):
  with pytest.raises(UserError) as error:
    canaries.parse_template(template)
  assert fragment in str(error.value)


@pytest.mark.slow  # runs the CLI
def test_cli_refuses_a_canary_file_inside_a_text_directory_and_writes_nothing(tmp_path):
  source = _text_dir(tmp_path / "text", files=1, docs_per_file=5)
  for inside in (tmp_path / "out" / "canaries.jsonl", source / "canaries.jsonl"):
    result = run_module(
      "data_prep.canaries",
      f"--input_dir={source}",
      f"--output_dir={tmp_path / 'out'}",
      f"--canary_file={inside}",
      "--repetitions=1",
    )
    assert result.returncode == 2
    assert_one_line_error(result, "--canary_file", "must never enter the training text directory")
  assert not (tmp_path / "out").exists() and not (source / "canaries.jsonl").exists()
  result = run_module(
    "data_prep.canaries",
    f"--input_dir={source}",
    f"--output_dir={tmp_path / 'out'}",
    f"--canary_file={tmp_path / 'c.jsonl'}",
    "--repetitions=1,64",
  )
  assert_one_line_error(result, "needs 64 documents", "has 5")
  assert not (tmp_path / "out").exists() and not (tmp_path / "c.jsonl").exists()
  result = run_module(
    "data_prep.canaries",
    f"--input_dir={source}",
    f"--output_dir={tmp_path / 'out'}",
    f"--canary_file={tmp_path / 'c.jsonl'}",
    "--template=no secret here",
  )
  assert_one_line_error(result, "--template must contain the secret slot")
  result = run_module(
    "data_prep.canaries",
    f"--input_dir={source}",
    f"--output_dir={tmp_path / 'out'}",
    f"--canary_file={tmp_path / 'c.jsonl'}",
    "--repetitions=0,2",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Sentence" not in result.stdout + result.stderr  # no text in the output
