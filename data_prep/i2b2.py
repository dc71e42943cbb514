"""i2b2 2006 / 2010 / 2012 / 2014 official releases → BIO CoNLL train/dev/test (ClinicalBERT's NER protocol).

    python -m data_prep.i2b2 --task=2010 --input_dir=RELEASE --output_dir=DIR [--train_subdir=A,B]
        [--test_subdir=C,D] [--seed=N] [--overwrite]

Writes DIR/{train,dev,test}.tsv (`data_prep.conll` format), DIR/labels.txt (the label list in the order of the
original `run_ner.py`) and DIR/conversion.json (counts, dev groups, tag repairs; never note text).

What a "sentence" and a "word" are follows the original converters (clinicalbert-paper.md §7.1): one line of the note
text is one sentence; words are its whitespace tokens, additionally cut where an annotated span starts or ends (the
original 2012/2014 notebooks label characters and then split span-sized chunks, which is what cuts `Smith's` into
`Smith` + `'s`; the 2006 date edge cases do the same). A word gets `B-` if it is the first word of its span, `I-`
otherwise (so a span continuing on the next line starts that sentence with `I-`). See docs/downstream-data.md for the
per-task details, the dev splits and every deviation from the original notebooks.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from absl import logging

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.fileio import atomic_output_dir
from data_prep import conll
from data_prep.conll import I2B2_ENTITY_TYPES, Sentence

TASKS = ("2006", "2010", "2012", "2014")

# Entity types in the order of the original `run_ner.py` label lists (which fixes the label ids).
ENTITY_TYPES = I2B2_ENTITY_TYPES  # one table, in clinical_bert_jax.bio_format (the NER evaluator reads it)

# Where the official releases keep their train and test data, relative to --input_dir. Each entry may be a file or a
# directory (searched recursively); an entry not found directly under --input_dir is looked for recursively.
DEFAULT_TRAIN = {
  "2006": ("deid_surrogate_train_all_version2.xml",),
  "2010": ("concept_assertion_relation_training_data",),
  "2012": ("2012-07-15.original-annotation.release",),
  "2014": ("training-PHI-Gold-Set1", "training-PHI-Gold-Set2"),
}
DEFAULT_TEST = {
  "2006": ("deid_surrogate_test_all_groundtruth_version2.xml",),
  "2010": ("test_data", "reference_standard_for_test_data"),
  "2012": ("2012-08-08.test-data.event-timex-groundtruth/xml",),
  "2014": ("testing-PHI-Gold-fixed",),
}
# 2010: the notebook's np.random.seed(1). 2012/2014: the notebooks permuted patients without a seed; we use 1 as well.
DEFAULT_SEED = 1
TRAIN_FRACTION_2006 = 0.7  # first 70% of the training sentences = train, the rest = dev (split_train_dev.py)
DEV_FRACTION = 0.1  # 2010/2012/2014: 10% of the records / patients

DEV_SPLIT_RULES = {
  "2006": "last 30% of the training sentences in file order (no shuffle)",
  "2010": "per source (partners, then beth), 10% of the records by np.random.RandomState(seed).permutation",
  "2012": "10% of the patients (one record each) by np.random.RandomState(seed).permutation",
  "2014": "10% of the patients (first 3 characters of the file name) by np.random.RandomState(seed).permutation",
}

# A tag whose text does not match the TEXT at its offsets is looked for this many characters to either side (the 2014
# training record 180-03 has offsets shifted by 4 after one line, which the original notebook patched by hand).
_REALIGN_WINDOW = 8
# Only all-upper or all-lower words are echoed in errors (i2b2 types look like DATE or problem); a capitalised word
# in a type field may be a name (PHI).
_TYPE_SHAPE = re.compile(r"[A-Z][A-Z_\-]{0,40}|[a-z][a-z_\-]{0,40}")
_CONCEPT_LINE = re.compile(r'c="(?P<text>.*)" (?P<l1>\d+):(?P<w1>\d+) (?P<l2>\d+):(?P<w2>\d+)\|\|t="(?P<type>[^"]*)"')
_PHI_TAG = re.compile(rb'<PHI\b[^>]*>|</PHI\s*>')


def label_list(task: str) -> list[str]:
  """`B-T, I-T` per entity type in the original order, then `O`."""
  return conll.bio_label_list(ENTITY_TYPES[task])


def _describe_type(value: str) -> str:
  return repr(value) if _TYPE_SHAPE.fullmatch(value) else "<a value that is not type-shaped>"


@dataclasses.dataclass(frozen=True)
class Span:
  """A labelled character range `[start, end)` of a note text."""

  start: int
  end: int
  entity_type: str


@dataclasses.dataclass
class Document:
  """One converted note. `group` is the unit the dev split draws (record or patient); `source` is 2010's hospital."""

  name: str
  group: str
  sentences: list[Sentence]
  source: str = ""


