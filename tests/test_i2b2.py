"""i2b2 converters (data_prep.i2b2) on hand-written synthetic releases in the official formats (tests/fixtures/i2b2).

Expected labels below were worked out by hand from each format's definition (clinicalbert-paper.md §7.1), not copied
from the program's output. The fixtures' names, dates and places are invented.
"""

import json
import shutil
from pathlib import Path

import pytest

from clinical_bert_jax.errors import UserError
from data_prep import conll, i2b2
from data_prep.i2b2 import Span, label_text
from tests.cli_util import assert_one_line_error, run_module

FIXTURES = Path(__file__).parent / "fixtures" / "i2b2"


def _pairs(sentence):
  return list(zip(sentence.words, sentence.labels))


def _find(sentences, *first_words):
  """The sentence that starts with `first_words`."""
  return next(s for s in sentences if s.words[: len(first_words)] == first_words)


def _copy_release(task, tmp_path):
  return Path(shutil.copytree(FIXTURES / task, tmp_path / f"release{task}"))


# --- labelling rules ---------------------------------------------------------------------------------------------


def test_words_are_cut_at_span_boundaries_and_get_b_then_i():
  text = "Mr. Quenty's visit:\nSeen 06/25/99 by Ann Lee ."
  spans = [Span(4, 10, "PATIENT"), Span(25, 30, "DATE"), Span(37, 44, "DOCTOR")]
  first, second = label_text(text, spans)
  assert _pairs(first) == [("Mr.", "O"), ("Quenty", "B-PATIENT"), ("'s", "O"), ("visit:", "O")]
  assert _pairs(second) == [
    ("Seen", "O"),
    ("06/25", "B-DATE"),
    ("/99", "O"),
    ("by", "O"),
    ("Ann", "B-DOCTOR"),
    ("Lee", "I-DOCTOR"),
    (".", "O"),
  ]


def test_span_continuing_on_the_next_line_starts_it_with_i_and_blank_lines_vanish():
  text = "Seen at Saint\n\n   \nGrell today"
  sentences = label_text(text, [Span(8, 24, "HOSPITAL")])
  assert [_pairs(s) for s in sentences] == [
    [("Seen", "O"), ("at", "O"), ("Saint", "B-HOSPITAL")],
    [("Grell", "I-HOSPITAL"), ("today", "O")],
  ]


def test_adjacent_spans_each_start_with_b_and_later_spans_win_overlaps():
  sentences = label_text("aaa bbb ccc", [Span(0, 3, "X"), Span(4, 7, "X"), Span(4, 11, "Y"), Span(8, 11, "Z")])
  assert _pairs(sentences[0]) == [("aaa", "B-X"), ("bbb", "B-Y"), ("ccc", "B-Z")]


def test_2006_separator_after_a_span_is_dropped_only_in_2006_mode():
  text = "on 01/01/1995 and 1995/0101"
  spans = [Span(3, 8, "DATE"), Span(23, 27, "DATE")]
  assert _pairs(label_text(text, spans, strip_separator_after_span=True)[0]) == [
    ("on", "O"),
    ("01/01", "B-DATE"),
    ("1995", "O"),
    ("and", "O"),
    ("1995/", "O"),
    ("0101", "B-DATE"),
  ]
  assert ("/1995", "O") in _pairs(label_text(text, spans)[0])


# --- the four releases -------------------------------------------------------------------------------------------


