"""`results.md`: every `results.json` under an output folder as one table in the layout of the paper's Table 2.

Rows are models, columns MedNLI and i2b2 2006/2010/2012/2014 (plus one column per other BIO data set), cells the
test score of the configuration selected on dev (mean ± sample std over seeds, ×100). The paper's reported numbers
(clinicalbert-paper.md §8) are appended as reference rows, marked as such, so a reproduction can be read against them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from absl import logging

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.fileio import atomic_write

RESULTS_FILE = "results.json"
REPORT_FILE = "results.md"
RESULTS_FORMAT = "clinical_bert_jax.evaluate/1"
TASK_COLUMNS = {
  "mednli": "MedNLI",
  "i2b2_2006": "i2b2 2006",
  "i2b2_2010": "i2b2 2010",
  "i2b2_2012": "i2b2 2012",
  "i2b2_2014": "i2b2 2014",
}
# Paper Table 2 (MedNLI test accuracy %, i2b2 exact micro F1), as quoted in clinicalbert-paper.md §8.
PAPER_TABLE_2 = {
  "BERT (base, cased)": (77.6, 93.9, 83.5, 75.9, 92.8),
  "BioBERT": (80.8, 94.8, 86.5, 78.9, 93.0),
  "Clinical BERT": (80.8, 91.5, 86.4, 78.5, 92.6),
  "Discharge Summary BERT": (80.6, 91.9, 86.4, 78.4, 92.8),
  "Bio+Clinical BERT": (82.7, 94.7, 87.2, 78.9, 92.5),
  "Bio+Discharge Summary BERT": (82.7, 94.8, 87.8, 78.9, 92.7),
}


def column_name(result: dict[str, Any]) -> str:
  """The table column of a run: a paper task, or `bio: <data set>` for other BIO corpora."""
  return TASK_COLUMNS.get(result["task"], f"bio: {result['dataset']}")


def collect_results(root: Path) -> list[dict[str, Any]]:
  """All readable results.json files under `root` (ours only), oldest first so later runs win a shared cell."""
  results = []
  for path in sorted(root.rglob(RESULTS_FILE)):
    if any(part.startswith(".") for part in path.relative_to(root).parts):
      continue  # staging folders of runs in progress
    try:
      result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
      logging.warning("skipping %s: cannot be read as JSON (%s)", path, error)
      continue
    if not isinstance(result, dict) or result.get("format") != RESULTS_FORMAT:
      logging.warning("skipping %s: not written by clinical_bert_jax.evaluate", path)
      continue
    missing = [key for key in ("created", "model_name", "selected") if key not in result]
    if missing or not isinstance(result["selected"], dict):
      logging.warning("skipping %s: incomplete results (missing %s)", path, ", ".join(missing) or "selected")
      continue
    result["path"] = str(path.relative_to(root))
    results.append(result)
  return sorted(results, key=lambda result: result["created"])


def _cell(selected: dict[str, Any]) -> str:
  mean = 100 * selected["test_mean"]
  if len(selected["seeds"]) > 1:
    return f"{mean:.1f} ± {100 * selected['test_std']:.1f}"
  return f"{mean:.1f}"


def render(results: list[dict[str, Any]]) -> str:
  columns = list(TASK_COLUMNS.values())
  columns += sorted({column_name(result) for result in results} - set(columns))
  cells: dict[str, dict[str, str]] = {}
  for result in results:
    cells.setdefault(result["model_name"], {})[column_name(result)] = _cell(result["selected"])
  lines = [
    "# Downstream results (Table 2 layout)",
    "",
    "Test scores ×100 of the configuration selected on dev: MedNLI accuracy, NER exact-span micro F1 "
    "(mean ± sample std over seeds when there are several). Rows marked *[paper]* are the numbers reported in "
    "Alsentzer et al. (2019), Table 2, for reference; they are not produced here.",
    "",
    "| model | " + " | ".join(columns) + " |",
    "|---|" + "---|" * len(columns),
  ]
  for model, row in cells.items():
    lines.append(f"| {model} | " + " | ".join(row.get(column, "–") for column in columns) + " |")
  for model, scores in PAPER_TABLE_2.items():
    paper = dict(zip(TASK_COLUMNS.values(), (f"{score:.1f}" for score in scores)))
    lines.append(f"| {model} *[paper]* | " + " | ".join(paper.get(column, "–") for column in columns) + " |")
  lines += [
    "",
    "## Runs",
    "",
    "| model | task | data | selected lr / batch / epochs | seeds | dev (mean) | test | results |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for result in results:
    selected = result["selected"]
    lines.append(
      f"| {result['model_name']} | {result['task']} | {result['dataset']} | {selected['learning_rate']:g} / "
      f"{selected['train_batch_size']} / {selected['num_train_epochs']} | {len(selected['seeds'])} | "
      f"{100 * selected['dev_mean']:.1f} | {_cell(selected)} | `{result['path']}` |"
    )
  return "\n".join(lines) + "\n"


def write_report(root: str | Path) -> Path:
  """(Re)writes `root/results.md` from every results.json under `root`."""
  root = Path(root)
  if not root.is_dir():
    raise UserError(f"--output_dir={root} is not a directory; pass the folder your evaluations were written to")
  results = collect_results(root)
  if not results:
    raise UserError(
      f"--output_dir={root} holds no {RESULTS_FILE} from clinical_bert_jax.evaluate; run an evaluation into it first"
    )
  path = root / REPORT_FILE
  with atomic_write(path) as handle:
    handle.write(render(results))
  return path