@dataclasses.dataclass
class TagReport:
  """What happened to the annotations; written to conversion.json (identifiers only, never text)."""

  tags: int = 0
  skipped_empty_type: int = 0
  skipped_empty_span: int = 0
  realigned: list[str] = dataclasses.field(default_factory=list)
  text_mismatch: list[str] = dataclasses.field(default_factory=list)
  repaired_phi_tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Conversion:
  task: str
  splits: dict[str, list[Sentence]]
  labels: list[str]
  report: dict


# ---------------------------------------------------------------------------------------------------------------------
# Labelling: character spans → words and BIO labels.


def label_text(text: str, spans: Sequence[Span], strip_separator_after_span: bool = False) -> list[Sentence]:
  """One Sentence per non-empty line of `text`; words are whitespace tokens cut at span boundaries.

  Later spans overwrite earlier ones where they overlap (as in the original notebooks). With
  `strip_separator_after_span` (2006), an unlabelled piece glued to the end of a span loses one leading `/` or `-`:
  `<PHI>01/01</PHI>/1995` gives `01/01` B-DATE and `1995` O, the original's date edge case.
  """
  owner_array = np.full(len(text), -1, dtype=np.int32)
  for index, span in enumerate(spans):
    owner_array[span.start : span.end] = index
  owner = owner_array.tolist()  # per-character reads below are much faster on a list
  seen: set[int] = set()
  sentences = []
  line_start = 0
  for line in text.split("\n"):
    words, labels = [], []
    position, length = 0, len(line)
    while position < length:
      if line[position].isspace():
        position += 1
        continue
      token_end = position
      while token_end < length and not line[token_end].isspace():
        token_end += 1
      previous_owner = -1
      while position < token_end:
        piece_owner = owner[line_start + position]
        piece_end = position
        while piece_end < token_end and owner[line_start + piece_end] == piece_owner:
          piece_end += 1
        piece = line[position:piece_end]
        if piece_owner < 0:
          if strip_separator_after_span and previous_owner >= 0 and piece[0] in "/-":
            piece = piece[1:]
          if piece:
            words.append(piece)
            labels.append("O")
        else:
          words.append(piece)
          labels.append(("I-" if piece_owner in seen else "B-") + spans[piece_owner].entity_type)
          seen.add(piece_owner)
        previous_owner = piece_owner
        position = piece_end
    if words:
      sentences.append(Sentence(words, labels))
    line_start += len(line) + 1
  return sentences


# ---------------------------------------------------------------------------------------------------------------------
# Finding the release files.


def _resolve_entries(input_dir: Path, entries: Sequence[str], flag: str) -> list[Path]:
  """Each entry: `input_dir/entry` if it exists, else the unique path under input_dir that ends with `entry`."""
  resolved = []
  for entry in entries:
    direct = input_dir / entry
    if direct.exists():
      resolved.append(direct)
      continue
    tail = Path(entry).parts
    matches = sorted(path for path in input_dir.rglob(tail[-1]) if path.parts[-len(tail) :] == tail)
    if len(matches) != 1:
      found = "not found" if not matches else f"ambiguous ({len(matches)} matches, e.g. {matches[0]}, {matches[1]})"
      raise UserError(
        f"{flag}: '{entry}' {found} under --input_dir={input_dir} (searched recursively); pass "
        f"{flag}=PATH[,PATH] relative to --input_dir (files or directories)"
      )
    resolved.append(matches[0])
  return resolved


