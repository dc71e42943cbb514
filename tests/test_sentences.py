"""The rule-based clinical sentence splitter, its placeholder guarantee and the scispaCy error path."""

import importlib.util
import random

import pytest

from clinical_bert_jax.errors import UserError
from data_prep.sentences import DEID_PLACEHOLDER, check_sentence_splitter, make_sentence_splitter, split_sentences


@pytest.mark.parametrize(
  "text",
  [
    "Seen by Dr. Smith in clinic.",
    "Take 1 tab p.o. b.i.d. With food.",
    "Avoid NSAIDs e.g. Ibuprofen or naproxen.",
    "Compare CT vs. MRI findings.",
    "Lasix 40 mg. Daily dosing.",
    "Creatinine rose to 2.5 from 1.1 today.",
    "1. Aspirin 81 mg daily",
    "Tube No. 2 placed.",
    "Seen by J. Smith today.",
  ],
)
def test_abbreviations_decimals_and_list_numbers_do_not_end_sentences(text):
  assert split_sentences(text) == [text]


@pytest.mark.parametrize(
  "text, expected",
  [
    ("Pt is stable. She will go home.", ["Pt is stable.", "She will go home."]),
    ("Fever? No. Cough! 3 days.", ["Fever?", "No.", "Cough!", "3 days."]),
    ("He left (AMA). Returned later.", ["He left (AMA).", "Returned later."]),
    ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
    ("She was at 10. Then left.", ["She was at 10.", "Then left."]),  # a number mid-line is no list item
    ("Stable. pain controlled.", ["Stable. pain controlled."]),  # lower-case after a period: same sentence
  ],
)
def test_sentence_final_punctuation_before_capital_or_digit_splits(text, expected):
  assert split_sentences(text) == expected


def test_lines_inside_a_section_are_joined_with_spaces():
  assert split_sentences("Lungs clear\nbilaterally. Heart\r\nregular\u2028rate.") == [
    "Lungs clear bilaterally.",
    "Heart  regular rate.",
  ]


def test_rule_1_period_then_title_case_token_even_without_space():
  assert split_sentences("Denies pain.Reports nausea today") == ["Denies pain.", "Reports nausea today"]
  # Like the original, the rule skips the last two tokens, so a title-case last token stays attached.
  assert split_sentences("Denies pain.Reports") == ["Denies pain.Reports"]


def test_rule_2_hyphen_token_starts_a_new_sentence():
  assert split_sentences("Vitals - T 98.6 - HR 80 regular") == ["Vitals -", "T 98.6 -", "HR 80 regular"]
  assert split_sentences("x-ray of well-appearing man on 2101-10-20 done") == [
    "x-ray of well-appearing man on 2101-10-20 done"
  ]  # inner hyphens belong to words
  assert split_sentences("range - - wide open") == ["range - -", "wide open"]  # no split before another "-"


def test_placeholder_is_never_split_and_the_regex_quirk_joins_two_on_one_line():
  assert split_sentences("Seen at [**Hospital1 18**]. Admitted on [**2101-10-20**] for care.") == [
    "Seen at [**Hospital1 18**]. Admitted on [**2101-10-20**] for care."
  ]
  assert split_sentences("Seen at [**Hospital1 18**]. Admitted today.") == [
    "Seen at [**Hospital1 18**].",
    "Admitted today.",
  ]
  assert split_sentences("Stable. [**Doctor Last Name 12**] - aware. Plan [**2101-1-2**]-[**2101-1-3**] x") == [
    "Stable.",
    "[**Doctor Last Name 12**] -",
    "aware.",
    "Plan [**2101-1-2**]-[**2101-1-3**] x",
  ]


def test_random_sections_keep_every_character_and_every_placeholder_whole():
  rng = random.Random(7)
  pieces = [
    "Pt",
    "stable.",
    "Dr.",
    "Smith",
    "-",
    "1.",
    "2.5",
    "mg.",
    "[**Hospital1 18**]",
    "[**2101-10-20**].",
    "on",
    "Home!",
    "?",
    "well-known",
    "\n",
    "(",
    ")",
    "--",
    "[**Name**]",
    "\u2029",
    "b.i.d.",
    "X.Y",
  ]
  for _ in range(300):
    section = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
    result = split_sentences(section)
    assert "".join("".join(result).split()) == "".join(section.split())
    assert all(sentence and sentence == sentence.strip() and len(sentence.splitlines()) == 1 for sentence in result)
    for match in DEID_PLACEHOLDER.finditer(section):
      flat = " ".join(match.group().split())
      assert any(flat in " ".join(sentence.split()) for sentence in result)


def test_empty_and_whitespace_sections_give_no_sentences():
  assert split_sentences("") == []
  assert split_sentences(" \n \t ") == []


@pytest.mark.skipif(importlib.util.find_spec("spacy") is not None, reason="spaCy is installed here")
def test_scispacy_without_spacy_is_a_clear_error():
  with pytest.raises(UserError, match=r"--sentence_splitter=scispacy needs spacy.*pip install scispacy"):
    make_sentence_splitter("scispacy")


def test_unknown_splitter_is_rejected():
  with pytest.raises(UserError, match="choose one of rules, scispacy"):
    check_sentence_splitter("nltk")
