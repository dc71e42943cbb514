"""Atomic outputs: write under a temporary name, rename on success, remove on failure.

A run that is killed or fails midway must never leave anything that a later step could mistake for a complete result.
Everything our tools write goes through one of these two helpers. Temporary names carry the writer's process id
(`.NAME.tmp-PID-XXXX`); what a SIGKILLed writer left behind is removed by the next writer of the same NAME once that
process no longer exists. A storage failure (full disk, read-only filesystem, ...) propagates as the OSError, after
the temporary file or directory is removed; `errors.cli_main` reports it in one line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from clinical_bert_jax.errors import UserError


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. EPERM: it exists, owned by someone else
    return True
  return True


def _remove_stale_temporaries(final: Path) -> None:
  """Removes `.NAME.tmp-PID-*` / `.NAME.old-PID-*` siblings of `final` whose writer process is gone (SIGKILLed)."""
  with contextlib.suppress(OSError):
    for path in final.parent.glob(f".{final.name}.*-*"):
      kind, _, rest = path.name[len(final.name) + 2:].partition("-")
      pid = rest.split("-", 1)[0]
      if kind in ("tmp", "old") and pid.isdigit() and not _process_exists(int(pid)):
        if path.is_dir() and not path.is_symlink():
          shutil.rmtree(path, ignore_errors=True)
        else:
          with contextlib.suppress(OSError):
            path.unlink()


def check_output_dir(path: str | os.PathLike, overwrite: bool, flag: str = "--output_dir") -> Path:
  """Refuses a non-empty output directory unless `overwrite`; returns the path."""
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag}={path} exists and is not a directory; choose another path")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise UserError(f"{flag}={path} is not empty; choose an empty directory or pass --overwrite")
  return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False,
                      flag: str = "--output_dir") -> Iterator[Path]:
  """Yields a temporary sibling directory that replaces `path` only when the block succeeds.

  On any exception (or SIGKILL) the final `path` is untouched: either the previous content or nothing.
  """
  final = check_output_dir(path, overwrite, flag)
  parent = final.resolve().parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent / final.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any directory we make
  except OSError as error:
    raise UserError(f"{flag}={final}: cannot create it ({error.strerror}); check the path and permissions") from None
  try:
    yield staging
    if final.exists():  # --overwrite: move the old result aside first, so the swap itself is one rename
      old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=parent))
      os.replace(final, old / final.name)
      os.replace(staging, final)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(staging, final)
  except OSError as error:
    shutil.rmtree(staging, ignore_errors=True)
    if error.filename is None or str(staging) in str(error.filename):  # name what the user asked for, not a temp
      raise OSError(error.errno, error.strerror, str(final)) from None
    raise
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
  """Opens a temporary file next to `path`; renames it to `path` when the block succeeds, deletes it otherwise."""
  final = Path(path)
  final.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_temporaries(final)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
  os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600
  binary = "b" in mode
  try:
    with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
      yield handle
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp_name, final)
  except BaseException as error:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp_name)
    if isinstance(error, OSError) and (error.filename is None or error.filename == tmp_name):
      raise OSError(error.errno, error.strerror, str(final)) from None
    raise