def _collect(roots: Iterable[Path], suffixes: tuple[str, ...], flag: str) -> list[Path]:
  """The files named by `roots`: a file as is, a directory searched recursively for the task's suffixes."""
  files: list[Path] = []
  for root in roots:
    found = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file())
    if not found:
      raise UserError(f"{flag}: no {'/'.join(suffixes)} files under {root}; point {flag} at the directory holding them")
    files.extend(found)
  return files


def _natural_key(name: str) -> tuple:
  """Sorts `2` before `10` (the original iterated integer patient numbers)."""
  return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def _read_text(path: Path) -> str:
  try:
    with open(path, encoding="utf-8", newline=None) as handle:  # universal newlines, like the original readlines()
      return handle.read()
  except UnicodeDecodeError as error:
    raise UserError(f"{path}: not valid UTF-8 (byte {error.start}); re-encode the file as UTF-8") from None


def _parse_xml(path: Path, data: bytes | None = None) -> ElementTree.Element:
  try:
    return ElementTree.fromstring(data) if data is not None else ElementTree.parse(path).getroot()
  except ElementTree.ParseError as error:
    # ParseError text is "<reason>: line L, column C": positions only, no document content.
    raise UserError(f"{path}: not well-formed XML ({error}); is this the official release file?") from None


# ---------------------------------------------------------------------------------------------------------------------
# 2006: inline <PHI TYPE="..."> tags.


def _repair_nested_phi(data: bytes, path: Path, report: TagReport) -> bytes:
  """Turns an opening PHI tag met while another PHI is open into the missing `</PHI>`.

  PHI elements never nest in the 2006 schema; the official training file contains one such typo (a `<PHI TYPE=...>`
  written where `</PHI>` was meant), which makes the file unparsable. The BigBio loader patches the same spot.
  """
  pieces, last, inside = [], 0, False
  for match in _PHI_TAG.finditer(data):
    closing = match.group().startswith(b"</")
    if not closing and inside:
      pieces += [data[last : match.start()], b"</PHI>"]
      last = match.end()
      line_number = data.count(b"\n", 0, match.start()) + 1
      report.repaired_phi_tags.append(f"{path.name}:{line_number}")
      logging.warning("%s:%d: opening PHI tag inside an open PHI; treated as its closing tag", path, line_number)
    inside = not closing and not inside
  return b"".join(pieces + [data[last:]]) if pieces else data


def _record_text_and_spans(record: ElementTree.Element, path: Path, record_id: str) -> tuple[str, list[Span]]:
  text_elements = record.findall("TEXT")
  if len(text_elements) != 1:
    raise UserError(f"{path}: RECORD {record_id} has {len(text_elements)} TEXT elements, expected 1")
  text_element = text_elements[0]
  parts, spans, length = [text_element.text or ""], [], len(text_element.text or "")
  for child in text_element:
    phi_type = child.get("TYPE")
    if child.tag != "PHI" or phi_type is None or len(child):
      raise UserError(
        f"{path}: RECORD {record_id} has a <{child.tag}> element in its TEXT that is not a flat <PHI TYPE=...> tag"
      )
    if phi_type not in ENTITY_TYPES["2006"]:
      raise UserError(
        f"{path}: RECORD {record_id} has PHI TYPE {_describe_type(phi_type)}, not one of the 2006 "
        f"types {', '.join(ENTITY_TYPES['2006'])}"
      )
    content = child.text or ""
    spans.append(Span(length, length + len(content), phi_type))
    parts += [content, child.tail or ""]
    length += len(content) + len(child.tail or "")
  return "".join(parts), spans


def _read_2006(path: Path, report: TagReport) -> list[Document]:
  root = _parse_xml(path, _repair_nested_phi(path.read_bytes(), path, report))
  records = root.findall("RECORD")
  if not records:
    raise UserError(f"{path}: no <RECORD> elements; expected the i2b2 2006 <ROOT><RECORD ID=..><TEXT> layout")
  documents = []
  for number, record in enumerate(records):
    record_id = record.get("ID", f"#{number}")
    text, spans = _record_text_and_spans(record, path, record_id)
    report.tags += len(spans)
    sentences = label_text(text, [s for s in spans if s.end > s.start], strip_separator_after_span=True)
    report.skipped_empty_span += sum(s.end == s.start for s in spans)
    documents.append(Document(f"{path.name}#{record_id}", record_id, sentences))
  return documents