def test_2006_inline_tags_date_edge_cases_repair_and_last_30_percent_dev():
  conversion = i2b2.convert_release("2006", FIXTURES / "2006")
  splits = conversion.splits
  train, dev = splits["train"], splits["dev"]
  assert _pairs(_find(train, "Admission"))[-2:] == [("03/14", "B-DATE"), ("2099", "O")]
  assert _pairs(_find(train, "Transferred"))[2:9] == [
    ("Mount", "B-HOSPITAL"),
    ("Ickle", "I-HOSPITAL"),
    ("Medical", "I-HOSPITAL"),
    ("Center", "I-HOSPITAL"),
    ("on", "O"),
    ("2099", "O"),
    ("0315", "B-DATE"),
  ]
  # The release typo `<PHI TYPE="DATE">25th of July<PHI TYPE="DOCTOR">` is repaired into a closed DATE.
  assert _pairs(_find(train, "Follow"))[3:7] == [
    ("25th", "B-DATE"),
    ("of", "I-DATE"),
    ("July", "I-DATE"),
    ("with", "O"),
  ]
  assert conversion.report["tags"]["repaired_phi_tags"] == ["deid_surrogate_train_all_version2.xml:16"]
  salt = _find(dev, "Salt")
  assert salt.words[1] == "&"  # XML entity decoded
  assert _pairs(salt)[5:7] == [("04-02", "B-DATE"), ("99", "O")]
  # 10 non-empty training lines ([ report_end ] kept, like the original): first int(0.7 * 10) train, in file order.
  assert (len(train), len(dev)) == (7, 3)
  assert train[0].words[0] == "Admission" and dev[-1].words == ("[", "report_end", "]")
  assert conversion.labels == conll.bio_label_list(i2b2.ENTITY_TYPES["2006"])
  assert {label for s in splits["test"] for label in s.labels} <= set(conversion.labels)


def test_2006_unannotated_test_file_is_refused():
  with pytest.raises(UserError, match="no PHI tags; use the ground-truth"):
    i2b2.convert_release("2006", FIXTURES / "2006", test_subdirs=["deid_surrogate_test_all_version2.xml"])


def test_2010_offsets_leading_space_multiline_concepts_and_record_split():
  conversion = i2b2.convert_release("2010", FIXTURES / "2010")
  everything = [s for split in conversion.splits.values() for s in split]
  # Line " 71 yo woman ..." starts with a space: the .con offsets 2:5 and 2:7 point one word to the right.
  assert [(w, l) for w, l in _pairs(_find(everything, "71")) if l != "O"] == [
    ("fever", "B-problem"),
    ("cough", "B-problem"),
  ]
  # "a small / effusion" spans two lines: the continuation sentence starts with I-.
  assert _pairs(_find(everything, "A"))[-2:] == [("a", "B-problem"), ("small", "I-problem")]
  assert _pairs(_find(everything, "effusion")) == [("effusion", "I-problem"), (".", "O")]
  assert _pairs(_find(conversion.splits["test"], "Acute"))[:3] == [
    ("Acute", "B-problem"),
    ("kidney", "I-problem"),
    ("injury", "I-problem"),
  ]
  # 90/10 by record within each source: beth 2 → 1/1, partners 3 → 2/1.
  dev_groups = conversion.report["dev_groups"]
  assert len(dev_groups) == 2 and sum(g.startswith("record-") for g in dev_groups) == 1
  split_of_record_11 = "dev" if "record-11" in dev_groups else "train"
  other_split = {"dev": "train", "train": "dev"}[split_of_record_11]
  assert any(s.words[0] == "Admission" for s in conversion.splits[split_of_record_11])
  assert not any(s.words[0] == "Admission" for s in conversion.splits[other_split])
  assert conversion.report["splits"]["train"]["sentences"] + conversion.report["splits"]["dev"]["sentences"] == 18
  again = i2b2.convert_release("2010", FIXTURES / "2010")
  assert again.splits == conversion.splits  # seeded: deterministic


def test_2012_events_empty_type_timex_ignored_and_patient_split():
  conversion = i2b2.convert_release("2012", FIXTURES / "2012")
  everything = [s for split in conversion.splits.values() for s in split]
  assert conversion.report["tags"]["skipped_empty_type"] == 1
  assert _pairs(_find(everything, "She", "reported"))[-3:] == [("was", "O"), ("drawn", "O"), (".", "O")]
  assert _find(everything, "2099-02-01").labels == ("O",)  # TIMEX3 is not an EVENT
  assert _pairs(_find(everything, "The"))[-1] == ("acute", "B-PROBLEM")
  continuation = _pairs(_find(everything, "appendicitis"))
  assert continuation[0] == ("appendicitis", "I-PROBLEM")
  assert continuation[5:7] == [("general", "B-CLINICAL_DEPT"), ("surgery", "I-CLINICAL_DEPT")]
  assert len(conversion.report["dev_groups"]) == 1 and conversion.report["dev_groups"][0] in {"1", "2", "10"}
  assert conversion.report["records"] == {"train_release": 3, "test_release": 1}


