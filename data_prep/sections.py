"""The original ClinicalBERT section splitter, with its two known bugs switchable.

ClinicalBERT split every note into "sections" with Willie Boag's heuristic rules (clinicalBERT
`lm_pretraining/heuristic_tokenize.py`, `sent_tokenize_rules`) before sentence splitting. The sections decide where
sentences may start, so the pretraining text depends on them; `split_sections` re-implements those seven steps
(Alsentzer et al. 2019, §4.2; the original `heuristic_tokenize.py`) so that the corpus can be rebuilt comparably to
the paper.

Two bugs of the original are reproduced by default (`bugs="original"`) because the released models were trained on
their output (clinicalBERT issue #4):

1. the list-item counting pattern `\\n\\s*%d.` has an unescaped `.`, so lines such as `10 mg` or `3 days` count as
   list items; the splitting loop then runs out of items and the original raised, dropping the whole note. Here that
   case raises `SectionSplitError`, which the caller counts as "section_splitter_error".
2. in the one-liner merge a single-line segment under a title is silently dropped when the next segment is not a
   title (a numbered list under a heading loses its first item).

`bugs="fixed"` escapes the `.` and keeps the dropped segment; it also returns no sections instead of failing for a
note that consists of nothing but the `Admission Date: ... Discharge Date: ...` line (the original indexed past the
end of its segment list there).
"""

from __future__ import annotations

import re
from typing import Literal

SectionBugs = Literal["original", "fixed"]
SECTION_BUG_MODES: tuple[str, ...] = ("original", "fixed")

_LONG_DASHES = re.compile(r"---+")
_LONG_UNDERSCORES = re.compile(r"___+")
_BLANK_LINES = re.compile(r"\n\n+")
_ADMISSION_HEADER = re.compile(r"(Admission Date:) (.*) (Discharge Date:) (.*)")
_BIRTH_HEADER = re.compile(r"(Date of Birth:) (.*) (Sex:) (.*)")
# Header candidates are searched in "\n" + segment so that the first line counts as line-initial.
_HEADER_CANDIDATE = re.compile(r"\n([A-Z][^\n:]+:)")
_PARENTHETICAL = re.compile(r"(\([^\)]*?\))")
_INLINE_TITLE = re.compile(r"^([a-zA-Z ]+:) ")
_HAS_LIST_ITEM = re.compile(r"\n\s*\d+\.")
_FIRST_LIST_NUMBER = re.compile(r"\n\s*(\d+)\.")
_LIST_ITEM = re.compile(r"(\n\s*\d+\.)")
_TITLE_STOPWORDS = frozenset(("of", "on", "or"))


class SectionSplitError(ValueError):
  """The original splitter would have raised on this note (ClinicalBERT then dropped the note silently)."""


def is_title(text: str) -> bool:
  """The original title test: ends with `:`, words capitalised except of/on/or (parentheticals ignored), not `Disp:`."""
  if not text.endswith(":"):
    return False
  text = _PARENTHETICAL.sub("", text[:-1])
  for word in text.split():
    if word not in _TITLE_STOPWORDS and not word[0].isupper():
      return False
  # `Disp:` (dispense amount in medication lists) starts many lines but is not a heading.
  return text != "Disp"


def _is_inline_title(line: str) -> bool:
  match = _INLINE_TITLE.search(line)
  return bool(match) and is_title(match.group(1))


def _split_on_rules(text: str) -> list[str]:
  """Step 1: long `---`/`___` rules become their own segments; blank lines separate segments."""
  text = _LONG_DASHES.sub("\n\n-----\n\n", text)
  text = _LONG_UNDERSCORES.sub("\n\n_____\n\n", text)
  text = _BLANK_LINES.sub("\n\n", text)
  return text.split("\n\n")


def _split_first_line_headers(segments: list[str], bugs: SectionBugs) -> tuple[list[str], list[str]]:
  """Step 2: the two-headers-on-one-line openings of discharge summaries; returns (header parts, remaining)."""
  parts: list[str] = []
  for pattern in (_ADMISSION_HEADER, _BIRTH_HEADER):
    if not segments:
      if bugs == "original":
        raise SectionSplitError("no segment left after the Admission Date line")
      break
    # re.match: only the first line can match (`.` stops at newlines); the rest of that segment is not kept,
    # exactly as in the original.
    match = pattern.match(segments[0])
    if match:
      parts.extend(group.strip() for group in match.groups())
      segments = segments[1:]
  return parts, segments


