"""User-facing errors: one clear line and a non-zero exit, never a traceback.

Command-line entry points raise `UserError` for anything the user can fix (a missing file, a bad flag, malformed
input). `cli_main` prints it as a single `error: ...` line and exits with status 2. Messages must name the file, row,
line or flag at fault and what to do — and must never contain clinical note text.

Storage failures (a full disk, a quota, a read-only filesystem, permission denied, an I/O error) are not bugs either:
`cli_main` turns such an `OSError` into the same kind of line (`describe_os_error`), naming the path and what to do.
The writers clean up after themselves (`fileio`, `checkpointing`), so nothing half-written is left behind.
"""

from __future__ import annotations

import errno
import sys
from typing import Callable, NoReturn, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
  """Bad input the user can fix; its message is shown as one line."""


# errno -> what the user can do about it. Other OSErrors (a missing file we expected to exist, ...) are bugs or races
# and keep their traceback.
STORAGE_ERRNOS = {
  errno.ENOSPC: "free space on that filesystem or choose another output path",
  errno.EDQUOT: "the disk quota is used up: free space or choose another output path",
  errno.EFBIG: "a file size limit was hit (ulimit -f, or the filesystem's maximum file size): raise it or choose "
  "another output path",
  errno.EROFS: "the filesystem is read-only: choose a writable output path",
  errno.EACCES: "permission denied: check the permissions of the path or choose another one",
  errno.EPERM: "operation not permitted: check the permissions of the path or choose another one",
  errno.EIO: "the storage reported an I/O error: check the disk or network filesystem (dmesg) and rerun; what was "
  "finished before is kept",
  errno.ENOTDIR: "a file stands where a directory is expected: choose another path",
}


def is_storage_error(error: BaseException) -> bool:
  return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


def describe_os_error(error: OSError, path: object = None) -> str:
  """One line for a storage OSError: the path, the system's reason and what to do."""
  where = path or error.filename or "a file"
  reason = error.strerror or str(error)
  advice = STORAGE_ERRNOS.get(error.errno, "check the path and rerun")
  return f"cannot write {where}: {reason} ({errno.errorcode.get(error.errno, error.errno)}); {advice}"


def report_and_exit(error: UserError) -> NoReturn:
  message = " ".join(str(error).split())  # always exactly one line
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def cli_main(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
  """Wraps an absl `main(argv)` so `UserError` (and a storage `OSError`) becomes one line on stderr and exit 2."""

  def wrapped(argv: Sequence[str]) -> None:
    try:
      main(argv)
    except UserError as error:
      report_and_exit(error)
    except OSError as error:
      if not is_storage_error(error):
        raise
      report_and_exit(UserError(describe_os_error(error)))

  wrapped.__name__ = getattr(main, "__name__", "main")
  wrapped.__doc__ = main.__doc__
  return wrapped


def run_absl(main: Callable[[Sequence[str]], None], positional_args: bool = False) -> None:
  """`absl.app.run(cli_main(main))`, also turning flag-parsing errors into one line.

  absl prints usage plus the error for a bad flag or a missing flagfile; we keep its one-line reason and exit 2.
  Unless `positional_args` (tools with subcommands), anything that is not a --flag is refused here, once for all tools.
  """
  from absl import app, flags

  app.define_help_flags()  # --help/--helpfull, which app.run would define; we parse flags before calling it
  try:
    argv = flags.FLAGS(sys.argv, known_only=False)
  except flags.Error as error:
    report_and_exit(UserError(f"{error} (see --helpfull for the list of flags)"))
  except (OSError, IOError) as error:  # e.g. --flagfile that does not exist
    report_and_exit(UserError(f"cannot read flags: {error}"))
  if not positional_args and len(argv) > 1:
    report_and_exit(UserError(f"unexpected arguments {' '.join(argv[1:])!r}; every option is a --flag=value"))
  app.run(cli_main(main), argv=argv)
