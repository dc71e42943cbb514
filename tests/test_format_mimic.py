"""NOTEEVENTS / MIMIC-IV-Note reading, formatting to text shards, bad input, and the demo corpus."""

import csv
import gzip
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clinical_bert_jax.errors import UserError
from data_prep import format_mimic, synthetic_notes
from data_prep.format_mimic import NoteStats, category_stem, format_notes, iter_notes, parse_categories

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "data_prep" / "demo_corpus"
SYNTHETIC = DEMO_CORPUS / "NOTEEVENTS_synthetic.csv"
HEADER_ONLY_DEMO = REPO / "tests" / "data" / "notes" / "mimic-iii-demo-schema" / "NOTEEVENTS.csv"
MIMIC3_HEADER = [
  "row_id",
  "subject_id",
  "hadm_id",
  "chartdate",
  "charttime",
  "storetime",
  "category",
  "description",
  "cgid",
  "iserror",
  "text",
]
# Stands in for protected note text: it must never appear in an error message or in logs.
SECRET = "ZEBRAPHI"


def _mimic3_row(row_id, category, text, iserror=""):
  return [row_id, 100 + row_id, 1000 + row_id, "2150-01-01", "", "", category, "Report", "", iserror, text]


ROWS = [
  _mimic3_row(1, "Discharge summary", f"Admitted for {SECRET} pain.\nDischarged home."),
  _mimic3_row(2, "Physician ", "Exam normal. Plan discussed."),
  _mimic3_row(3, "Nursing", "Error note.", iserror="1"),
  _mimic3_row(4, "Nursing", "   \n  "),
  _mimic3_row(5, "Radiology", ""),
]


def _write_csv(path, header, rows, *, upper=False, terminator="\n", compress=False, prefix=b""):
  buffer = io.StringIO(newline="")
  writer = csv.writer(buffer, lineterminator=terminator)
  writer.writerow([name.upper() for name in header] if upper else header)
  writer.writerows(rows)
  data = prefix + buffer.getvalue().encode("utf-8")
  path.write_bytes(gzip.compress(data) if compress else data)
  return path


def _read_shards(directory, stem):
  """Notes of a category's shards in order, each a list of sentence lines."""
  text = "".join(
    (directory / name).read_text(encoding="utf-8")
    for name in sorted(os.listdir(directory))
    if name.startswith(stem + "-")
  )
  assert text.endswith("\n\n")
  return [block.split("\n") for block in text[:-2].split("\n\n")]


def test_iter_notes_streams_multiline_rows_with_start_lines_and_counts_skips(tmp_path):
  path = _write_csv(tmp_path / "notes.csv", MIMIC3_HEADER, ROWS)
  stats = NoteStats()
  notes = list(iter_notes(path, stats=stats))
  assert [(n.row_id, n.category, n.line_number) for n in notes] == [
    ("1", "Discharge summary", 2),
    ("2", "Physician", 4),
  ]
  assert notes[0].text == ROWS[0][-1]
  assert (stats.source, stats.rows, stats.notes) == ("mimic3", 5, 2)
  assert stats.skipped == {"iserror": 1, "empty_text": 2}
  kept = list(iter_notes(path, keep_iserror=True))
  assert [n.row_id for n in kept] == ["1", "2", "3"]


def test_gzip_upper_case_headers_crlf_and_bom_read_the_same(tmp_path):
  rows = [row[:-1] + [row[-1].replace("\n", "\r\n")] for row in ROWS]
  path = _write_csv(
    tmp_path / "NOTEEVENTS.csv.gz",
    MIMIC3_HEADER,
    rows,
    upper=True,
    terminator="\r\n",
    compress=True,
    prefix=b"\xef\xbb\xbf",
  )
  plain = _write_csv(tmp_path / "plain.csv", MIMIC3_HEADER, ROWS)
  assert list(iter_notes(path)) == list(iter_notes(plain))


