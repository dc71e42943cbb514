"""Shape comments (nanoGPT / Flax examples: `x = ...  # [B, S, H]`) stay on the tensor lines of model.py and masking.py.

`ruff format` moves a trailing comment of a statement it splits onto the closing bracket's line, away from the
expression it describes; such code is rewritten (a named intermediate per line) instead.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ("clinical_bert_jax/model.py", "clinical_bert_jax/masking.py")
# An assignment (in a function) whose value is computed by jax.numpy / jax.random / jax.lax / jax.nn: a tensor line.
TENSOR_LINE = re.compile(r"^\s+[\w, \[\]]+ = .*\b(jnp|jax\.(random|lax|nn))\.")
NOT_TENSORS = ("jax.random.split(",)  # keys, not data


def _lines(relative: str) -> list[tuple[int, str]]:
  return list(enumerate((ROOT / relative).read_text(encoding="utf-8").splitlines(), start=1))


@pytest.mark.parametrize("relative", FILES)
def test_no_shape_comment_was_separated_from_its_line(relative):
  separated = [number for number, line in _lines(relative) if re.match(r"^\s*[)\]}]+,?\s*#", line)]
  assert separated == [], f"{relative}: a comment on a closing bracket's line (moved there by the formatter)"


@pytest.mark.parametrize("relative", FILES)
def test_tensor_lines_carry_a_shape_comment(relative):
  missing = [
    f"{number}: {line.strip()}"
    for number, line in _lines(relative)
    if TENSOR_LINE.match(line.split("  #")[0]) and "  # " not in line and not any(key in line for key in NOT_TENSORS)
  ]
  assert missing == []


def test_the_checks_see_a_missing_and_a_separated_comment():
  assert TENSOR_LINE.match("    hidden = jnp.tanh(x)")
  assert not TENSOR_LINE.match("    cfg = self.config")
  assert re.match(r"^\s*[)\]}]+,?\s*#", "  )  # [B, S]")
