"""Insert synthetic canary sentences into pretraining text, to measure memorisation (Carlini et al. 2019).

    python -m data_prep.canaries --input_dir=TEXT_DIR --output_dir=TEXT_WITH_CANARIES \\
        --canary_file=OUTSIDE/canaries.jsonl [--repetitions=0,1,4,16,64] [--canaries_per_count=4] \\
        [--template="{name} (MRN {secret}) was diagnosed with {condition} ."] [--secret_digits=6] [--seed=0]

Reads the sentence files of `data_prep.format_mimic` (Google's text format: one sentence per line, a blank line
after each document; `*.txt` under --input_dir, with or without its manifest.json) and writes a copy to --output_dir
in which each canary — the template filled with a fake name, a fake record number (the secret: `--secret_digits`
random digits) and a condition — is inserted as its own line into `r` different documents, `r` taken from
--repetitions (0: the canary is made but never inserted, the baseline an audit compares against). Documents and
positions are chosen from --seed; the same inputs and flags give byte-identical outputs.

The canary list (ids, secrets, repetition counts, file:line of every copy) goes to --canary_file, which must lie
outside both text directories so it can never be fed to `create_pretraining_data` by a glob. It is what
`python -m clinical_bert_jax.audit exposure` reads. Canaries are synthetic, but the notes around them are not: nothing
here prints sentence text. Outputs are atomic (the directory and the canary file appear complete or not at all).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import flags, logging

from clinical_bert_jax.canary_file import CANARY_FORMAT, read_canary_file  # noqa: F401 (re-exported)
from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.fileio import atomic_output_dir, atomic_write

MANIFEST_NAME = "manifest.json"
DEFAULT_TEMPLATE = "{name} (MRN {secret}) was diagnosed with {condition} ."
DEFAULT_REPETITIONS = (0, 1, 4, 16, 64)
SLOTS = ("name", "secret", "condition")
# Invented names (no real person intended) and common conditions; combined at random.
FIRST_NAMES = (
  "Arlen",
  "Brisa",
  "Corwin",
  "Delphine",
  "Emrys",
  "Fenna",
  "Galen",
  "Hesper",
  "Ilsa",
  "Jorund",
  "Kestrel",
  "Liora",
  "Maelis",
  "Nerys",
  "Orrin",
  "Perrin",
  "Quilla",
  "Rowan",
  "Sabine",
  "Tamsin",
)
LAST_NAMES = (
  "Abernathy",
  "Brightwater",
  "Castellane",
  "Dunmore",
  "Everhart",
  "Fairbourne",
  "Grisham",
  "Hollowell",
  "Ingleby",
  "Jessup",
  "Kincaid",
  "Lockridge",
  "Marchbank",
  "Northcote",
  "Oakhurst",
  "Pendergast",
  "Quennell",
  "Ravensworth",
  "Stanhope",
  "Thistlewood",
)
CONDITIONS = (
  "pneumonia",
  "sepsis",
  "diabetes",
  "hypertension",
  "asthma",
  "cirrhosis",
  "pancreatitis",
  "anemia",
  "hepatitis",
  "epilepsy",
  "lymphoma",
  "melanoma",
  "tuberculosis",
  "gout",
  "psoriasis",
  "endocarditis",
)


def parse_template(template: str) -> list[str]:
  """The template's slot names; UserError unless it has exactly one {secret} and only known slots."""
  try:
    fields = [field for _, field, spec, conversion in string.Formatter().parse(template) if field is not None]
  except ValueError as error:
    raise UserError(
      f"--template is not a valid format string ({error}); use {{name}}, {{secret}}, {{condition}}"
    ) from None
  unknown = sorted(set(fields) - set(SLOTS))
  if unknown:
    raise UserError(
      f"--template has unknown slot(s) {', '.join('{' + f + '}' for f in unknown)}; use only "
      f"{', '.join('{' + s + '}' for s in SLOTS)}"
    )
  if fields.count("secret") != 1:
    raise UserError(
      f"--template must contain the secret slot {{secret}} exactly once (found {fields.count('secret')});"
      " the secret is what the exposure audit ranks"
    )
  return fields


def fill(template: str, name: str, secret: str, condition: str) -> str:
  return template.format(name=name, secret=secret, condition=condition)