def test_categories_match_by_name_or_stem_ignoring_case_and_spaces(tmp_path):
  path = _write_csv(tmp_path / "notes.csv", MIMIC3_HEADER, ROWS)
  stats = NoteStats()
  notes = list(iter_notes(path, categories=[" physician", "DISCHARGE_SUMMARY"], stats=stats))
  assert [n.row_id for n in notes] == ["1", "2"]
  assert stats.skipped["category_filtered"] == 3
  assert parse_categories("all") is None
  assert parse_categories(" Nursing/other , ECG,") == ["Nursing/other", "ECG"]
  assert [category_stem(c) for c in ("Nursing/other", "Case Management ", "Discharge summary", "Weird  Kind!")] == [
    "nursing_other",
    "case_management",
    "discharge_summary",
    "weird_kind",
  ]


def test_unknown_category_says_none_matched_and_lists_categories_found(tmp_path):
  path = _write_csv(tmp_path / "notes.csv", MIMIC3_HEADER, ROWS)
  with pytest.raises(UserError) as error:
    list(iter_notes(path, categories=["Physician", "Consult"]))
  message = str(error.value)
  assert "'Consult' matched no note" in message and "'Nursing' (2)" in message and "'Physician' (1)" in message
  assert SECRET not in message


def test_mimic4_note_types_map_to_categories(tmp_path):
  header = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]
  rows = [
    ["10000032-DS-21", 10000032, 22595853, "DS", 21, "2180-05-07 00:00:00", "", "Discharged. Doing well."],
    ["10000032-RR-14", 10000032, 22595853, "RR", 14, "2180-05-06 21:19:00", "", "EXAMINATION: CHEST."],
    ["10000032-AR-15", 10000032, 22595853, "AR", 15, "2180-05-06 22:00:00", "", "ADDENDUM: Noted."],
  ]
  path = _write_csv(tmp_path / "discharge.csv.gz", header, rows, compress=True)
  assert [(n.row_id, n.category) for n in iter_notes(path)] == [
    ("10000032-DS-21", "Discharge summary"),
    ("10000032-RR-14", "Radiology"),
    ("10000032-AR-15", "Radiology"),
  ]
  manifest = format_notes(path, tmp_path / "out")
  assert manifest["source"] == "mimic4"
  assert sorted(manifest["categories"]) == ["discharge_summary", "radiology"]
  assert _read_shards(tmp_path / "out", "radiology") == [["EXAMINATION: CHEST."], ["ADDENDUM: Noted."]]


def test_invalid_utf8_bytes_are_replaced_and_counted(tmp_path):
  path = tmp_path / "notes.csv"
  path.write_bytes(b"ROW_ID,CATEGORY,TEXT\n1,Nursing,\"Temp 98.6\xb0F stable.\"\n2,Nursing,\"ok \xff\xfe.\"\n")
  stats = NoteStats()
  notes = list(iter_notes(path, stats=stats))
  assert [n.text for n in notes] == ["Temp 98.6\ufffdF stable.", "ok \ufffd\ufffd."]
  assert (stats.invalid_utf8_bytes_replaced, stats.notes_with_invalid_utf8) == (3, 2)