def _convert_2006(
  train_files: list[Path], test_files: list[Path], seed: int, report: TagReport
) -> tuple[dict[str, list[Document]], dict]:
  del seed  # the 2006 split does not shuffle
  train_documents = [d for path in train_files for d in _read_2006(path, report)]
  test_documents = [d for path in test_files for d in _read_2006(path, report)]
  test_tags = sum(1 for d in test_documents for s in d.sentences for label in s.labels if label != "O")
  if not test_tags:
    raise UserError(
      f"--test_subdir: {', '.join(map(str, test_files))} contain(s) no PHI tags; use the ground-truth "
      "test file (deid_surrogate_test_all_groundtruth_version2.xml), not the unannotated one"
    )
  sentences = [s for d in train_documents for s in d.sentences]
  cut = int(TRAIN_FRACTION_2006 * len(sentences))
  splits = {
    "train": [Document("train", "", sentences[:cut])],
    "dev": [Document("dev", "", sentences[cut:])],
    "test": test_documents,
  }
  return splits, {
    "records": {"train_release": len(train_documents), "test_release": len(test_documents)},
    "dev_groups": None,
  }


# ---------------------------------------------------------------------------------------------------------------------
# 2010: .txt (one sentence per line, words separated by spaces) + .con concept lines.


def _source_of(path: Path, container_names: tuple[str, ...]) -> str:
  """`beth/txt/record-1.txt` → `beth`: the directory above the txt/ or concept/ folder (else the parent)."""
  parent = path.parent
  return (parent.parent if parent.name in container_names else parent).name


def _pair_2010(files: list[Path], flag: str) -> list[tuple[Path, Path]]:
  """(record.txt, record.con) pairs matched by file stem; .txt files without a .con (READMEs) are skipped."""
  texts: dict[str, list[Path]] = {}
  concepts: dict[str, Path] = {}
  for path in files:
    if path.suffix == ".txt":
      texts.setdefault(path.stem, []).append(path)
    elif path.stem in concepts:
      raise UserError(f"{flag}: two .con files for record '{path.stem}': {concepts[path.stem]} and {path}")
    else:
      concepts[path.stem] = path
  if not concepts:
    raise UserError(
      f"{flag}: no .con concept files found; point {flag} at the directories holding the .txt and .con files"
    )
  for stem, path in concepts.items():
    if len(texts.get(stem, [])) != 1:
      problem = "no matching .txt" if stem not in texts else f"{len(texts[stem])} matching .txt files"
      raise UserError(
        f"{flag}: {path} has {problem}; {flag} must include the directory holding each record's text exactly once"
      )
  unannotated = sorted(set(texts) - set(concepts))
  if unannotated:
    logging.warning(
      "%s: %d .txt file(s) without a .con file are ignored (e.g. %s)", flag, len(unannotated), texts[unannotated[0]][0]
    )
  return [(texts[stem][0], concepts[stem]) for stem in sorted(concepts)]


