"""MIMIC notes (NOTEEVENTS / MIMIC-IV-Note CSV) -> one-sentence-per-line text shards for BERT pretraining.

    python -m data_prep.format_mimic --input=NOTEEVENTS.csv.gz --output_dir=DIR \\
        [--categories="Discharge summary,Nursing"|all] [--source=auto|mimic3|mimic4] [--num_workers=N] \\
        [--keep_iserror] [--section_bugs=original|fixed] [--sentence_splitter=rules|scispacy] \\
        [--shard_size_notes=N] [--overwrite]

This replaces ClinicalBERT's `format_mimic_for_BERT.py`: every note is cut into sections by the original heuristic
rules (`data_prep.sections`), each section into sentences (`data_prep.sentences`), and written in Google's
`create_pretraining_data` input format (one sentence per line, a blank line after each note), one file series per
category (`DIR/<stem>-00000.txt`; values outside MIMIC's categories that `--categories` did not name go to
`DIR/other-00000.txt` and are never written out, since a malformed row can slide note text into that column), with
`DIR/manifest.json` accounting for every row. Unlike the original, which
loaded the whole table with pandas, the CSV is streamed and the formatting runs in `--num_workers` processes with a
bounded number of chunks in flight, so memory does not grow with the file.

`iter_notes` is the shared reader (the TFDS builder uses it too). It never puts note text in errors or logs: rows
are identified by their ROW_ID / note_id and the line where they start.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import gzip
import io
import json
import re
import zlib
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Sequence

from absl import flags, logging

from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.fileio import atomic_output_dir, local_copy
from data_prep import sections, sentences, workers

SOURCES = ("auto", "mimic3", "mimic4")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "clinical_bert_jax.format_mimic/1"
DEFAULT_SHARD_SIZE_NOTES = 100_000
# Why rows are not written; the manifest lists every reason, zeros included.
SKIP_REASONS = ("category_filtered", "iserror", "empty_text", "section_splitter_error", "no_sentences")

# ClinicalBERT's 15 category files (clinicalbert-paper.md §3); keys are stripped, case-folded CATEGORY values.
CATEGORY_STEMS = {
  "discharge summary": "discharge_summary",
  "physician": "physician",
  "nursing": "nursing",
  "nursing/other": "nursing_other",
  "radiology": "radiology",
  "general": "general",
  "respiratory": "respiratory",
  "consult": "consult",
  "nutrition": "nutrition",
  "case management": "case_management",
  "pharmacy": "pharmacy",
  "rehab services": "rehab_services",
  "social work": "social_work",
  "ecg": "ecg",
  "echo": "echo",
}
# Notes whose CATEGORY is none of those (nor a --categories name) go here: such a value may be note text that slid into
# the column of a malformed row, so it never becomes a file name or a manifest key; the manifest only counts them.
OTHER_STEM = "other"
UNLISTED_CATEGORY = "(values outside MIMIC's categories, not shown)"
# MIMIC-IV-Note note_type codes: discharge summaries, radiology reports and radiology addenda.
MIMIC4_NOTE_TYPES = {"DS": "Discharge summary", "RR": "Radiology", "AR": "Radiology"}

# Required columns (lower case; headers are matched case-insensitively).
_MIMIC3_COLUMNS = ("row_id", "category", "text")
_MIMIC4_COLUMNS = ("note_id", "note_type", "text")
# Invalid UTF-8 bytes arrive as lone surrogates (errors="surrogateescape"), one per byte, so they can be counted.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]")
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_ ]{0,39}")
_CATEGORY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9 /&_.-]{0,39}")
_ISERROR_TRUE = frozenset(("1", "1.0"))
# Long notes exceed csv's default 128 KiB field limit; a cap still stops an unclosed quote from reading a whole file.
_MAX_FIELD_CHARS = 16 * 1024 * 1024
_CHUNK_NOTES = 128
_CHUNK_CHARS = 1_000_000


@dataclasses.dataclass(frozen=True)
class Note:
  """One note: `row_id` (ROW_ID or note_id), stripped `category`, `text`, `line_number` where its CSV row starts."""

  row_id: str
  category: str
  text: str
  line_number: int


@dataclasses.dataclass
class NoteStats:
  """What `iter_notes` saw: rows read, notes yielded, rows skipped by reason, invalid UTF-8 replaced."""

  source: str = ""
  rows: int = 0
  notes: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  categories_seen: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  invalid_utf8_bytes_replaced: int = 0
  notes_with_invalid_utf8: int = 0


def category_stem(category: str) -> str:
  """File stem of a category: ClinicalBERT's names for the MIMIC-III ones, snake_case for anything else."""
  key = category.strip().casefold()
  if key in CATEGORY_STEMS:
    return CATEGORY_STEMS[key]
  return re.sub(r"[^0-9a-z]+", "_", key).strip("_") or "uncategorized"


