"""host_memory: the command lines re-execute themselves with glibc's huge-page malloc tunable where that helps."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clinical_bert_jax import host_memory

REPO = Path(__file__).resolve().parents[1]
SUPPORTED = host_memory.huge_page_env({}, host_memory._glibc_version(), host_memory._thp_mode()) is not None


@pytest.mark.parametrize(
  "environ, glibc, mode, expected",
  [
    ({}, (2, 36), "madvise", "glibc.malloc.hugetlb=1"),
    (
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
      (2, 35),
      "madvise",
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
    ),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # the user's opt-out
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"}, (2, 36), "madvise", None),
    ({"CLINICAL_BERT_JAX_HUGE_PAGES": "0"}, (2, 36), "madvise", None),
    ({}, (2, 34), "madvise", None),  # the tunable appeared in glibc 2.35
    ({}, None, "madvise", None),  # not glibc (musl, macOS)
    ({}, (2, 36), "always", None),  # the kernel already gives huge pages
    ({}, (2, 36), "never", None),
    ({}, (2, 36), None, None),  # no THP at all
  ],
)
def test_when_the_tunable_is_added(environ, glibc, mode, expected):
  env = host_memory.huge_page_env(environ, glibc, mode)
  assert (None if env is None else env["GLIBC_TUNABLES"]) == expected
  if env is not None:
    assert {key: value for key, value in env.items() if key != "GLIBC_TUNABLES"} == {
      key: value for key, value in environ.items() if key != "GLIBC_TUNABLES"
    }


def test_thp_mode_reads_the_selected_word(tmp_path):
  mode_file = tmp_path / "enabled"
  mode_file.write_text("always [madvise] never\n")
  assert host_memory._thp_mode(mode_file) == "madvise"
  mode_file.write_text("[always] madvise never\n")
  assert host_memory._thp_mode(mode_file) == "always"
  assert host_memory._thp_mode(tmp_path / "absent") is None


CHILD = """
import os, resource, sys
print("pid", os.getpid(), flush=True)
from clinical_bert_jax import host_memory
host_memory.use_transparent_huge_pages()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(64 * 2**20)  # 64 MiB from glibc malloc (served by mmap), as XLA and PyTorch allocate; numpy
ctypes.memset(block, 1, 64 * 2**20)  # would madvise huge pages by itself
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
huge = 0
for line in open("/proc/self/smaps_rollup"):
  if line.startswith("AnonHugePages:"):
    huge = int(line.split()[1])
print("tunables", os.environ.get("GLIBC_TUNABLES", ""), "faults", faults, "huge_kib", huge, flush=True)
"""


def _run_child(**extra_env) -> list[list[str]]:
  env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
  env.update(PYTHONPATH=str(REPO), **extra_env)
  done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  return [line.split() for line in done.stdout.splitlines()]


@pytest.mark.skipif(not SUPPORTED, reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")
def test_the_command_re_executes_itself_and_the_kernel_then_backs_malloc_with_huge_pages():
  lines = _run_child()
  pids = [line[1] for line in lines if line[0] == "pid"]
  assert len(pids) == 2 and pids[0] == pids[1]  # ran twice: once as started, once re-executed in the same process
  result = lines[-1]
  assert result[1] == "glibc.malloc.hugetlb=1"
  faults, huge_kib = int(result[3]), int(result[5])
  # The kernel is the oracle: 64 MiB in 4 KiB pages is 16,384 faults; in 2 MiB pages, 32 (plus a few small ones).
  assert huge_kib >= 32 * 1024
  assert faults < 2_000

  opted_out = _run_child(CLINICAL_BERT_JAX_HUGE_PAGES="0")
  assert len([line for line in opted_out if line[0] == "pid"]) == 1
  assert opted_out[-1][1] == "faults" and int(opted_out[-1][2]) > 8_000  # default malloc: 4 KiB pages


@pytest.mark.parametrize("name", ["pretrain", "embed", "evaluate"])
def test_each_command_switches_before_importing_anything_heavy(name):
  tree = ast.parse((REPO / "clinical_bert_jax" / f"{name}.py").read_text())
  body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
  calls = [
    index
    for index, node in enumerate(body)
    if isinstance(node, ast.If)
    and "use_transparent_huge_pages" in ast.unparse(node)
    and "__main__" in ast.unparse(node)
  ]
  assert calls, f"{name}.py does not call host_memory.use_transparent_huge_pages() under __main__"
  before = [ast.unparse(node) for node in body[: calls[0]] if isinstance(node, (ast.Import, ast.ImportFrom))]
  assert all("__future__" in line or line == "from clinical_bert_jax import host_memory" for line in before), before
