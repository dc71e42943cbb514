"""Atomic outputs: nothing half-written survives a failure; non-empty outputs are refused."""

import os

import pytest

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.fileio import atomic_output_dir, atomic_write


def test_failed_block_leaves_no_directory_and_no_staging(tmp_path):
  target = tmp_path / "out"
  with pytest.raises(RuntimeError):
    with atomic_output_dir(target) as staging:
      (staging / "part.txt").write_text("half")
      raise RuntimeError("killed")
  assert not target.exists()
  assert list(tmp_path.iterdir()) == []


def test_success_replaces_only_with_overwrite(tmp_path):
  target = tmp_path / "out"
  target.mkdir()
  (target / "old.txt").write_text("old")
  with pytest.raises(UserError, match="--overwrite"):
    with atomic_output_dir(target):
      pass
  with atomic_output_dir(target, overwrite=True) as staging:
    (staging / "new.txt").write_text("new")
  assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
  assert os.stat(target).st_mode & 0o777 == 0o777 & ~_umask()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
  path = tmp_path / "a.json"
  path.write_text("previous")
  with pytest.raises(ValueError):
    with atomic_write(path) as handle:
      handle.write("partial")
      raise ValueError
  assert path.read_text() == "previous"
  assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
  with atomic_write(path) as handle:
    handle.write("complete")
  assert path.read_text() == "complete"


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


@pytest.mark.slow  # runs every CLI
def test_every_flag_only_tool_refuses_positional_arguments():
  """run_absl refuses stray arguments once for all tools (a forgotten `--` is a common typo)."""
  from tests.cli_util import assert_one_line_error, run_module

  result = run_module("data_prep.synthetic_notes", "--output=/nonexistent/x.csv", "stray")
  assert_one_line_error(result, "unexpected arguments 'stray'")