def test_2014_punctuation_cuts_realignment_and_patients_kept_together():
  conversion = i2b2.convert_release("2014", FIXTURES / "2014")
  everything = [s for split in conversion.splits.values() for s in split]
  mister = _pairs(_find(everything, "Mr."))
  assert mister[1:4] == [("Quenty", "B-PATIENT"), ("'s", "O"), ("visit:", "O")]
  assert _pairs(_find(everything, "Quenty,")) == [("Quenty,", "B-PATIENT"), ("Zorblat", "I-PATIENT")]
  # Two tags of 100-02.xml have offsets 4 characters too far (like the release's record 180-03): realigned.
  assert conversion.report["tags"]["realigned"] == ["100-02.xml#P2", "100-02.xml#P3"]
  assert _pairs(_find(everything, "Seen", "by"))[7:9] == [("(555)", "B-PHONE"), ("010-0199", "I-PHONE")]
  assert _pairs(_find(everything, "B", "&"))[5:7] == [("06/25", "B-DATE"), ("/99", "O")]
  # Patient = first 3 characters of the file name: 100-01 and 100-02 land in the same split.
  (dev_patient,) = conversion.report["dev_groups"]
  dev_text = {w for s in conversion.splits["dev"] for w in s.words}
  assert ("NORTHBRIAR" in dev_text) == ("Fennimore" in dev_text) == (dev_patient == "100")
  assert len(conversion.labels) == 47 and conversion.labels[-1] == "O"


def test_tag_whose_text_is_nowhere_near_is_kept_and_listed(tmp_path):
  release = _copy_release("2014", tmp_path)
  record = release / "training-PHI-Gold-Set1" / "101-01.xml"
  record.write_text(record.read_text().replace('text="64"', 'text="46"'))
  conversion = i2b2.convert_release("2014", release)
  assert conversion.report["tags"]["text_mismatch"] == ["101-01.xml#P2"]
  everything = [s for split in conversion.splits.values() for s in split]
  assert ("64", "B-AGE") in _pairs(_find(everything, "Ulla"))


def test_write_conversion_files_and_refuses_to_overwrite(tmp_path):
  conversion = i2b2.convert_release("2012", FIXTURES / "2012")
  out = tmp_path / "out"
  i2b2.write_conversion(conversion, out)
  assert sorted(p.name for p in out.iterdir()) == ["conversion.json", "dev.tsv", "labels.txt", "test.tsv", "train.tsv"]
  assert conll.load_bio_dir(out) == conversion.splits
  assert conll.read_label_list(out / "labels.txt") == i2b2.label_list("2012")
  report = json.loads((out / "conversion.json").read_text())
  assert report["splits"]["test"]["sentences"] == len(conversion.splits["test"])
  assert "appendicitis" not in (out / "conversion.json").read_text()  # counts and ids only, no text
  with pytest.raises(UserError, match="not empty"):
    i2b2.write_conversion(conversion, out)
  i2b2.write_conversion(conversion, out, overwrite=True)


# --- bad input -----------------------------------------------------------------------------------------------------


def test_xml_that_does_not_parse_names_the_file(tmp_path):
  release = _copy_release("2014", tmp_path)
  broken = release / "training-PHI-Gold-Set1" / "101-01.xml"
  broken.write_text(broken.read_text().replace("</TAGS>", "</TAG>"))
  with pytest.raises(UserError) as error:
    i2b2.convert_release("2014", release)
  assert "101-01.xml: not well-formed XML (mismatched tag: line" in str(error.value)
  assert "Brandvik" not in str(error.value)


def test_offsets_outside_the_text_name_file_and_tag(tmp_path):
  release = _copy_release("2012", tmp_path)
  record = release / "2012-07-15.original-annotation.release" / "10.xml"
  record.write_text(record.read_text().replace('id="E1" start="', 'id="E1" start="9000', 1))
  with pytest.raises(UserError, match=r"10\.xml: tag E1 has offsets start=9000\d* end=\d+ outside the TEXT"):
    i2b2.convert_release("2012", release)