def parse_repetitions(value: str) -> list[int]:
  try:
    counts = [int(part) for part in value.split(",") if part.strip()]
  except ValueError:
    raise UserError(f"--repetitions={value!r} must be comma-separated integers, e.g. 0,1,4,16,64") from None
  if not counts or any(count < 0 for count in counts):
    raise UserError(f"--repetitions={value!r} must list at least one count, each >= 0")
  return counts


def _inside(path: Path, directory: Path) -> bool:
  path, directory = path.resolve(), directory.resolve()
  return path == directory or directory in path.parents


def _read_documents(files: list[Path]) -> list[list[list[str]]]:
  """Per file, its documents as lists of lines (blank lines separate documents)."""
  result = []
  for path in files:
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
      raise UserError(f"{path} is not UTF-8 text (byte {error.start}); pass format_mimic's output") from None
    except OSError as error:
      raise UserError(f"cannot read {path} ({error.strerror})") from None
    documents, current = [], []
    for line in text.splitlines():
      if line.strip():
        current.append(line)
      elif current:
        documents.append(current)
        current = []
    if current:
      documents.append(current)
    result.append(documents)
  return result


def make_canaries(
  repetitions: Sequence[int], per_count: int, template: str, secret_digits: int, rng: np.random.Generator
) -> list[dict]:
  """Distinct (name, secret) canaries, `per_count` per repetition count."""
  canaries, used_names, used_secrets = [], set(), set()
  for count in repetitions:
    for _ in range(per_count):
      while True:
        name = f"{FIRST_NAMES[rng.integers(len(FIRST_NAMES))]} {LAST_NAMES[rng.integers(len(LAST_NAMES))]}"
        secret = "".join(str(d) for d in rng.integers(0, 10, secret_digits))
        if name not in used_names and secret not in used_secrets:
          break
      used_names.add(name)
      used_secrets.add(secret)
      condition = CONDITIONS[rng.integers(len(CONDITIONS))]
      canaries.append(
        {
          "id": f"canary-{len(canaries):04d}",
          "repetitions": int(count),
          "name": name,
          "secret": secret,
          "condition": condition,
          "text": fill(template, name, secret, condition),
        }
      )
  return canaries


