"""Sentence splitting of note sections: a fast clinical rule-based splitter, or scispaCy when it is installed.

ClinicalBERT ran scispaCy `en_core_sci_md` 0.1.0 (spaCy 2.0.18) on every section, with two extra boundary rules and
with de-identification placeholders merged into single tokens (clinicalbert-paper.md §4.1, §4.4). That model's
boundaries cannot be reproduced on a modern stack, and spaCy is slow and heavy for ~2M notes, so the default here is a
small deterministic rule splitter that keeps what matters for BERT pretraining data:

* a sentence ends at `.`, `!` or `?` (optionally followed by `)`, `]`, quotes) when whitespace and a token starting
  with a capital letter, a digit or a placeholder follow;
* abbreviations do not end sentences (`Dr.`, `p.o.`, `b.i.d.`, `e.g.`, `vs.`, `mg.`, initials), nor do decimals
  (`2.5`) or list numbers at the start of a line (`1. Aspirin`);
* newlines are ordinary spaces inside a section (the section splitter already cut at blank lines, headings and list
  items), and every line break is written as a space, as the original did;
* the original's two rules, applied on this splitter's tokens, for each token i except the last two: a `.` token
  followed by a title-case token starts a sentence (this catches `word.Word` without a space), and a `-` token
  followed by any token other than `-` starts a sentence (list dashes and ` - ` separators);
* a match of the original placeholder regex `\\[\\*\\*.{0,15}.*?\\*\\*\\]` (quirk included: two placeholders on one
  line can form a single match) is one token, so no sentence ever breaks inside it.

Tokens: placeholder matches; letter-dot sequences (`b.i.d.`); words that may contain decimals, times and inner
hyphens or slashes (`2.5`, `10:30`, `WBC-8.8`, `2101-10-20`, `s/p`); runs of `-`; runs of `.`/`!`/`?`; any other
single character. Unlike spaCy, inner hyphens stay inside words, so rule 2 does not fire inside dates or ranges.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Callable, Sequence

from clinical_bert_jax.errors import UserError

SENTENCE_SPLITTERS: tuple[str, ...] = ("rules", "scispacy")
SplitFn = Callable[[str], list[str]]

# The original `fix_deid_tokens` pattern, applied case-insensitively per section.
DEID_PLACEHOLDER = re.compile(r"\[\*\*.{0,15}.*?\*\*\]", re.IGNORECASE)

_TOKEN = re.compile(
  rf"(?P<placeholder>{DEID_PLACEHOLDER.pattern})"
  r"|(?P<dotted>(?:[^\W\d_]\.){2,})"
  r"|(?P<word>\w+(?:[.,:]\d+)*(?:[-/'’&+]\w+(?:[.,:]\d+)*)*)"
  r"|(?P<dashes>-+)"
  r"|(?P<stops>[.!?]+)"
  r"|(?P<other>\S)",
  re.IGNORECASE,
)

# Lower-cased words that keep their period: titles, Latin, units and dose forms, months.
ABBREVIATIONS = frozenset(
  (
    "dr",
    "mr",
    "mrs",
    "ms",
    "prof",
    "sr",
    "jr",
    "st",
    "vs",
    "approx",
    "appt",
    "dept",
    "mg",
    "mcg",
    "ml",
    "kg",
    "cm",
    "mm",
    "gm",
    "meq",
    "mmol",
    "tab",
    "tabs",
    "cap",
    "caps",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
  )
)
# Abbreviations only when a number follows (`No. 2`), since `no.` also ends sentences ("denies pain. No.").
ABBREVIATIONS_BEFORE_NUMBERS = frozenset(("no", "nos", "fig", "ext", "ref"))

_CLOSERS = frozenset(")]}\"'’”")
_OPENERS = frozenset("([{\"'‘“")
# Line breaks as Python's str.splitlines() knows them: all become spaces so one sentence is one line for any reader.
_LINE_BREAKS_TO_SPACES = str.maketrans({c: " " for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class _Tokens:
  """A section's tokens as parallel lists (per-token objects made the splitter several times slower)."""

  def __init__(self, section: str) -> None:
    self.texts: list[str] = []
    self.starts: list[int] = []
    self.ends: list[int] = []
    self.kinds: list[str] = []  # placeholder | dotted | word | dashes | stops | other | abbreviation
    for match in _TOKEN.finditer(section):
      text, kind = match.group(), match.lastgroup
      start, end = match.span()
      if (
        text == "."
        and self.kinds
        and self.kinds[-1] == "word"
        and self.ends[-1] == start
        and self._keeps_period(section, end)
      ):
        self.texts[-1] += "."
        self.ends[-1] = end
        self.kinds[-1] = "abbreviation"
        continue
      self.texts.append(text)
      self.starts.append(start)
      self.ends.append(end)
      self.kinds.append(kind)

  def _keeps_period(self, section: str, period_end: int) -> bool:
    """Whether a `.` glued to the last word belongs to it (abbreviation, initial, list number)."""
    word = self.texts[-1]
    lowered = word.lower()
    if lowered in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
      return True
    if lowered in ABBREVIATIONS_BEFORE_NUMBERS:
      return section[period_end : period_end + 16].lstrip()[:1].isdigit()
    if word.isdigit():  # a list number only at the start of a line: `1. Aspirin`, not `... at 10. Then`
      return len(self.texts) == 1 or "\n" in section[self.ends[-2] : self.starts[-1]]
    return False

  def can_start_sentence(self, j: int) -> bool:
    first = self.texts[j][0]
    if self.kinds[j] == "placeholder" or first.isupper() or first.isdigit():
      return True
    return (
      first in _OPENERS
      and j + 1 < len(self.texts)
      and self.starts[j + 1] == self.ends[j]
      and (self.texts[j + 1][0].isupper() or self.texts[j + 1][0].isdigit())
    )

  def sentence_starts(self) -> list[int]:
    """Indices of the tokens that start a sentence (beyond the first)."""
    texts, starts, ends, kinds = self.texts, self.starts, self.ends, self.kinds
    count = len(texts)
    result = set()
    for i, text in enumerate(texts):
      if kinds[i] == "stops":
        j = i + 1
        while j < count and texts[j] in _CLOSERS and starts[j] == ends[j - 1]:
          j += 1
        if j < count and starts[j] > ends[j - 1] and self.can_start_sentence(j):
          result.add(j)
      # The original's custom rules look at every token except the last two.
      if i < count - 2:
        if text == "." and kinds[i + 1] != "placeholder" and texts[i + 1].istitle():
          result.add(i + 1)
        if text == "-" and texts[i + 1] != "-":
          result.add(i + 1)
    return sorted(result)