def _read_2010(text_path: Path, concept_path: Path, report: TagReport) -> Document:
  raw_lines = _read_text(text_path).split("\n")
  # Words as the notebook split them: strip, split on single spaces, drop empty tokens. A line that starts with a space
  # is indexed one word to the right in the .con files (the notebook's `p_modifier`).
  line_words = [[w for w in line.strip().split(" ") if w.strip()] for line in raw_lines]
  shifts = [-1 if line.startswith(" ") else 0 for line in raw_lines]
  for number, words in enumerate(line_words, start=1):
    if any(c in word for word in words for c in "\t\r"):
      raise UserError(f"{text_path}:{number}: a tab inside a word; 2010 texts separate words by single spaces")
  owner = [[-1] * len(words) for words in line_words]
  concept_types = []
  for number, line in enumerate(_read_text(concept_path).split("\n"), start=1):
    if not line.strip():
      continue
    match = _CONCEPT_LINE.fullmatch(line.strip())
    if not match:
      raise UserError(f'{concept_path}:{number}: not a concept line of the form c="..." L:W L:W||t="type"')
    where = f"{concept_path}:{number}"
    concept_type = match["type"]
    if concept_type not in ENTITY_TYPES["2010"]:
      raise UserError(
        f"{where}: concept type {_describe_type(concept_type)} is not one of {', '.join(ENTITY_TYPES['2010'])}"
      )
    (l1, w1), (l2, w2) = (int(match["l1"]), int(match["w1"])), (int(match["l2"]), int(match["w2"]))
    if not 1 <= l1 <= l2 <= len(line_words) or (l1 == l2 and w1 > w2):
      raise UserError(
        f"{where}: concept lines {l1}-{l2} are outside {text_path.name} ({len(line_words)} lines) or reversed"
      )
    first, last = w1 + shifts[l1 - 1], w2 + shifts[l2 - 1]
    if not (0 <= first < len(line_words[l1 - 1]) and 0 <= last < len(line_words[l2 - 1])):
      raise UserError(f"{where}: concept word offsets {l1}:{w1} {l2}:{w2} are outside the words of {text_path.name}")
    if l1 == l2 and " ".join(line_words[l1 - 1][first : last + 1]).lower() != " ".join(match["text"].split()):
      raise UserError(
        f"{where}: the concept text does not match words {l1}:{w1}-{w2} of {text_path.name}; is the "
        ".con file paired with the right .txt?"
      )
    index = len(concept_types)
    concept_types.append(concept_type)
    for line_index in range(l1 - 1, l2):
      start = first if line_index == l1 - 1 else 0
      stop = last + 1 if line_index == l2 - 1 else len(line_words[line_index])
      owner[line_index][start:stop] = [index] * (stop - start)
  report.tags += len(concept_types)
  seen: set[int] = set()
  sentences = []
  for words, owners in zip(line_words, owner):
    if not words:
      continue
    labels = []
    for index in owners:
      labels.append("O" if index < 0 else ("I-" if index in seen else "B-") + concept_types[index])
      seen.add(index)
    sentences.append(Sentence(words, labels))
  return Document(text_path.name, text_path.stem, sentences, source=_source_of(text_path, ("txt",)))


def _permuted(items: list, rng: np.random.RandomState) -> list:
  return [items[i] for i in rng.permutation(len(items))]


def _convert_2010(
  train_files: list[Path], test_files: list[Path], seed: int, report: TagReport
) -> tuple[dict[str, list[Document]], dict]:
  train_documents = [_read_2010(t, c, report) for t, c in _pair_2010(train_files, "--train_subdir")]
  test_documents = [_read_2010(t, c, report) for t, c in _pair_2010(test_files, "--test_subdir")]
  rng = np.random.RandomState(seed)
  train, dev = [], []
  # The notebook split partners before beth; descending source names keep that order for the official layout.
  for source in sorted({d.source for d in train_documents}, reverse=True):
    documents = _permuted(sorted((d for d in train_documents if d.source == source), key=lambda d: d.group), rng)
    cut = int(0.9 * len(documents))
    train += documents[:cut]
    dev += documents[cut:]
  splits = {
    "train": _permuted(train, rng),
    "dev": _permuted(dev, rng),
    "test": _permuted(sorted(test_documents, key=lambda d: d.group), rng),
  }
  return splits, {
    "records": {"train_release": len(train_documents), "test_release": len(test_documents)},
    "dev_groups": sorted(d.group for d in dev),
  }


# ---------------------------------------------------------------------------------------------------------------------
# 2012 / 2014: <TEXT><![CDATA[...]]></TEXT> + <TAGS> with start/end character offsets.


def _normalized(text: str) -> str:
  return " ".join(html.unescape(text).split())


def _realign(text: str, start: int, end: int, expected: str) -> int | None:
  """The smallest shift (within the window) at which the TEXT matches the tag's own text, or None."""
  for delta in sorted(range(-_REALIGN_WINDOW, _REALIGN_WINDOW + 1), key=abs):
    if 0 <= start + delta and end + delta <= len(text) and _normalized(text[start + delta : end + delta]) == expected:
      return delta
  return None


def _int_attribute(tag: ElementTree.Element, name: str, path: Path, tag_id: str) -> int:
  value = tag.get(name)
  try:
    return int(value)  # type: ignore[arg-type]
  except (TypeError, ValueError):
    raise UserError(f"{path}: tag {tag_id} has no integer '{name}' attribute") from None


