"""User-facing errors: one clear line and a non-zero exit, never a traceback.

Command-line entry points raise `UserError` for anything the user can fix (a missing file, a bad flag, malformed
input). `cli_main` prints it as a single `error: ...` line and exits with status 2. Messages must name the file, row,
line or flag at fault and what to do — and must never contain clinical note text.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
  """Bad input the user can fix; its message is shown as one line."""


def report_and_exit(error: UserError) -> NoReturn:
  message = " ".join(str(error).split())  # always exactly one line
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def cli_main(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
  """Wraps an absl `main(argv)` so `UserError` becomes one line on stderr and exit status 2."""

  def wrapped(argv: Sequence[str]) -> None:
    try:
      main(argv)
    except UserError as error:
      report_and_exit(error)

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
