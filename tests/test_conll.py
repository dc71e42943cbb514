"""BIO CoNLL reading/writing/validation (data_prep.conll): formats accepted, errors by file:line, no words leaked."""

from pathlib import Path

import pytest

from clinical_bert_jax.errors import UserError
from data_prep import conll
from data_prep.conll import Sentence

NCBI_DIR = Path(__file__).parent / "data" / "ner" / "ncbi-disease"
# A word that must never appear in an error message (stands in for note text).
SECRET_WORD = "Zorblatquenty"


def _sentences():
  return [
    Sentence(
      ["Patient", SECRET_WORD, "denies", "chest", "pain", "."], ["O", "B-PATIENT", "O", "B-problem", "I-problem", "O"]
    ),
    Sentence(["Seen", "today"], ["O", "O"]),
    Sentence(["One"], ["O"]),
  ]


def test_write_then_read_round_trips_and_records_line_numbers(tmp_path):
  path = tmp_path / "train.tsv"
  conll.write_bio(path, _sentences())
  lines = path.read_text(encoding="utf-8").split("\n")
  assert lines[0] == "Patient\tO" and lines[6] == "" and lines[7] == "Seen\tO"
  read = conll.read_bio(path)
  assert read == _sentences()
  assert [s.line_number for s in read] == [1, 8, 11]  # blank line after each sentence


def test_read_accepts_space_separator_crlf_bom_and_runs_of_blank_lines(tmp_path):
  path = tmp_path / "mixed.tsv"
  path.write_bytes("\ufeffHe O\r\nwas O \r\n\r\n \t\r\n\r\nfine\tB-X\n\n\n".encode("utf-8"))
  assert conll.read_bio(path) == [Sentence(["He", "was"], ["O", "O"]), Sentence(["fine"], ["B-X"])]


@pytest.mark.parametrize(
  "bad_line", [f"{SECRET_WORD}\tB-PATIENT\tO", f"{SECRET_WORD} of B-PATIENT", f"{SECRET_WORD}", f"\t{SECRET_WORD}"]
)
def test_malformed_line_is_reported_by_file_and_line_only(tmp_path, bad_line):
  path = tmp_path / "dev.tsv"
  path.write_text(f"Seen\tO\n\n{bad_line}\nok\tO\n", encoding="utf-8")
  with pytest.raises(UserError) as error:
    conll.read_bio(path)
  assert f"{path}:3:" in str(error.value)
  assert SECRET_WORD not in str(error.value)


def test_invalid_utf8_is_reported_with_its_line(tmp_path):
  path = tmp_path / "test.tsv"
  path.write_bytes(b"Seen\tO\nbad\xff\tO\n")
  with pytest.raises(UserError, match=r"test\.tsv:2: not valid UTF-8"):
    conll.read_bio(path)


def test_missing_file_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="not found"):
    conll.read_bio(tmp_path / "absent.tsv")


def test_validate_labels_lists_unknown_labels_with_counts_and_first_line(tmp_path):
  path = tmp_path / "train.tsv"
  path.write_text("a\tO\nb\tB-FOO\n\nc\tB-FOO\nd\tI-BAR\n", encoding="utf-8")
  with pytest.raises(UserError) as error:
    conll.validate_labels(conll.read_bio(path), ["O", "B-problem", "I-problem"], source=path)
  message = str(error.value)
  assert (
    "'B-FOO' x2 (first in the sentence at line 1)" in message
    and "'I-BAR' x1 (first in the sentence at line 4)" in message
  )
  assert "3 word(s)" in message and message.startswith(str(path))
  conll.validate_labels(conll.read_bio(path), ["O", "B-FOO", "I-BAR"])  # all known: no error


def test_validate_labels_never_echoes_word_shaped_values():
  swapped = [Sentence(["B-PATIENT"], [SECRET_WORD])]  # columns swapped: the label column holds a word
  with pytest.raises(UserError) as error:
    conll.validate_labels(swapped, ["O", "B-PATIENT"])
  assert SECRET_WORD not in str(error.value) and "not label-shaped" in str(error.value)


def test_write_rejects_what_the_format_cannot_hold(tmp_path):
  with pytest.raises(ValueError):
    conll.write_bio(tmp_path / "x.tsv", [Sentence(["a\tb"], ["O"])])
  with pytest.raises(ValueError):
    conll.write_bio(tmp_path / "x.tsv", [Sentence([], [])])
  assert not (tmp_path / "x.tsv").exists()  # atomic: nothing left behind
  with pytest.raises(ValueError):
    Sentence(["a", "b"], ["O"])


def test_load_bio_dir_requires_every_split_and_accepts_devel_alias(tmp_path):
  conll.write_bio(tmp_path / "train.tsv", _sentences())
  with pytest.raises(UserError, match="missing dev.tsv, test.tsv"):
    conll.load_bio_dir(tmp_path)
  conll.write_bio(tmp_path / "devel.tsv", _sentences()[:1])
  conll.write_bio(tmp_path / "test.tsv", _sentences()[1:])
  splits = conll.load_bio_dir(tmp_path)
  assert list(splits) == ["train", "dev", "test"]
  assert splits["dev"] == _sentences()[:1] and splits["test"] == _sentences()[1:]
  (tmp_path / "test.tsv").write_text("\n\n", encoding="utf-8")
  with pytest.raises(UserError, match="test.tsv contain"):
    conll.load_bio_dir(tmp_path)
  with pytest.raises(UserError, match="not a directory"):
    conll.load_bio_dir(tmp_path / "nope")


def test_label_list_helpers(tmp_path):
  labels = conll.bio_label_list(["problem", "treatment"])
  assert labels == ["B-problem", "I-problem", "B-treatment", "I-treatment", "O"]
  conll.write_label_list(tmp_path / "labels.txt", labels)
  assert conll.read_label_list(tmp_path / "labels.txt") == labels
  (tmp_path / "dup.txt").write_text("O\nB-X\nO\n", encoding="utf-8")
  with pytest.raises(UserError, match="duplicate labels 'O'"):
    conll.read_label_list(tmp_path / "dup.txt")
  counts = conll.split_counts({"train": _sentences()})
  assert counts["train"]["sentences"] == 3 and counts["train"]["words"] == 9
  assert counts["train"]["labels"]["O"] == 6 and sum(counts["train"]["labels"].values()) == 9


def test_reads_public_ncbi_disease_with_the_sizes_its_source_documents():
  splits = conll.load_bio_dir(NCBI_DIR)  # devel.tsv stands in for dev.tsv
  # SOURCE.md: train 5,432 sentences / 136,086 tokens; devel 923 / 23,969; test 940 / 24,497.
  assert [(len(s), sum(map(len, s))) for s in splits.values()] == [(5432, 136086), (923, 23969), (940, 24497)]
  conll.validate_labels(splits["train"], ["O", "B-Disease", "I-Disease"])