BAD_INPUTS = {
  "missing_columns": (
    b"row_id,text\n1,\"" + SECRET.encode() + b"\"\n",
    r"missing column\(s\) category .*"
    r"columns found: row_id, text",
  ),
  "tab_separated": (b"ROW_ID\tCATEGORY\tTEXT\n1\tNursing\t" + SECRET.encode() + b"\n", "tab-separated"),
  "semicolon_separated": (b"ROW_ID;CATEGORY;TEXT\n1;Nursing;" + SECRET.encode() + b"\n", "semicolon-separated"),
  "stray_quote": (
    b"ROW_ID,CATEGORY,TEXT\n1,Nursing,\"fine\nnote\"\n2,Nursing,\"bad\"" + SECRET.encode() + b"\n",
    "malformed CSV in the row starting at line 4",
  ),
  "unclosed_quote": (
    b"ROW_ID,CATEGORY,TEXT\n1,Nursing,ok\n2,Nursing,\"" + SECRET.encode() + b"\nmore\n",
    "malformed CSV in the row starting at line 3 .*unexpected end of data",
  ),
  "extra_field": (
    b"ROW_ID,CATEGORY,TEXT\n1,Nursing,\"a\",\"" + SECRET.encode() + b"\"\n",
    "line 2 has 4 fields but the header has 3",
  ),
  "empty_file": (b"", "is empty"),
  "header_only": (HEADER_ONLY_DEMO.read_bytes(), "has a header but no note rows"),
  "only_error_rows": (
    b"ROW_ID,CATEGORY,ISERROR,TEXT\n1,Nursing,1,\"" + SECRET.encode() + b"\"\n",
    r"no notes written .*'iserror': 1",
  ),
  "truncated_gzip": (
    gzip.compress(b"ROW_ID,CATEGORY,TEXT\n1,Nursing,\"" + SECRET.encode() * 9 + b"\"\n")[:-12],
    "may be truncated or corrupt",
  ),
  "not_a_csv": (
    (SECRET + " sat on the chair, then: left. Dr said no.\nmore text\n").encode(),
    "fields that do not look like column names",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_one_line_error_without_note_text_or_output(tmp_path, case):
  data, pattern = BAD_INPUTS[case]
  path = tmp_path / "input.csv"
  path.write_bytes(data)
  with pytest.raises(UserError, match=pattern) as error:
    format_notes(path, tmp_path / "out")
  assert SECRET not in str(error.value) and "\n" not in str(error.value)
  assert os.listdir(tmp_path) == ["input.csv"]  # no output dir, no staging leftovers


def test_non_empty_output_dir_is_refused_unless_overwrite(tmp_path):
  path = _write_csv(tmp_path / "notes.csv", MIMIC3_HEADER, ROWS)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "old.txt").write_text("old")
  with pytest.raises(UserError, match="is not empty; choose an empty directory or pass --overwrite"):
    format_notes(path, tmp_path / "out")
  format_notes(path, tmp_path / "out", overwrite=True)
  assert sorted(os.listdir(tmp_path / "out")) == ["discharge_summary-00000.txt", "manifest.json", "physician-00000.txt"]


@pytest.mark.skipif(importlib.util.find_spec("spacy") is not None, reason="spaCy is installed here")
def test_scispacy_splitter_missing_fails_before_writing(tmp_path):
  path = _write_csv(tmp_path / "notes.csv", MIMIC3_HEADER, ROWS)
  with pytest.raises(UserError, match="pip install scispacy"):
    format_notes(path, tmp_path / "out", sentence_splitter="scispacy")
  assert not (tmp_path / "out").exists()


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run(
    [sys.executable, "-m", "data_prep.format_mimic", *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=120,
  )


@pytest.mark.slow  # runs the CLI
def test_cli_writes_shards_and_never_logs_note_text(tmp_path):
  path = _write_csv(tmp_path / "notes.csv", MIMIC3_HEADER, ROWS)
  result = _cli(f"--input={path}", f"--output_dir={tmp_path / 'out'}", "--categories=Discharge summary")
  assert result.returncode == 0, result.stderr[-2000:]
  assert SECRET not in result.stdout + result.stderr
  assert _read_shards(tmp_path / "out", "discharge_summary") == [[f"Admitted for {SECRET} pain.", "Discharged home."]]


@pytest.mark.slow  # runs the CLI
@pytest.mark.parametrize("case", ["header_only", "stray_quote"])
def test_cli_bad_input_exits_2_with_one_error_line(tmp_path, case):
  path = tmp_path / "input.csv"
  path.write_bytes(BAD_INPUTS[case][0])
  result = _cli(f"--input={path}", f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and SECRET not in result.stderr
  assert os.listdir(tmp_path) == ["input.csv"]


def test_demo_corpus_formats_identically_with_two_workers_and_accounts_for_every_row(tmp_path, monkeypatch):
  monkeypatch.setattr(format_mimic, "_CHUNK_NOTES", 7)  # many chunks in flight, so ordering is exercised
  one = format_notes(SYNTHETIC, tmp_path / "one", shard_size_notes=4)
  two = format_notes(SYNTHETIC, tmp_path / "two", shard_size_notes=4, num_workers=2)
  names = sorted(os.listdir(tmp_path / "one"))
  assert names == sorted(os.listdir(tmp_path / "two"))
  for name in names:
    if name != "manifest.json":
      assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
  assert {k: v for k, v in one.items() if k != "flags"} == {k: v for k, v in two.items() if k != "flags"}
  assert json.loads((tmp_path / "one" / "manifest.json").read_text()) == one

  skipped = one["skipped"]
  assert (skipped["iserror"], skipped["empty_text"], skipped["category_filtered"]) == (1, 2, 0)
  assert skipped["section_splitter_error"] > 0  # the synthetic "3 days of ..." lines trip bug 1
  assert one["invalid_utf8"] == {"bytes_replaced": 1, "notes_affected": 1}
  assert one["rows_read"] == 100 == one["notes_written"] + sum(skipped.values())
  assert set(one["categories"]) == {
    "discharge_summary",
    "radiology",
    "nursing",
    "nursing_other",
    "ecg",
    "physician",
    "respiratory",
  }
  assert one["categories"]["physician"]["categories"] == {"Physician": one["categories"]["physician"]["notes"]}
  for stem, entry in one["categories"].items():
    notes = _read_shards(tmp_path / "one", stem)
    assert len(notes) == entry["notes"] and len(entry["shards"]) == -(-entry["notes"] // 4)
    assert sum(map(len, notes)) == entry["sentences"]
    assert all(line and line == line.strip() for note in notes for line in note)
    assert sum((tmp_path / "one" / name).stat().st_size for name in entry["shards"]) == entry["bytes"]
  discharge_lines = [line for note in _read_shards(tmp_path / "one", "discharge_summary") for line in note]
  assert any(" was transferred from [**" in line and "]. Admitted on [**" in line for line in discharge_lines)


def test_fixed_section_bugs_keep_the_notes_the_original_dropped(tmp_path):
  original = format_notes(SYNTHETIC, tmp_path / "original", categories=["Discharge summary"])
  fixed = format_notes(SYNTHETIC, tmp_path / "fixed", categories=["Discharge summary"], section_bugs="fixed")
  assert fixed["skipped"]["section_splitter_error"] == 0
  assert fixed["notes_written"] == original["notes_written"] + original["skipped"]["section_splitter_error"]
  assert fixed["sentences"] > original["sentences"]


def test_aci_bench_copy_formats_all_notes(tmp_path):
  manifest = format_notes(DEMO_CORPUS / "NOTEEVENTS_aci_bench.csv", tmp_path / "out")
  assert manifest["notes_written"] == manifest["rows_read"] == 207
  assert list(manifest["categories"]) == ["physician"]


def test_shipped_synthetic_corpus_regenerates_byte_identically(tmp_path):
  assert synthetic_notes.generate(100, 12345) == SYNTHETIC.read_bytes()
  assert synthetic_notes.generate(100, 1) != SYNTHETIC.read_bytes()
  with pytest.raises(UserError, match="--num_notes=3 is too small"):
    synthetic_notes.generate(3, 12345)


def test_a_category_outside_mimics_is_never_written_out_unless_asked_for(tmp_path):
  """Note text slid into CATEGORY (a malformed row) must not become a file name or a manifest key."""
  rows = [_mimic3_row(1, "Nursing", "Stable overnight."), _mimic3_row(2, f"{SECRET} pain improved", "Plan unchanged.")]
  path = _write_csv(tmp_path / "notes.csv", MIMIC3_HEADER, rows)
  manifest = format_notes(path, tmp_path / "out")
  assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json", "nursing-00000.txt", "other-00000.txt"]
  assert SECRET not in (tmp_path / "out" / "manifest.json").read_text() and manifest["notes_written"] == 2
  assert manifest["categories"]["other"]["categories"] == {format_mimic.UNLISTED_CATEGORY: 1}
  # Named by --categories, the value came from the user, not the data: it keeps its own files.
  asked = format_notes(path, tmp_path / "asked", categories=[f"{SECRET} pain improved"])
  assert list(asked["categories"]) == [category_stem(f"{SECRET} pain improved")]
  # Nor does it reach the error that lists the categories found when a requested one matched nothing.
  with pytest.raises(UserError, match=r"'Nursing' \(1\) and 1 value\(s\) outside MIMIC's categories") as error:
    format_notes(path, tmp_path / "none", categories=["Echo"])
  assert SECRET not in str(error.value)
