"""Running our command-line tools from tests, the way a user does (a subprocess), with the checks every bad-input
test shares: non-zero exit, exactly one `error:` line on stderr, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# XLA's LLVM backend at -O0, for every test process and child (tests/conftest.py says why).
XLA_TEST_FLAG = "--xla_backend_optimization_level=0"


def run_module(
  module: str, *args: str, timeout: int = 300, env: dict | None = None, cwd: str | os.PathLike | None = None
) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=cwd or REPO,
    env={**os.environ, **(env or {})},
  )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
  """Asserts the tool failed with one `error: ...` line mentioning every fragment; returns that line."""
  assert result.returncode != 0, result.stdout[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]