def output_category(category: str, requested: bool) -> tuple[str, str]:
  """(file stem, name in the manifest) of a note's category: its own for MIMIC's categories and for values a
  --categories flag named (`requested`), `OTHER_STEM` and `UNLISTED_CATEGORY` for anything else."""
  if requested or category.strip().casefold() in CATEGORY_STEMS:
    return category_stem(category), category
  return OTHER_STEM, UNLISTED_CATEGORY


def parse_categories(value: str | None, flag: str = "--categories") -> list[str] | None:
  """`"all"`/empty -> None (no filter); otherwise the comma-separated names, stripped."""
  if value is None or value.strip().casefold() in ("", "all"):
    return None
  names = [name.strip() for name in value.split(",") if name.strip()]
  if not names:
    raise UserError(f"{flag}={value!r} names no category; pass names such as 'Discharge summary,Nursing' or all")
  return names


def _describe_columns(header: Sequence[str]) -> str:
  """The header's column names for an error message, without echoing anything that is not a column name."""
  names = [name.strip() for name in header]
  if all(_COLUMN_NAME.fullmatch(name) for name in names) and len(names) <= 30:
    return ", ".join(names) if names else "none"
  return f"{len(names)} fields that do not look like column names (is this a NOTEEVENTS CSV?)"


def _describe_categories(counts: collections.Counter) -> str:
  """MIMIC's category names with row counts, leaving out any other value: a malformed row can shift note text into
  the column, and text shaped like a name ("Chest pain improved") is still text."""
  shown = [
    (name, count)
    for name, count in counts.most_common()
    if _CATEGORY_NAME.fullmatch(name) and name.strip().casefold() in CATEGORY_STEMS
  ]
  described = ", ".join(f"{name!r} ({count})" for name, count in shown[:40])
  hidden = len(counts) - min(len(shown), 40)
  if not described:
    return f"{hidden} value(s) outside MIMIC's categories (not shown: they may be note text)"
  return described + (f" and {hidden} value(s) outside MIMIC's categories (not shown)" if hidden else "")


def _detect_source(path: Path, header: Sequence[str], source: str) -> tuple[str, dict[str, int]]:
  columns = {name.strip().lower(): index for index, name in enumerate(header)}
  if len(header) == 1:
    for delimiter, name in (("\t", "tab"), (";", "semicolon"), ("|", "pipe")):
      if delimiter in header[0]:
        raise UserError(
          f"{path}: the header is {name}-separated; MIMIC note files are comma-separated CSV "
          f"(convert it, e.g. re-export with ',' as the delimiter)"
        )
  if source == "auto":
    source = "mimic4" if {"note_id", "note_type"} <= columns.keys() else "mimic3"
  required = _MIMIC4_COLUMNS if source == "mimic4" else _MIMIC3_COLUMNS
  missing = [name for name in required if name not in columns]
  if missing:
    raise UserError(
      f"{path}: missing column(s) {', '.join(missing)} for --source={source} (MIMIC-III NOTEEVENTS needs "
      f"{', '.join(_MIMIC3_COLUMNS)}; MIMIC-IV-Note needs {', '.join(_MIMIC4_COLUMNS)}); columns found: "
      f"{_describe_columns(header)}"
    )
  return source, columns