def _read_offset_xml(path: Path, task: str, report: TagReport) -> Document:
  root = _parse_xml(path)
  text_element, tags_element = root.find("TEXT"), root.find("TAGS")
  if text_element is None or tags_element is None:
    raise UserError(f"{path}: missing <TEXT> or <TAGS>; expected an i2b2 {task} annotation file")
  text = text_element.text or ""
  tags = tags_element.findall("EVENT") if task == "2012" else list(tags_element)
  type_attribute = "type" if task == "2012" else "TYPE"
  spans = []
  for tag in tags:
    tag_id = tag.get("id", "<no id>")
    report.tags += 1
    entity_type = tag.get(type_attribute)
    if entity_type is None:
      raise UserError(f"{path}: tag {tag_id} has no '{type_attribute}' attribute")
    if not entity_type.strip():
      report.skipped_empty_type += 1
      continue
    if entity_type not in ENTITY_TYPES[task]:
      raise UserError(
        f"{path}: tag {tag_id} has type {_describe_type(entity_type)}, not one of the i2b2 {task} types "
        f"{', '.join(ENTITY_TYPES[task])}"
      )
    start, end = _int_attribute(tag, "start", path, tag_id), _int_attribute(tag, "end", path, tag_id)
    if not 0 <= start <= end <= len(text):
      raise UserError(
        f"{path}: tag {tag_id} has offsets start={start} end={end} outside the TEXT (length "
        f"{len(text)}); fix or remove the tag"
      )
    if start == end:
      report.skipped_empty_span += 1
      continue
    expected = tag.get("text")
    if expected is not None and _normalized(text[start:end]) != _normalized(expected):
      delta = _realign(text, start, end, _normalized(expected))
      if delta is None:
        report.text_mismatch.append(f"{path.name}#{tag_id}")
      else:
        report.realigned.append(f"{path.name}#{tag_id}")
        start, end = start + delta, end + delta
    spans.append(Span(start, end, entity_type))
  group = path.stem if task == "2012" else path.name[:3]
  return Document(path.name, group, label_text(text, spans))


def _split_by_group(documents: list[Document], seed: int) -> tuple[list[Document], list[Document], list[str]]:
  groups = sorted({d.group for d in documents}, key=_natural_key)
  permuted = _permuted(groups, np.random.RandomState(seed))
  cut = int(len(groups) * (1 - DEV_FRACTION))

  def documents_of(chosen: list[str]) -> list[Document]:
    return [
      d
      for group in chosen
      for d in sorted((d for d in documents if d.group == group), key=lambda d: _natural_key(d.name))
    ]

  return documents_of(permuted[:cut]), documents_of(permuted[cut:]), sorted(permuted[cut:], key=_natural_key)


def _offset_converter(task: str) -> Callable:
  def convert(
    train_files: list[Path], test_files: list[Path], seed: int, report: TagReport
  ) -> tuple[dict[str, list[Document]], dict]:
    train_documents = [_read_offset_xml(path, task, report) for path in train_files]
    test_documents = sorted(
      (_read_offset_xml(path, task, report) for path in test_files),
      key=lambda d: (_natural_key(d.group), _natural_key(d.name)),
    )
    train, dev, dev_groups = _split_by_group(train_documents, seed)
    return {"train": train, "dev": dev, "test": test_documents}, {
      "records": {"train_release": len(train_documents), "test_release": len(test_documents)},
      "dev_groups": dev_groups,
    }

  return convert


_CONVERTERS = {
  "2006": _convert_2006,
  "2010": _convert_2010,
  "2012": _offset_converter("2012"),
  "2014": _offset_converter("2014"),
}
_SUFFIXES = {"2006": (".xml",), "2010": (".txt", ".con"), "2012": (".xml",), "2014": (".xml",)}


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points.