def split_sentences(section: str) -> list[str]:
  """Splits one section into sentences, each on one line (line breaks become spaces); no empty sentences."""
  tokens = _Tokens(section)
  if not tokens.texts:
    return []
  bounds = [0, *tokens.sentence_starts(), len(tokens.texts)]
  return [
    section[tokens.starts[a] : tokens.ends[b - 1]].translate(_LINE_BREAKS_TO_SPACES) for a, b in zip(bounds, bounds[1:])
  ]


class ScispacySentenceSplitter:
  """scispaCy sentences with the original's custom rules before the parser and placeholders kept whole.

  Placeholders are enforced after parsing by removing any boundary that falls inside a placeholder match, which is
  what the original's token merge achieved. Needs spaCy 3, scispaCy and the `en_core_sci_md` model.
  """

  MODEL = "en_core_sci_md"
  COMPONENT = "clinicalbert_boundary_rules"

  def __init__(self) -> None:
    check_sentence_splitter("scispacy")
    import spacy
    from spacy.language import Language

    if not Language.has_factory(self.COMPONENT):
      Language.component(self.COMPONENT, func=_original_boundary_rules)
    self._nlp = spacy.load(self.MODEL, exclude=["tagger", "ner"])
    self._nlp.add_pipe(self.COMPONENT, before="parser")

  def __call__(self, section: str) -> list[str]:
    if not section.strip():
      return []
    doc = self._nlp(section)
    inside = [(m.start(), m.end()) for m in DEID_PLACEHOLDER.finditer(section)]
    starts = [sent.start_char for sent in doc.sents if not any(begin < sent.start_char < end for begin, end in inside)]
    ends = starts[1:] + [len(section)]
    sentences = (section[a:b].strip().translate(_LINE_BREAKS_TO_SPACES) for a, b in zip(starts, ends))
    return [sentence for sentence in sentences if sentence]


def _original_boundary_rules(doc):
  """The original `sbd_component`: `.` + title-case token and `-` + non-`-` token start sentences."""
  for i, token in enumerate(doc[:-2]):
    if token.text == "." and doc[i + 1].is_title:
      doc[i + 1].is_sent_start = True
    if token.text == "-" and doc[i + 1].text != "-":
      doc[i + 1].is_sent_start = True
  return doc


def check_sentence_splitter(name: str, flag: str = "--sentence_splitter") -> None:
  """Fails with a one-line `UserError` when `name` is unknown or its optional packages are missing."""
  if name not in SENTENCE_SPLITTERS:
    raise UserError(f"{flag}={name} is not a sentence splitter; choose one of {', '.join(SENTENCE_SPLITTERS)}")
  if name == "scispacy":
    missing = [
      package
      for package in ("spacy", "scispacy", ScispacySentenceSplitter.MODEL)
      if importlib.util.find_spec(package) is None
    ]
    if missing:
      raise UserError(
        f"{flag}=scispacy needs {', '.join(missing)} (not installed): run `pip install scispacy` and "
        f"install the {ScispacySentenceSplitter.MODEL} model package from the scispaCy release archives, "
        f"or use {flag}=rules (the default)"
      )


def make_sentence_splitter(name: str) -> SplitFn:
  """Returns a function `section -> sentences` for `name` in SENTENCE_SPLITTERS."""
  check_sentence_splitter(name)
  if name == "scispacy":
    return ScispacySentenceSplitter()
  return split_sentences


def split_all(sections: Sequence[str], splitter: SplitFn) -> list[str]:
  """Sentences of consecutive sections; sections never share a sentence."""
  return [sentence for section in sections for sentence in splitter(section)]
