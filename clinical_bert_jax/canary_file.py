"""The canary list format (`--canary_file`): written by `data_prep.canaries`, read by `clinical_bert_jax.audit`.

JSON lines: a header `{"header": {"format": CANARY_FORMAT, "template": ..., "secret_digits": ..., "seed": ...}}`,
then one canary per line (id, name, secret, condition, text, repetitions, where it was inserted). It lives on the
model side because the audit reads it, and `clinical_bert_jax` never imports `data_prep`.
"""

from __future__ import annotations

import json
from pathlib import Path

from clinical_bert_jax.errors import UserError

CANARY_FORMAT = "clinical_bert_jax.canaries/1"


def read_canary_file(path: str | Path) -> tuple[dict, list[dict]]:
  """(header, canaries) of a --canary_file; UserError for anything else."""
  path = Path(path)
  try:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  except FileNotFoundError:
    raise UserError(f"--canary_file={path} not found; write it with python -m data_prep.canaries") from None
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise UserError(f"--canary_file={path} is not a canary list (JSON lines) of data_prep.canaries") from None
  if not rows or "header" not in rows[0] or rows[0]["header"].get("format") != CANARY_FORMAT:
    raise UserError(f"--canary_file={path} has no {CANARY_FORMAT} header; write it with python -m data_prep.canaries")
  return rows[0]["header"], rows[1:]
