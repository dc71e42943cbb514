"""What the TFDS builders share: array_record output, manual-download lookup with one-line errors.

MIMIC, MedNLI and i2b2 are credentialed, so every builder is a manual-download builder: the user places the official
files in a directory and passes it as `manual_dir`. Nothing here imports TensorFlow. tensorflow-datasets 4.9 writes
array_record files with NumPy alone, and `tfds.data_source(...)` or `builder.as_data_source()` reads them by random
access. A JAX or PyTorch job can therefore read these datasets without TensorFlow installed.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Sequence

import tensorflow_datasets as tfds

from clinical_bert_jax.errors import UserError

FILE_FORMAT = "array_record"


class ManualArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A generator builder that writes array_record unless told otherwise (tfds defaults to TFRecord, which needs TF
  to read)."""

  # tfds locates a builder's download-checksums file through `code_path`, whose lookup imports `importlib_resources`,
  # a package tensorflow-datasets 4.9.10 only declares for Python < 3.9. Manual-download builders have no checksums.
  code_path = None

  def __init__(self, *, file_format: str | None = None, **kwargs: Any):
    super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)

  def manual_path(self, dl_manager: tfds.download.DownloadManager) -> Path:
    """The manual download directory, or a UserError saying what to put there."""
    try:
      return Path(dl_manager.manual_dir)
    except AssertionError:
      first_line = self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip().splitlines()[0]
      raise UserError(
        f"{self.name}: the manual download directory is missing or empty; {first_line} (pass "
        "--manual_dir=DIR, or download_config=tfds.download.DownloadConfig(manual_dir=DIR))"
      ) from None


def find_files(directory: Path, patterns: Sequence[str]) -> list[Path]:
  """Files under `directory` (searched recursively) whose name matches one of `patterns` (case-insensitive)."""
  return sorted(
    path
    for path in directory.rglob("*")
    if path.is_file() and any(fnmatch.fnmatch(path.name.lower(), p.lower()) for p in patterns)
  )


def find_one_file(directory: Path, patterns: Sequence[str], what: str) -> Path:
  """The single file under `directory` matching `patterns`; UserError when there is none or more than one."""
  found = find_files(directory, patterns)
  if len(found) != 1:
    problem = "no file" if not found else f"{len(found)} files ({', '.join(str(p) for p in found[:3])})"
    raise UserError(f"{directory}: {problem} matching {' or '.join(patterns)} for the {what}; expected exactly one")
  return found[0]