def insert_canaries(
  input_dir: str | Path,
  output_dir: str | Path,
  canary_file: str | Path,
  *,
  repetitions: Sequence[int] = DEFAULT_REPETITIONS,
  canaries_per_count: int = 4,
  template: str = DEFAULT_TEMPLATE,
  secret_digits: int = 6,
  seed: int = 0,
  overwrite: bool = False,
) -> dict:
  """Writes the text with canaries to `output_dir` and the canary list to `canary_file`; returns a summary."""
  parse_template(template)
  input_dir, output_dir, canary_file = Path(input_dir), Path(output_dir), Path(canary_file)
  if not input_dir.is_dir():
    raise UserError(f"--input_dir={input_dir} is not a directory; pass format_mimic's --output_dir")
  if _inside(output_dir, input_dir) or _inside(input_dir, output_dir):
    raise UserError(f"--output_dir={output_dir} overlaps --input_dir={input_dir}; write the canaried text elsewhere")
  for directory, flag in ((input_dir, "--input_dir"), (output_dir, "--output_dir")):
    if _inside(canary_file, directory):
      raise UserError(
        f"--canary_file={canary_file} is inside {flag}={directory}: the list of secrets must never "
        "enter the training text directory; put it elsewhere"
      )
  if canary_file.exists() and not overwrite:
    raise UserError(f"--canary_file={canary_file} exists; choose another path or pass --overwrite")
  if not 1 <= secret_digits <= 18:
    raise UserError(f"--secret_digits={secret_digits} must be between 1 and 18")
  if canaries_per_count < 1:
    raise UserError(f"--canaries_per_count={canaries_per_count} must be at least 1")
  files = sorted(input_dir.glob("*.txt"))
  if not files:
    raise UserError(f"--input_dir={input_dir} has no *.txt sentence files")
  documents = _read_documents(files)
  slots = [(f, d) for f, docs in enumerate(documents) for d in range(len(docs))]
  most = max(repetitions)
  if most > len(slots):
    raise UserError(
      f"--repetitions: a canary repeated {most} times needs {most} documents but --input_dir has "
      f"{len(slots)}; lower the count or add text"
    )
  rng = np.random.default_rng(seed)
  canaries = make_canaries(repetitions, canaries_per_count, template, secret_digits, rng)
  # Where each copy goes: distinct documents per canary; position inside the document at random.
  insertions: dict[tuple[int, int], list[tuple[int, str]]] = {}
  for index, canary in enumerate(canaries):
    chosen = rng.choice(len(slots), size=canary["repetitions"], replace=False) if canary["repetitions"] else []
    for slot in sorted(int(s) for s in chosen):
      file_index, doc_index = slots[slot]
      position = int(rng.integers(len(documents[file_index][doc_index]) + 1))
      insertions.setdefault((file_index, doc_index), []).append((position, index))
  for canary in canaries:
    canary["locations"] = []
  with atomic_output_dir(output_dir, overwrite) as staging:
    for file_index, path in enumerate(files):
      lines_out: list[str] = []
      for doc_index, lines in enumerate(documents[file_index]):
        todo = sorted(insertions.get((file_index, doc_index), []), key=lambda item: (item[0], item[1]))
        merged, cursor = [], 0
        for position, canary_index in todo:
          merged.extend(lines[cursor:position])
          cursor = position
          canaries[canary_index]["locations"].append([path.name, len(lines_out) + len(merged) + 1])
          merged.append(canaries[canary_index]["text"])
        merged.extend(lines[cursor:])
        lines_out.extend(merged)
        lines_out.append("")
      (staging / path.name).write_text("\n".join(lines_out) + ("\n" if lines_out else ""), encoding="utf-8")
    manifest = {}
    if (input_dir / MANIFEST_NAME).is_file():
      manifest = json.loads((input_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest["canaries"] = {
      "format": CANARY_FORMAT,
      "count": len(canaries),
      "inserted_lines": sum(len(c["locations"]) for c in canaries),
      "seed": seed,
      "repetitions": list(repetitions),
      "note": "the canary list is kept outside this directory",
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    header = {
      "format": CANARY_FORMAT,
      "template": template,
      "secret_digits": secret_digits,
      "seed": seed,
      "source_dir": str(input_dir),
      "text_dir": str(output_dir),
    }
    with atomic_write(canary_file) as handle:
      handle.write(json.dumps({"header": header}) + "\n")
      for canary in canaries:
        handle.write(json.dumps(canary) + "\n")
  return {"canaries": len(canaries), "inserted_lines": manifest["canaries"]["inserted_lines"], "files": len(files)}


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("input_dir", None, "format_mimic output: *.txt sentence files (one sentence per line).")
  flags.DEFINE_string("output_dir", None, "Where the copy with canaries is written (a new or empty directory).")
  flags.DEFINE_string("canary_file", None, "The canary list (JSON lines), outside both text directories.")
  flags.DEFINE_string(
    "repetitions",
    ",".join(map(str, DEFAULT_REPETITIONS)),
    "How many documents each canary group is inserted into (0: made, never inserted).",
  )
  flags.DEFINE_integer("canaries_per_count", 4, "Canaries per repetition count.")
  flags.DEFINE_string(
    "template",
    DEFAULT_TEMPLATE,
    "Canary sentence with {secret} (once), optional {name} and "
    "{condition}; keep spaces or punctuation around {secret} so it tokenises on its own.",
  )
  flags.DEFINE_integer("secret_digits", 6, "Digits of the secret record number (candidate space 10^digits).")
  flags.DEFINE_integer("seed", 0, "Seed of names, secrets, documents and positions.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --output_dir and --canary_file.")
  flags.mark_flags_as_required(["input_dir", "output_dir", "canary_file"])


def main(argv: Sequence[str]) -> None:
  del argv
  summary = insert_canaries(
    FLAGS.input_dir,
    FLAGS.output_dir,
    FLAGS.canary_file,
    repetitions=parse_repetitions(FLAGS.repetitions),
    canaries_per_count=FLAGS.canaries_per_count,
    template=FLAGS.template,
    secret_digits=FLAGS.secret_digits,
    seed=FLAGS.seed,
    overwrite=FLAGS.overwrite,
  )
  logging.info(
    "inserted %d canaries (%d lines) into %d files", summary["canaries"], summary["inserted_lines"], summary["files"]
  )
  print(
    f"wrote {FLAGS.output_dir} ({summary['files']} files, {summary['inserted_lines']} canary lines) and "
    f"{FLAGS.canary_file} ({summary['canaries']} canaries)"
  )


if __name__ == "__main__":
  _define_flags()
  run_absl(main)