def convert_release(
  task: str,
  input_dir: str | Path,
  train_subdirs: Sequence[str] | None = None,
  test_subdirs: Sequence[str] | None = None,
  seed: int | None = None,
) -> Conversion:
  """Converts an official release directory into BIO splits (in memory); raises UserError for bad input."""
  if task not in TASKS:
    raise UserError(f"--task={task} is not one of {', '.join(TASKS)}")
  input_dir = Path(input_dir)
  if not input_dir.is_dir():
    raise UserError(f"--input_dir={input_dir} is not a directory; point it at the extracted i2b2 {task} release")
  seed = DEFAULT_SEED if seed is None else seed
  roots, files = {}, {}
  for split, flag, entries in (
    ("train", "--train_subdir", train_subdirs or DEFAULT_TRAIN[task]),
    ("test", "--test_subdir", test_subdirs or DEFAULT_TEST[task]),
  ):
    roots[split] = _resolve_entries(input_dir, entries, flag)
    files[split] = _collect(roots[split], _SUFFIXES[task], flag)
  report = TagReport()
  documents, details = _CONVERTERS[task](files["train"], files["test"], seed, report)
  splits = {split: [s for d in documents[split] for s in d.sentences] for split in conll.SPLITS}
  empty = [split for split, sentences in splits.items() if not sentences]
  if empty:
    raise UserError(
      f"--input_dir={input_dir}: the {', '.join(empty)} split(s) came out empty; the release holds too "
      "few records/patients for a 90/10 split or the wrong files were found (see --train_subdir)"
    )
  if report.realigned or report.text_mismatch:
    logging.warning(
      "%d tag(s) realigned to their text within %d characters and %d left where their text does not "
      "match; conversion.json lists them",
      len(report.realigned),
      _REALIGN_WINDOW,
      len(report.text_mismatch),
    )
  labels = label_list(task)
  return Conversion(
    task,
    splits,
    labels,
    {
      "task": task,
      "seed": None if task == "2006" else seed,
      "dev_split": DEV_SPLIT_RULES[task],
      "inputs": {
        split: [str(p.relative_to(input_dir)) if p.is_relative_to(input_dir) else str(p) for p in paths]
        for split, paths in roots.items()
      },
      "input_files": {split: len(paths) for split, paths in files.items()},
      **details,
      "splits": conll.split_counts(splits),
      "tags": dataclasses.asdict(report),
      "label_list": labels,
    },
  )


def write_conversion(conversion: Conversion, output_dir: str | Path, overwrite: bool = False) -> None:
  """DIR/{train,dev,test}.tsv, labels.txt and conversion.json, all or nothing."""
  with atomic_output_dir(output_dir, overwrite) as staging:
    for split, sentences in conversion.splits.items():
      conll.write_bio(staging / f"{split}.tsv", sentences)
    conll.write_label_list(staging / "labels.txt", conversion.labels)
    (staging / "conversion.json").write_text(json.dumps(conversion.report, indent=2) + "\n", encoding="utf-8")


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_enum("task", None, TASKS, "Which i2b2 challenge release to convert.")
  flags.DEFINE_string("input_dir", None, "The extracted official release (directory).")
  flags.DEFINE_string("output_dir", None, "Where to write train/dev/test.tsv, labels.txt, conversion.json.")
  flags.DEFINE_list(
    "train_subdir",
    None,
    "Training data: files or directories relative to --input_dir (searched "
    "recursively). Default: the official layout of --task (see docs/downstream-data.md).",
  )
  flags.DEFINE_list("test_subdir", None, "Test data, like --train_subdir.")
  flags.DEFINE_integer("seed", None, f"Seed of the record/patient dev split (2010/2012/2014; default {DEFAULT_SEED}).")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
  flags.mark_flags_as_required(["task", "input_dir", "output_dir"])


def main(argv: Sequence[str]) -> None:
  from absl import flags

  flag_values = flags.FLAGS
  if flag_values.task == "2006" and flag_values.seed is not None:
    logging.warning("--seed has no effect for --task=2006: its dev split is the last 30%% of the sentences")
  conversion = convert_release(
    flag_values.task, flag_values.input_dir, flag_values.train_subdir, flag_values.test_subdir, flag_values.seed
  )
  write_conversion(conversion, flag_values.output_dir, flag_values.overwrite)
  counts = conversion.report["splits"]
  logging.info(
    "i2b2 %s → %s: %s",
    conversion.task,
    flag_values.output_dir,
    ", ".join(f"{split} {c['sentences']} sentences" for split, c in counts.items()),
  )


if __name__ == "__main__":
  from clinical_bert_jax.errors import run_absl

  _define_flags()
  run_absl(main)