def test_unknown_entity_type_is_refused(tmp_path):
  release = _copy_release("2014", tmp_path)
  record = release / "testing-PHI-Gold-fixed" / "110-01.xml"
  record.write_text(record.read_text().replace('TYPE="CITY"', 'TYPE="PLANET"'))
  with pytest.raises(UserError, match="110-01.xml: tag P3 has type 'PLANET', not one of the i2b2 2014 types"):
    i2b2.convert_release("2014", release)


def test_2010_bad_concept_lines_are_reported_by_file_and_line(tmp_path):
  release = _copy_release("2010", tmp_path)
  concepts = release / "concept_assertion_relation_training_data" / "partners" / "concept" / "0102_DS.con"
  original = concepts.read_text()
  concepts.write_text(original + 'c="hypertension" 2:3||t="problem"\n')
  with pytest.raises(UserError, match=r"0102_DS\.con:3: not a concept line"):
    i2b2.convert_release("2010", release)
  concepts.write_text(original.replace("2:1 2:1", "2:2 2:2"))  # points at "for", not "lisinopril"
  with pytest.raises(UserError, match=r"0102_DS\.con:1: the concept text does not match words 2:2-2"):
    i2b2.convert_release("2010", release)
  concepts.write_text(original.replace("2:3 2:3", "9:3 9:3"))
  with pytest.raises(UserError, match=r"0102_DS\.con:2: concept lines 9-9 are outside 0102_DS\.txt \(3 lines\)"):
    i2b2.convert_release("2010", release)
  concepts.write_text(original)
  (concepts.parent.parent / "txt" / "0103_DS.txt").unlink()
  with pytest.raises(UserError, match=r"0103_DS\.con has no matching \.txt"):
    i2b2.convert_release("2010", release)


def test_missing_directories_are_named(tmp_path):
  with pytest.raises(UserError, match="--input_dir=.* is not a directory"):
    i2b2.convert_release("2012", tmp_path / "absent")
  with pytest.raises(UserError, match="--train_subdir: 'no-such-dir' not found under --input_dir"):
    i2b2.convert_release("2012", FIXTURES / "2012", train_subdirs=["no-such-dir"])
  empty = tmp_path / "empty"
  (empty / "2012-07-15.original-annotation.release").mkdir(parents=True)
  with pytest.raises(UserError, match="--train_subdir: no .xml files under"):
    i2b2.convert_release("2012", empty)


def test_layout_is_found_recursively_and_subdir_flags_override(tmp_path):
  nested = tmp_path / "downloads" / "n2c2"
  shutil.copytree(FIXTURES / "2014", nested / "deid")
  found = i2b2.convert_release("2014", tmp_path)
  assert found.splits == i2b2.convert_release("2014", FIXTURES / "2014").splits
  only_set2 = i2b2.convert_release(
    "2014", FIXTURES / "2014", train_subdirs=["training-PHI-Gold-Set2", "training-PHI-Gold-Set1/101-01.xml"]
  )
  assert only_set2.report["records"]["train_release"] == 2


@pytest.mark.slow  # runs the CLI
def test_command_line_success_and_one_line_errors(tmp_path):
  out = tmp_path / "out"
  result = run_module(
    "data_prep.i2b2", "--task=2010", f"--input_dir={FIXTURES / '2010'}", f"--output_dir={out}", "--seed=3"
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((out / "conversion.json").read_text())["seed"] == 3
  release = _copy_release("2006", tmp_path)
  broken = release / "deid_surrogate_train_all_version2.xml"
  broken.write_text(broken.read_text().replace("</RECORD>", "", 1))
  failed = tmp_path / "failed"
  result = run_module("data_prep.i2b2", "--task=2006", f"--input_dir={release}", f"--output_dir={failed}")
  line = assert_one_line_error(result, "deid_surrogate_train_all_version2.xml: not well-formed XML")
  assert "Quenty" not in line and not failed.exists()
  assert_one_line_error(
    run_module("data_prep.i2b2", "--task=2099", f"--input_dir={release}", f"--output_dir={out}"), "--task"
  )