def _open_text(path: Path) -> io.TextIOBase:
  """A text stream over a plain or gzip-compressed (detected by content) UTF-8 file; bad bytes stay countable."""
  if not path.is_file():
    raise UserError(f"--input={path} does not exist or is not a file")
  try:
    with path.open("rb") as probe:
      compressed = probe.read(2) == b"\x1f\x8b"
    binary = gzip.open(path, "rb") if compressed else path.open("rb")
  except OSError as error:
    raise UserError(f"--input={path}: cannot open it ({error.strerror})") from None
  return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _read_rows(reader, path: Path) -> Iterator[tuple[int, list[str]]]:
  """Yields (line where the row starts, fields), turning CSV and gzip failures into one-line errors."""
  previous_end = reader.line_num
  while True:
    try:
      row = next(reader)
    except StopIteration:
      return
    except csv.Error as error:
      raise UserError(
        f"{path}: malformed CSV in the row starting at line {previous_end + 1} ({error}); check for "
        f"an unclosed or stray double quote in that row"
      ) from None
    except (OSError, EOFError, zlib.error) as error:
      raise UserError(
        f"{path}: cannot read it near line {reader.line_num} ({type(error).__name__}: {error}); "
        f"the gzip file may be truncated or corrupt"
      ) from None
    start, previous_end = previous_end + 1, reader.line_num
    if row:  # csv yields [] for blank lines between records
      yield start, row


def _replace_invalid_utf8(text: str) -> tuple[str, int]:
  if text.isascii():
    return text, 0
  return _ESCAPED_BYTES.subn("\ufffd", text)


def _category_matcher(categories: Collection[str]):
  """Maps a note category to the requested name it matches (by name or stem, case-insensitively), or None."""
  wanted = {}
  for name in categories:
    wanted[name.strip().casefold()] = name
    wanted.setdefault(category_stem(name), name)

  def match(category: str) -> str | None:
    return wanted.get(category.casefold()) or wanted.get(category_stem(category))

  return match