def _split_headers(segment: str) -> list[str]:
  """Step 3: cut a segment before and after each line-initial title (`Past Medical History:`)."""
  pieces = []
  headers = [
    candidate.strip() for candidate in _HEADER_CANDIDATE.findall("\n" + segment) if is_title(candidate.strip())
  ]
  for header in headers:
    # The original cuts at the header's first occurrence, which may be earlier than the line it was found on.
    index = segment.index(header)
    prefix = segment[:index].strip()
    if prefix:
      pieces.append(prefix)
    pieces.append(header)
    segment = segment[index + len(header) :].strip()
  if segment:
    pieces.append(segment.strip())
  return pieces


def _split_on_delimiter(segments: list[str], delimiter: str) -> list[str]:
  """Step 4: a `\\n_____\\n` or `\\n-----\\n` inside a segment becomes a standalone segment."""
  result = []
  for segment in segments:
    first, *others = segment.split(f"\n{delimiter}\n")
    result.append(first)
    for other in others:
      result.extend((delimiter, other))
  return result


def _split_enumerated_list(segment: str, bugs: SectionBugs) -> list[str]:
  """Step 5: split a segment containing `<digits>.` lines before each counted list item."""
  if not _HAS_LIST_ITEM.search("\n" + segment):
    return [segment]
  segment = "\n" + segment
  start = int(_FIRST_LIST_NUMBER.search("\n" + segment).group(1))
  item_pattern = r"\n\s*%d\." if bugs == "fixed" else r"\n\s*%d."  # bug 1: the unescaped `.`
  last = start
  while re.search(item_pattern % last, segment):
    last += 1
  last -= 1
  if last < 1:  # e.g. `01.`: counted from 1, nothing matches; the original kept the "\n"-prefixed segment
    return [segment]
  pieces = []
  for _ in range(start, last + 1):
    match = _LIST_ITEM.search(segment)
    if match is None:
      # Only reachable through bug 1's over-count; the original failed here (`None.groups()`) and lost the note.
      raise SectionSplitError("enumerated list has fewer items than counted")
    prefix = segment[: match.start()].strip()
    segment = segment[match.start() :].strip()
    if prefix:
      pieces.append(prefix)
  if segment:
    pieces.append(segment)
  return pieces


def _split_inline_titles(segment: str) -> list[str]:
  """Step 6: a line opening with `Words: ` that passes the title test starts a new segment."""
  pieces = []
  buffer: list[str] = []
  for line in segment.split("\n"):
    if _is_inline_title(line):
      if buffer:
        pieces.append("\n".join(buffer))
      buffer = []
    buffer.append(line)
  if buffer:
    pieces.append("\n".join(buffer))
  return pieces


def _merge_one_liners(segments: list[str], bugs: SectionBugs) -> list[str]:
  """Step 7: `Title:` followed by a one-line answer becomes `Title: answer` (A A' B B' C -> AA' BB' C)."""
  merged: list[str] = []
  last = len(segments) - 1
  for i, segment in enumerate(segments):
    if i > 0 and "\n" not in segment and is_title(segments[i - 1]) and not is_title(segment):
      if i == last or is_title(segments[i + 1]):
        merged[-1] = f"{segments[i - 1]} {segment}"
      elif bugs == "fixed":
        merged.append(segment)
      # bugs == "original": the segment is dropped (bug 2).
    else:
      merged.append(segment)
  return merged


def split_sections(text: str, bugs: SectionBugs = "original") -> list[str]:
  """Splits one note into the original heuristic sections (in order; some may be empty strings).

  Raises `SectionSplitError` only with `bugs="original"`, where the original code raised and lost the note.
  """
  if bugs not in SECTION_BUG_MODES:
    raise ValueError(f"bugs must be one of {SECTION_BUG_MODES}, got {bugs!r}")
  header_parts, segments = _split_first_line_headers(_split_on_rules(text), bugs)
  segments = header_parts + [piece for segment in segments for piece in _split_headers(segment)]
  segments = _split_on_delimiter(segments, "_____")
  segments = _split_on_delimiter(segments, "-----")
  segments = [piece for segment in segments for piece in _split_enumerated_list(segment, bugs)]
  segments = [piece for segment in segments for piece in _split_inline_titles(segment)]
  return _merge_one_liners(segments, bugs)
