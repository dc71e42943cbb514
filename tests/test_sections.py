"""The original heuristic section splitter (clinicalbert-paper.md §4.2), its two bugs and their fixes."""

import pytest

from data_prep.sections import SectionSplitError, is_title, split_sections


@pytest.mark.parametrize(
  "text, expected",
  [
    ("History of Present Illness:", True),
    ("Past Medical History:", True),  # stop-words of/on/or may stay lower-case
    ("Labs (on admission):", True),  # parentheticals are ignored
    ("Medications on Admission:", True),
    ("Blood pressure:", False),
    ("Disp:", False),  # the dispense line of medication lists
    ("Discharge Diagnosis", False),  # no colon
    ("1. Aspirin:", False),
  ],
)
def test_is_title(text, expected):
  assert is_title(text) is expected


def test_rules_become_standalone_sections_and_blank_lines_separate():
  sections = split_sections("first part\n\n\n\nsecond part\n------------\nthird\n_____\nfourth")
  assert sections == ["first part", "second part", "-----", "third", "_____", "fourth"]


def test_first_line_headers_are_split_then_merged_with_their_values():
  text = (
    "Admission Date:  [**2150-1-2**]     Discharge Date:   [**2150-1-9**]\n\n"
    "Date of Birth:  [**2090-3-4**]     Sex:   F\n\nService: MEDICINE\n\nplain prose here"
  )
  opening = [
    "Admission Date: [**2150-1-2**]",
    "Discharge Date: [**2150-1-9**]",
    "Date of Birth: [**2090-3-4**]",
    "Sex: F",
    "Service:",
  ]
  # "MEDICINE" is a one-liner under a title followed by a non-title: bug 2 drops it.
  assert split_sections(text, "original") == opening + ["plain prose here"]
  assert split_sections(text, "fixed") == opening + ["MEDICINE", "plain prose here"]


def test_note_of_only_the_admission_line_fails_like_the_original_unless_fixed():
  text = "Admission Date: [**2150-1-2**] Discharge Date: [**2150-1-9**]"
  with pytest.raises(SectionSplitError):
    split_sections(text, "original")
  assert split_sections(text, "fixed") == ["Admission Date: [**2150-1-2**]", "Discharge Date: [**2150-1-9**]"]


def test_headers_split_segments_and_one_line_answers_are_merged():
  text = "Allergies:\nNKDA\nSocial History:\nLives alone.\nQuit smoking.\nChief Complaint:\ncough"
  assert split_sections(text) == [
    "Allergies: NKDA",
    "Social History:",
    "Lives alone.\nQuit smoking.",
    "Chief Complaint: cough",
  ]


def test_inline_titles_not_at_a_capital_start_a_new_segment():
  # " Reason:" starts with a space, so step 3 does not see it; step 6 (inline titles) does.
  text = "preamble line\n Reason: eval for edema\n Admitting Diagnosis: CHF\nmore text"
  assert split_sections(text) == ["preamble line", " Reason: eval for edema", " Admitting Diagnosis: CHF\nmore text"]


def test_numbered_list_under_a_title_loses_its_first_item_only_with_bug_2():
  text = "Discharge Medications:\n1. Aspirin 81 mg daily\n2. Lasix 40 mg daily\n3. Metoprolol 25 mg bid"
  items = ["1. Aspirin 81 mg daily", "2. Lasix 40 mg daily", "3. Metoprolol 25 mg bid"]
  assert split_sections(text, "original") == ["Discharge Medications:"] + items[1:]
  assert split_sections(text, "fixed") == ["Discharge Medications:"] + items


def test_bug_1_overcount_drops_the_note_in_original_mode():
  # "\n3 days" matches the unescaped pattern "\n\s*3." so three items are counted where there are two.
  text = "some prose\n1. Aspirin daily\n2. Lasix daily\n3 days of ciprofloxacin"
  with pytest.raises(SectionSplitError):
    split_sections(text, "original")
  assert split_sections(text, "fixed") == ["some prose", "1. Aspirin daily", "2. Lasix daily\n3 days of ciprofloxacin"]


def test_bug_1_overcount_makes_an_extra_split_when_a_later_number_exists():
  text = "1. Aspirin\n2. Lasix\n3 tablets left\n7. Insulin"
  assert split_sections(text, "original") == ["1. Aspirin", "2. Lasix\n3 tablets left", "7. Insulin"]
  assert split_sections(text, "fixed") == ["1. Aspirin", "2. Lasix\n3 tablets left\n7. Insulin"]


def test_same_sections_in_both_modes_when_no_bug_is_triggered():
  text = (
    "Brief Hospital Course:\nPatient improved.\nDischarged home.\n\nDischarge Condition:\nGood\n\n"
    "Followup Instructions:\nSee PCP in 1 week.\nCall with questions."
  )
  assert split_sections(text, "original") == split_sections(text, "fixed")


def test_unknown_bug_mode_is_rejected():
  with pytest.raises(ValueError, match="bugs must be one of"):
    split_sections("text", "sometimes")