def iter_notes(
  path: str | Path,
  source: str = "auto",
  categories: Collection[str] | str | None = None,
  keep_iserror: bool = False,
  stats: NoteStats | None = None,
) -> Iterator[Note]:
  """Streams the notes of a MIMIC-III NOTEEVENTS or MIMIC-IV-Note CSV (plain or gzip), in file order.

  Categories match after stripping, case-insensitively, by name (`"Physician"` matches `"Physician "`) or by stem
  (`"nursing_other"`); None means all. MIMIC-IV note_type codes become category names (`DS` -> `Discharge summary`,
  `RR`/`AR` -> `Radiology`). Skipped rows are counted in `stats.skipped`: `category_filtered`, `iserror` (ISERROR=1,
  unless `keep_iserror`), `empty_text` (empty or whitespace-only). CRLF/CR line breaks inside notes become LF, since
  the section rules look for "\\n". Invalid UTF-8 bytes become U+FFFD and are counted.

  Raises UserError for a missing file, bad header, malformed CSV (with the row's line), a file without rows, and
  requested categories that matched nothing (listing the categories found with their row counts).
  """
  path = Path(path)
  if source not in SOURCES:
    raise UserError(f"--source={source} is not supported; choose one of {', '.join(SOURCES)}")
  stats = stats if stats is not None else NoteStats()
  if isinstance(categories, str):  # "Nursing,ECG" or "all", as on the command line
    categories = parse_categories(categories)
  match = _category_matcher(categories) if categories is not None else None
  matched = set()
  csv.field_size_limit(max(csv.field_size_limit(), _MAX_FIELD_CHARS))
  with _open_text(path) as stream:
    reader = csv.reader(stream, strict=True)
    header = next((row for _, row in _read_rows(reader, path)), None)
    if header is None:
      raise UserError(f"--input={path} is empty; expected a CSV with a NOTEEVENTS or MIMIC-IV-Note header")
    stats.source, columns = _detect_source(path, header, source)
    mimic4 = stats.source == "mimic4"
    id_column = columns["note_id" if mimic4 else "row_id"]
    category_column = columns["note_type" if mimic4 else "category"]
    text_column = columns["text"]
    iserror_column = columns.get("iserror")
    for line_number, row in _read_rows(reader, path):
      stats.rows += 1
      if len(row) != len(header):
        raise UserError(
          f"{path}: the row starting at line {line_number} has {len(row)} fields but the header has "
          f"{len(header)}; check that row's quoting"
        )
      category, replaced_in_category = _replace_invalid_utf8(row[category_column].strip())
      if mimic4:
        category = MIMIC4_NOTE_TYPES.get(category.upper(), category)
      stats.categories_seen[category] += 1
      if match is not None:
        requested = match(category)
        if requested is None:
          stats.skipped["category_filtered"] += 1
          continue
        matched.add(requested)
      if iserror_column is not None and not keep_iserror and row[iserror_column].strip() in _ISERROR_TRUE:
        stats.skipped["iserror"] += 1
        continue
      text, replaced = _replace_invalid_utf8(row[text_column])
      if replaced or replaced_in_category:
        stats.invalid_utf8_bytes_replaced += replaced + replaced_in_category
        stats.notes_with_invalid_utf8 += 1
      if not text.strip():
        stats.skipped["empty_text"] += 1
        continue
      if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
      stats.notes += 1
      row_id, _ = _replace_invalid_utf8(row[id_column].strip())  # surrogates would break logging the id
      yield Note(row_id, category, text, line_number)
  if stats.rows == 0:
    raise UserError(
      f"--input={path} has a header but no note rows, so there are no notes to format (the public "
      f"MIMIC-III demo's NOTEEVENTS.csv is such a file); use the credentialed NOTEEVENTS.csv.gz or "
      f"the demo corpus in data_prep/demo_corpus/"
    )
  if categories is not None:
    unmatched = [name for name in categories if name not in matched]
    if unmatched:
      raise UserError(
        f"categories {', '.join(map(repr, unmatched))} matched no note in {path}; categories found "
        f"(rows): {_describe_categories(stats.categories_seen)}"
      )


@dataclasses.dataclass(frozen=True)
class FormatOptions:
  """How notes are cut: `section_bugs` in sections.SECTION_BUG_MODES, `sentence_splitter` in SENTENCE_SPLITTERS."""

  section_bugs: str = "original"
  sentence_splitter: str = "rules"


class NoteFormatter:
  """Note text -> the text block written for it (sentences, one per line, then a blank line), or None if dropped."""

  def __init__(self, options: FormatOptions) -> None:
    self._options = options
    self._split_sentences = sentences.make_sentence_splitter(options.sentence_splitter)

  def __call__(self, text: str) -> tuple[str | None, int]:
    """Returns (block, sentence count); block is None when the original section splitter would have failed."""
    try:
      note_sections = sections.split_sections(text, self._options.section_bugs)
    except sections.SectionSplitError:
      return None, 0
    note_sentences = sentences.split_all(note_sections, self._split_sentences)
    if not note_sentences:
      return "", 0
    return "\n".join(note_sentences) + "\n\n", len(note_sentences)


def _make_chunk_formatter(options: FormatOptions, report) -> Callable[[list[str]], list[tuple[str | None, int]]]:
  """A worker's state (see `workers.ordered_map`): one NoteFormatter, applied to each text of a chunk."""
  formatter = NoteFormatter(options)
  return lambda texts: [formatter(text) for text in texts]


def _chunks(notes: Iterable[Note]) -> Iterator[list[Note]]:
  """Groups notes into chunks of at most _CHUNK_NOTES notes or about _CHUNK_CHARS characters."""
  chunk, chars = [], 0
  for note in notes:
    chunk.append(note)
    chars += len(note.text)
    if len(chunk) >= _CHUNK_NOTES or chars >= _CHUNK_CHARS:
      yield chunk
      chunk, chars = [], 0
  if chunk:
    yield chunk


