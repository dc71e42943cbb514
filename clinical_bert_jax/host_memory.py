"""Transparent huge pages for the host allocator of the command-line jobs (standard library only).

XLA:CPU, PyTorch and numpy take every large temporary buffer (activations, gradients, the train step's scratch space)
from glibc malloc, which serves it with a fresh `mmap`. The kernel then zero-fills those pages again at every step: on
the CPU backend that is 10-30% of a train step's CPU time (BENCHMARKS.md, "train step"). With glibc's
`glibc.malloc.hugetlb=1` tunable (glibc ≥ 2.35) malloc asks for transparent huge pages on those mappings, one fault
per 2 MiB instead of one per 4 KiB: 100× fewer faults at the same resident memory.

glibc reads tunables only when the process starts, so `pretrain`, `embed` and `evaluate` call
`use_transparent_huge_pages()` before importing anything heavy: where it helps, it re-executes the same command line
with the tunable added (same process id, so signals and the process's parent are unaffected). It does nothing when:

* the system is not Linux with glibc ≥ 2.35, or its THP mode is not `madvise` (`always` already gives huge pages;
  `never` cannot);
* `GLIBC_TUNABLES` already names `glibc.malloc.hugetlb` (any value; `glibc.malloc.hugetlb=0` opts out);
* `CLINICAL_BERT_JAX_HUGE_PAGES=0` is set.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "CLINICAL_BERT_JAX_HUGE_PAGES"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, ...] | None:
  if sys.platform != "linux":
    return None
  library, version = platform.libc_ver()
  if library != "glibc" or not version:
    return None
  try:
    return tuple(int(part) for part in version.split("."))
  except ValueError:
    return None


def _thp_mode(mode_file: Path = THP_MODE_FILE) -> str | None:
  """The selected mode of `always [madvise] never`, or None where the file is absent or unreadable."""
  try:
    text = mode_file.read_text()
  except OSError:
    return None
  for word in text.split():
    if word.startswith("[") and word.endswith("]"):
      return word[1:-1]
  return None


def huge_page_env(
  environ: Mapping[str, str], glibc: tuple[int, ...] | None, thp_mode: str | None
) -> dict[str, str] | None:
  """The environment to re-execute with, or None when the current one should be kept (see the module docstring)."""
  if environ.get(OPT_OUT, "1") == "0":
    return None
  if glibc is None or glibc < (2, 35) or thp_mode != "madvise":
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if any(item.split("=", 1)[0] == TUNABLE for item in current.split(":") if item):
    return None
  return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"}


def use_transparent_huge_pages() -> None:
  """Re-executes this command line with `glibc.malloc.hugetlb=1` where that helps; returns only where it does not.

  Call it first thing in a command's `__main__`, before jax, torch or numpy allocate (the re-executed process repeats
  whatever ran before the call)."""
  env = huge_page_env(os.environ, _glibc_version(), _thp_mode())
  argv = getattr(sys, "orig_argv", None)
  if env is None or not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
  except OSError:
    return  # the same job, with the default allocator


def release_freed_memory() -> None:
  """Hands the heap memory glibc keeps after `free` back to the system (`malloc_trim(0)`); a no-op without glibc.

  The train step calls it once, after initialising the state and compiling the step: both leave hundreds of MB of
  freed blocks in malloc's arenas (BERT-Large: ≈ 0.35 GB from initialisation, ≈ 0.2 GB from the compiler) that
  would otherwise stay resident under the step's peak."""
  if _glibc_version() is None:
    return
  import ctypes

  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass
