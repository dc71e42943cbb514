"""Leaks (docs/reliability.md): note text never reaches what the tools write besides the training text itself.

A sentinel word is placed in notes — well-formed rows, an ISERROR row, a row whose text slid into the CATEGORY
column, a stray quote, a row with too many fields — and the real command-line tools run on them as a user runs them
(format_mimic, build_vocab, create_pretraining_data with two workers, pretrain with checkpoints, evaluation and
TensorBoard events), plus their failures: malformed CSVs, bad flags, SIGTERM mid-training. Then every byte they
wrote is searched for the sentinel (as written, lower-cased, upper-cased): stdout, stderr, absl log files
(`--log_dir`, `TEST_TMPDIR`), manifests, `metrics.jsonl`, TensorBoard events, `flags.txt`, checkpoint metadata and
arrays. Only the formatted text, the shards and the vocabulary hold note content by design, and are not searched.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.synthetic_notes import COLUMNS as NOTEEVENTS_COLUMNS
from test_pretrain import subprocess_env

pytestmark = pytest.mark.slow

SENTINEL = "Vexquarind"
HEADER = list(NOTEEVENTS_COLUMNS)  # MIMIC-III NOTEEVENTS.csv's columns, declared once
FILLER = (
  "The patient was seen on the ward. Vital signs were stable overnight. Pain was controlled with medication. "
  "The family was updated at the bedside. Labs showed a mild anemia. The plan is discharge tomorrow."
)


def _row(row_id: int, category: str, text: str, iserror: str = "") -> list:
  return [row_id, 100 + row_id, 1000 + row_id, "2150-01-01", "", "", category, "Report", "", iserror, text]


def _csv(rows: list[list]) -> bytes:
  buffer = io.StringIO(newline="")
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(HEADER)
  writer.writerows(rows)
  return buffer.getvalue().encode("utf-8")


def _wellformed_rows() -> list[list]:
  rows = []
  for index in range(24):
    category = ("Discharge summary", "Nursing", "Radiology")[index % 3]
    rows.append(
      _row(
        index + 1,
        category,
        f"Admitted for {SENTINEL} pain, case {index}.\n{FILLER}\nSeen by Dr {SENTINEL.lower()} today. {FILLER}",
      )
    )
  rows.append(_row(90, "Nursing", f"Erroneous note about {SENTINEL}.", iserror="1"))
  # Note text in the category column, as a row with an unquoted comma leaves it.
  rows.append(_row(91, f"{SENTINEL} pain improved", "Plan unchanged."))
  return rows


def _tool(module: str) -> list[str]:
  return [sys.executable, "-m", module]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, compile_cache):
  """Every run of the pipeline and its failures: {name: CompletedProcess}, and the root of all their outputs."""
  root = tmp_path_factory.mktemp("leaks")
  absl_dir, log_dir = root / "absl_tmp", root / "logs"
  absl_dir.mkdir()
  log_dir.mkdir()
  env = subprocess_env(compile_cache, TEST_TMPDIR=str(absl_dir))
  logging_flags = [f"--log_dir={log_dir}"]
  (root / "notes.csv").write_bytes(_csv(_wellformed_rows()))
  # Malformed files: a stray quote inside a field, a row with one field too many.
  good = _csv(_wellformed_rows()[:3])
  (root / "stray_quote.csv").write_bytes(good + f'95,1,1,x,,,Nursing,R,,,"bad"{SENTINEL} text\n'.encode())
  (root / "extra_field.csv").write_bytes(good + f'96,1,1,x,,,Nursing,R,,,"{SENTINEL} a","{SENTINEL} b"\n'.encode())
  results: dict[str, subprocess.CompletedProcess] = {}

  def run(name: str, command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    results[name] = subprocess.run(
      command + logging_flags, capture_output=True, text=True, env=env, cwd=root, timeout=timeout
    )
    return results[name]

  formatted, data = root / "formatted", root / "data"
  result = run(
    "format_mimic",
    _tool("data_prep.format_mimic") + [f"--input={root / 'notes.csv'}", f"--output_dir={formatted}", "--num_workers=2"],
  )
  assert result.returncode == 0, result.stderr[-3000:]
  for bad in ("stray_quote", "extra_field"):
    run(
      f"format_mimic {bad}",
      _tool("data_prep.format_mimic") + [f"--input={root / bad}.csv", f"--output_dir={root / bad}"],
    )
  run(
    "format_mimic unmatched category",
    _tool("data_prep.format_mimic")
    + [f"--input={root / 'notes.csv'}", f"--output_dir={root / 'z'}", "--categories=Echo"],
  )
  run(
    "format_mimic bad flag",
    _tool("data_prep.format_mimic")
    + [f"--input={root / 'notes.csv'}", f"--output_dir={root / 'x'}", "--num_workers=-3"],
  )
  result = run(
    "build_vocab",
    _tool("data_prep.build_vocab")
    + [
      f"--input={formatted}/*.txt",
      f"--output={root / 'vocab.txt'}",
      "--vocab_size=300",
      "--num_unused=0",
      "--min_frequency=1",
    ],
  )
  assert result.returncode == 0, result.stderr[-3000:]
  vocab_size = len((root / "vocab.txt").read_text(encoding="utf-8").splitlines())
  result = run(
    "create_pretraining_data",
    _tool("data_prep.create_pretraining_data")
    + [
      f"--input={formatted}/*.txt",
      f"--vocab_file={root / 'vocab.txt'}",
      f"--output_dir={data}",
      "--max_seq_length=32",
      "--max_predictions_per_seq=5",
      "--dupe_factor=4",
      "--num_workers=2",
    ],
  )
  assert result.returncode == 0, result.stderr[-3000:]
  run(
    "create_pretraining_data on a CSV",
    _tool("data_prep.create_pretraining_data")
    + [
      f"--input={root / 'stray_quote.csv'}",
      f"--vocab_file={root / 'vocab.txt'}",
      f"--output_dir={root / 'y'}",
      "--max_seq_length=1",
    ],
  )
  (root / "bert_config.json").write_text(
    json.dumps(
      {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
        "hidden_act": "gelu",
      }
    )
  )
  pretrain_flags = [
    f"--input_file={data}",
    f"--eval_input_file={data}",
    f"--bert_config_file={root}/bert_config.json",
    f"--vocab_file={root / 'vocab.txt'}",
    "--max_seq_length=32",
    "--max_predictions_per_seq=5",
    "--train_batch_size=4",
    "--num_warmup_steps=1",
    "--learning_rate=1e-3",
    "--eval_batch_size=4",
    "--max_eval_steps=2",
    "--log_every_steps=2",
    "--seed=3",
  ]
  result = run(
    "pretrain",
    _tool("clinical_bert_jax.pretrain")
    + pretrain_flags
    + [f"--output_dir={root / 'work'}", "--num_train_steps=6", "--save_checkpoints_steps=3", "--eval_every_steps=3"],
  )
  assert result.returncode == 0, result.stderr[-3000:]
  run(
    "pretrain bad flag",
    _tool("clinical_bert_jax.pretrain")
    + pretrain_flags
    + [f"--output_dir={root / 'work_bad'}", "--num_train_steps=6", "--learning_rate=-1"],
  )
  # A byte flipped in a shard: refused at start.
  shutil.copytree(data, root / "data_flipped")
  shard = sorted((root / "data_flipped").glob("*.cbj"))[0]
  damaged = bytearray(shard.read_bytes())
  damaged[len(damaged) // 2] ^= 0xFF
  shard.write_bytes(bytes(damaged))
  run(
    "pretrain flipped shard",
    _tool("clinical_bert_jax.pretrain")
    + [flag.replace(f"={data}", f"={root / 'data_flipped'}") for flag in pretrain_flags]
    + [f"--output_dir={root / 'work_flipped'}", "--num_train_steps=6"],
  )
  # SIGTERM mid-training, once the first metrics are written.
  term_dir = root / "work_term"
  process = subprocess.Popen(
    _tool("clinical_bert_jax.pretrain")
    + pretrain_flags
    + logging_flags
    + [f"--output_dir={term_dir}", "--num_train_steps=100000", "--save_checkpoints_steps=50"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
    cwd=root,
  )
  deadline = time.monotonic() + 300
  while not (term_dir / "metrics.jsonl").exists() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  results["pretrain SIGTERM"] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
  return root, results


# Written on purpose from the notes' text: the training text, its shards and the vocabulary learnt from it.
def _holds_text_by_design(path: Path, root: Path) -> bool:
  relative = path.relative_to(root)
  return (
    relative.parts[0] == "formatted"
    and path.suffix == ".txt"
    or path.suffix in (".cbj", ".tfrecord", ".csv")
    or path.name == "vocab.txt"
  )


def _needles() -> list[bytes]:
  return [form.encode() for form in {SENTINEL, SENTINEL.lower(), SENTINEL.upper()}]


def test_the_runs_did_what_they_should(runs):
  _, results = runs
  for name in (
    "format_mimic stray_quote",
    "format_mimic extra_field",
    "format_mimic unmatched category",
    "format_mimic bad flag",
    "create_pretraining_data on a CSV",
    "pretrain bad flag",
    "pretrain flipped shard",
  ):
    result = results[name]
    assert result.returncode == 2 and "Traceback" not in result.stderr, (name, result.stderr[-2000:])
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1, name
  term = results["pretrain SIGTERM"]
  assert term.returncode == 0 and "received SIGTERM" in term.stdout + term.stderr, term.stderr[-2000:]


def test_no_sentinel_in_stdout_or_stderr(runs):
  _, results = runs
  leaks = [
    (name, stream)
    for name, result in results.items()
    for stream in ("stdout", "stderr")
    for needle in _needles()
    if needle.decode() in getattr(result, stream)
  ]
  assert leaks == []


def test_no_sentinel_in_any_file_written_besides_the_text(runs):
  root, _ = runs
  files = [path for path in sorted(root.rglob("*")) if path.is_file() and not _holds_text_by_design(path, root)]
  kinds = {path.name for path in files}
  # What is searched really exists: manifests, metrics, events, flags, checkpoint metadata.
  assert "manifest.json" in kinds and "metrics.jsonl" in kinds and "_CHECKPOINT_METADATA" in kinds
  assert any(name.startswith("events.out.tfevents") for name in kinds)
  leaks = [str(path.relative_to(root)) for path in files for needle in _needles() if needle in path.read_bytes()]
  assert leaks == []


def test_the_sentinel_really_is_in_the_training_text(runs):
  """The search above could not pass by the text never reaching the tools."""
  root, _ = runs
  text = "".join(path.read_text(encoding="utf-8") for path in sorted((root / "formatted").glob("*.txt")))
  assert SENTINEL in text