def _format_in_order(
  notes: Iterable[Note], options: FormatOptions, num_workers: int
) -> Iterator[tuple[Note, str | None, int]]:
  """(note, block, sentences) in input order, formatted in `num_workers` processes (`workers.ordered_map`).

  Notes go to the workers in chunks, at most two per worker in flight, so memory is bounded by the chunk size
  instead of the file size; a worker that dies is a one-line error instead of a hang.
  """
  chunks: collections.deque[list[Note]] = collections.deque()  # sent to the workers, not yet paired with results

  def texts_of_chunks() -> Iterator[list[str]]:
    for chunk in _chunks(notes):
      chunks.append(chunk)
      yield [note.text for note in chunk]

  for results in workers.ordered_map(
    functools.partial(_make_chunk_formatter, options),
    texts_of_chunks(),
    num_workers=num_workers,
    died_hint="lower --num_workers",
  ):
    for note, (block, count) in zip(chunks.popleft(), results):
      yield note, block, count


class _ShardWriter:
  """Appends note blocks to `DIR/<stem>-NNNNN.txt`, starting a new file every `shard_size_notes` notes."""

  def __init__(self, directory: Path, shard_size_notes: int) -> None:
    self._directory = directory
    self._shard_size_notes = shard_size_notes
    self._open: dict[str, io.TextIOBase] = {}
    self.summary: dict[str, dict] = {}

  def write(self, stem: str, category: str, block: str, sentence_count: int) -> None:
    entry = self.summary.setdefault(stem, {"categories": {}, "notes": 0, "sentences": 0, "bytes": 0, "shards": []})
    if entry["notes"] % self._shard_size_notes == 0:
      if stem in self._open:
        self._open.pop(stem).close()
      name = f"{stem}-{len(entry['shards']):05d}.txt"
      entry["shards"].append(name)
      self._open[stem] = (self._directory / name).open("w", encoding="utf-8", newline="")
    self._open[stem].write(block)
    entry["categories"][category] = entry["categories"].get(category, 0) + 1
    entry["notes"] += 1
    entry["sentences"] += sentence_count
    entry["bytes"] += len(block.encode("utf-8"))

  def close(self) -> None:
    for handle in self._open.values():
      handle.close()
    self._open.clear()


def format_notes(
  input_path: str | Path,
  output_dir: str | Path,
  *,
  categories: Sequence[str] | str | None = None,
  source: str = "auto",
  num_workers: int = 1,
  keep_iserror: bool = False,
  section_bugs: str = "original",
  sentence_splitter: str = "rules",
  shard_size_notes: int = DEFAULT_SHARD_SIZE_NOTES,
  overwrite: bool = False,
) -> dict:
  """Formats a notes CSV into `output_dir` (created atomically) and returns the manifest it wrote."""
  if isinstance(categories, str):
    categories = parse_categories(categories)
  if section_bugs not in sections.SECTION_BUG_MODES:
    raise UserError(
      f"--section_bugs={section_bugs} is not a mode; choose one of {', '.join(sections.SECTION_BUG_MODES)}"
    )
  sentences.check_sentence_splitter(sentence_splitter)
  if num_workers < 1 or shard_size_notes < 1:
    raise UserError(f"--num_workers={num_workers} and --shard_size_notes={shard_size_notes} must be at least 1")
  options = FormatOptions(section_bugs, sentence_splitter)
  stats = NoteStats()
  dropped = collections.Counter()
  input_path = local_copy(input_path, "--input")  # a gs:// notes file is read from a local copy
  with atomic_output_dir(output_dir, overwrite) as staging:
    writer = _ShardWriter(staging, shard_size_notes)
    try:
      notes = iter_notes(input_path, source, categories, keep_iserror, stats)
      for done, (note, block, count) in enumerate(_format_in_order(notes, options, num_workers), start=1):
        if block is None:
          dropped["section_splitter_error"] += 1
        elif not block:
          dropped["no_sentences"] += 1
        else:
          writer.write(*output_category(note.category, categories is not None), block, count)
        if done % 10_000 == 0:
          logging.info("formatted %d notes (last: row %s, line %d)", done, note.row_id, note.line_number)
    finally:
      writer.close()
    written = sum(entry["notes"] for entry in writer.summary.values())
    skipped = {reason: stats.skipped[reason] + dropped[reason] for reason in SKIP_REASONS}
    if written == 0:
      raise UserError(f"no notes written from {input_path}: {stats.rows} rows read, skipped {skipped}")
    manifest = {
      "format": MANIFEST_FORMAT,
      "input": str(input_path),
      "source": stats.source,
      "flags": {
        "categories": list(categories) if categories is not None else "all",
        "keep_iserror": keep_iserror,
        "section_bugs": section_bugs,
        "sentence_splitter": sentence_splitter,
        "shard_size_notes": shard_size_notes,
        "num_workers": num_workers,
      },
      "rows_read": stats.rows,
      "notes_written": written,
      "sentences": sum(entry["sentences"] for entry in writer.summary.values()),
      "bytes": sum(entry["bytes"] for entry in writer.summary.values()),
      "skipped": skipped,
      "invalid_utf8": {
        "bytes_replaced": stats.invalid_utf8_bytes_replaced,
        "notes_affected": stats.notes_with_invalid_utf8,
      },
      "categories": dict(sorted(writer.summary.items())),
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  return manifest


def _define_flags() -> None:
  """Defined only when run as a program, so that importing `iter_notes` adds no flags to another tool's CLI."""
  flags.DEFINE_string("input", None, "NOTEEVENTS.csv[.gz] (MIMIC-III) or discharge/radiology.csv[.gz] (MIMIC-IV).")
  flags.DEFINE_string("output_dir", None, "Directory for <category_stem>-NNNNN.txt shards and manifest.json.")
  flags.DEFINE_string("categories", "all", "Comma-separated category names or stems to keep, or 'all'.")
  flags.DEFINE_enum("source", "auto", SOURCES, "Input layout; auto detects it from the header.")
  flags.DEFINE_integer("num_workers", 1, "Processes that split notes into sections and sentences.", lower_bound=1)
  flags.DEFINE_bool("keep_iserror", False, "Keep rows with ISERROR=1 (ClinicalBERT kept them; default drops them).")
  flags.DEFINE_enum(
    "section_bugs",
    "original",
    sections.SECTION_BUG_MODES,
    "original reproduces the section splitter's two known bugs (paper parity); fixed repairs them.",
  )
  flags.DEFINE_enum(
    "sentence_splitter",
    "rules",
    sentences.SENTENCE_SPLITTERS,
    "rules: built-in clinical splitter; scispacy: needs spaCy + scispaCy + en_core_sci_md.",
  )
  flags.DEFINE_integer("shard_size_notes", DEFAULT_SHARD_SIZE_NOTES, "Notes per output file.", lower_bound=1)
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
  flags.mark_flags_as_required(["input", "output_dir"])


def main(argv: Sequence[str]) -> None:
  FLAGS = flags.FLAGS
  manifest = format_notes(
    FLAGS.input,
    FLAGS.output_dir,
    categories=parse_categories(FLAGS.categories),
    source=FLAGS.source,
    num_workers=FLAGS.num_workers,
    keep_iserror=FLAGS.keep_iserror,
    section_bugs=FLAGS.section_bugs,
    sentence_splitter=FLAGS.sentence_splitter,
    shard_size_notes=FLAGS.shard_size_notes,
    overwrite=FLAGS.overwrite,
  )
  logging.info(
    "wrote %d notes (%d sentences) to %s; skipped %s",
    manifest["notes_written"],
    manifest["sentences"],
    FLAGS.output_dir,
    manifest["skipped"],
  )


if __name__ == "__main__":
  _define_flags()
  run_absl(main)
