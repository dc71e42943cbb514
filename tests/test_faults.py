"""The fault catalogue (docs/reliability.md): each test injects one fault the way it happens in the field — a real
signal at an observed point of progress, a real full or read-only filesystem, bytes overwritten or cut off — and checks
what the user sees (one line, exit status) and what is preserved (no temporaries, previous results intact, a rerun
identical to an uninterrupted run).

Full and read-only filesystems are real: a small tmpfs mounted in a private mount namespace of the child process
(`unshare`; as an unprivileged user this needs user namespaces). Where neither works, those tests are skipped with the
reason.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cli_util import REPO, assert_one_line_error
from conftest import REFERENCE_RUN
from clinical_bert_jax import checkpointing, model_io, records
from clinical_bert_jax.errors import UserError
from test_create_pretraining_data import write_demo_text
from test_pretrain import (
  cli_args,
  deterministic_records,
  make_corpus,
  pretrain_command,
  subprocess_env,
)
from test_tokenization import write_cased_vocab

RUN = REFERENCE_RUN  # 40 steps, checkpoints every 10, evaluates 48 batches (tests/conftest.py)
SYNTHETIC_NOTES = REPO / "data_prep" / "demo_corpus" / "NOTEEVENTS_synthetic.csv"
TMP_MARKERS = (".tmp-", ".orbax-checkpoint-tmp", ".old-")


# ------------------------------------------------------------------------------------------------------ helpers
@functools.cache
def _namespace_prefix() -> tuple[str, ...] | None:
  """How to run a child in its own mount namespace (where it may mount a tmpfs), or None."""
  if shutil.which("unshare") is None:
    return None
  import tempfile

  with tempfile.TemporaryDirectory() as where:
    for prefix in (("unshare", "--user", "--map-root-user", "--mount"), ("unshare", "--mount")):
      probe = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', where], capture_output=True)
      if probe.returncode == 0:
        return prefix
  return None


def run_on_small_fs(
  command: list[str],
  mountpoint: Path,
  size: str,
  *,
  read_only: bool = False,
  copy_out: Path | None = None,
  env: dict | None = None,
  timeout: int = 600,
) -> tuple[subprocess.CompletedProcess, list[str]]:
  """Runs `command` with a `size` tmpfs at `mountpoint` (read-only if asked); returns the result and the files left
  on it (relative paths), copying them to `copy_out` first. The filesystem vanishes with the child."""
  prefix = _namespace_prefix()
  if prefix is None:
    pytest.skip("cannot mount a small filesystem here (no unshare, no user namespaces, not root)")
  mountpoint.mkdir(parents=True, exist_ok=True)
  listing = mountpoint.parent / f"{mountpoint.name}.listing"
  script = (
    'mount -t tmpfs -o size="$SIZE" tmpfs "$MP" || exit 97; '
    + ('mount -o remount,ro "$MP" || exit 98; ' if read_only else '')
    + '"$@"; rc=$?; (cd "$MP" && find . -mindepth 1) > "$LISTING"; '
    + ('cp -a "$MP/." "$COPY_OUT/"; ' if copy_out else '')
    + 'exit $rc'
  )
  if copy_out:
    copy_out.mkdir(parents=True, exist_ok=True)
  child_env = {
    **(env or os.environ),
    "SIZE": size,
    "MP": str(mountpoint),
    "LISTING": str(listing),
    "COPY_OUT": str(copy_out or ""),
  }
  result = subprocess.run(
    [*prefix, "sh", "-c", script, "sh", *command],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=child_env,
    cwd=REPO,
  )
  assert result.returncode not in (97, 98), result.stderr[-2000:]
  left = sorted(line[2:] for line in listing.read_text().splitlines())
  return result, left


def _no_temporaries(paths) -> None:
  leftovers = [str(path) for path in paths if any(marker in str(path) for marker in TMP_MARKERS)]
  assert not leftovers, leftovers


def _walk(root: Path) -> list[Path]:
  return sorted(path.relative_to(root) for path in root.rglob("*"))


def _tree_bytes(root: Path, skip=("manifest.json",)) -> dict[str, bytes]:
  return {
    str(path.relative_to(root)): path.read_bytes()
    for path in sorted(root.rglob("*"))
    if path.is_file() and path.name not in skip
  }


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300.0, poll: float = 0.002):
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      out, err = process.communicate()
      pytest.fail(f"ended (status {process.returncode}) before {what}:\n{out[-1500:]}\n{err[-2500:]}")
    if time.monotonic() > deadline:
      process.kill()
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(poll)


def _flip(path: Path, offset: int | None = None) -> None:
  data = bytearray(path.read_bytes())
  offset = len(data) // 2 if offset is None else offset
  data[offset] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path: Path, keep: int | None = None) -> None:
  with open(path, "r+b") as handle:
    handle.truncate(path.stat().st_size // 2 if keep is None else keep)


def _data_env(**extra: str) -> dict[str, str]:
  return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def corpus(reference_corpus):
  return reference_corpus  # 256 training and 768 held-out sequences (tests/conftest.py)


@pytest.fixture(scope="module")
def straight(reference_run):
  """The uninterrupted run every interrupted one is compared with (and the workdir the corruption tests damage
  copies of): the session's shared reference run (tests/conftest.py), `run/` and its export `hf/`. Read only."""
  return reference_run[1]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
  return write_cased_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def demo_text(tmp_path_factory) -> Path:
  return write_demo_text(tmp_path_factory.mktemp("demo") / "demo.txt")


def _cpd_command(text: Path, vocab: Path, output: Path, *extra: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "data_prep.create_pretraining_data",
    f"--input={text}",
    f"--vocab_file={vocab}",
    f"--output_dir={output}",
    "--max_seq_length=64",
    "--dupe_factor=2",
    "--max_shard_bytes=60000",
    *extra,
  ]


def _mimic_command(output: Path, *extra: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "data_prep.format_mimic",
    f"--input={SYNTHETIC_NOTES}",
    f"--output_dir={output}",
    "--shard_size_notes=5",
    *extra,
  ]


# ------------------------------------------------------------------------------------------- training: signals
@pytest.mark.slow  # trains (pretrain CLI runs)
def test_killed_and_terminated_training_reruns_to_the_same_model_and_export(corpus, straight, tmp_path, compile_cache):
  """One workdir through four interruptions, each rerun with the same command: SIGTERM during the first compile of
  the train step, SIGKILL during an asynchronous checkpoint write, SIGTERM during an evaluation, SIGKILL of the whole
  process group during the export. The metrics, final parameters and exported files equal the uninterrupted run's.

  The SIGTERM during evaluation (formerly its own test, test_sigterm_during_evaluation_saves_and_exits_0): sent when
  the step-20 log line appears, so the step-20 checkpoint save and a 48-batch evaluation follow it. The evaluation
  finishes, the next step runs, its checkpoint (step 21) is saved, exit 0 without a traceback; the reruns complete."""
  workdir, export = tmp_path / "run", tmp_path / "hf"
  command = pretrain_command(*cli_args(corpus, workdir, **RUN), f"--export_hf_dir={export}")
  env = subprocess_env(compile_cache, PYTHONUNBUFFERED="1")
  start = lambda: subprocess.Popen(
    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
  )
  lines: list[str] = []

  def saw(fragment: str, process: subprocess.Popen) -> bool:
    line = process.stdout.readline()
    lines.append(line)
    return fragment in line

  # 1. SIGTERM while the train step compiles (right after the step-0 evaluation is printed): saves, exits 0.
  first = start()
  _wait_for(lambda: saw("eval at step 0", first), first, "the step-0 evaluation", poll=0)
  first.send_signal(signal.SIGTERM)
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0 and "received SIGTERM" in out, err[-3000:]
  assert checkpointing.restorable_steps(workdir) and max(checkpointing.restorable_steps(workdir)) < 10

  # 2. SIGKILL while a checkpoint is being written in the background.
  checkpoints = workdir / checkpointing.CHECKPOINT_DIR
  second = start()
  writing = lambda: any(checkpointing.TMP_SUFFIX in path.name for path in checkpoints.iterdir())
  _wait_for(writing, second, "an asynchronous checkpoint write", poll=0.0005)
  os.killpg(second.pid, signal.SIGKILL)
  second.communicate()
  assert second.returncode == -signal.SIGKILL

  # 3. SIGTERM when the step-20 line appears: the step-20 save and evaluation still run, then step 21 and its save.
  evaluated = start()
  seen: list[str] = []
  step_20 = lambda: seen.append(evaluated.stdout.readline()) or seen[-1].startswith("step 20/40")
  _wait_for(step_20, evaluated, "the step-20 line", poll=0)
  evaluated.send_signal(signal.SIGTERM)
  out, err = evaluated.communicate(timeout=300)
  out = "".join(seen) + out
  assert evaluated.returncode == 0 and "received SIGTERM" in out, err[-3000:]
  assert "Traceback" not in err and "eval at step 20" in out
  assert max(checkpointing.restorable_steps(workdir)) == 21

  # 4. SIGKILL of the process group (trainer and its export child) while the export is being written.
  third = start()
  exporting = lambda: any(export.parent.glob(f".{export.name}.tmp-*"))
  _wait_for(exporting, third, "the export")
  os.killpg(third.pid, signal.SIGKILL)
  third.communicate()
  assert not (export / "model.safetensors").exists()

  # 5. The same command finishes the run (or just the export) and cleans up after the killed writers.
  fourth = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert fourth.returncode == 0, fourth.stderr[-3000:]
  _no_temporaries(_walk(tmp_path))
  assert deterministic_records(workdir) == deterministic_records(straight / "run")
  expected, actual = model_io.load_model(straight / "run"), model_io.load_model(workdir)
  assert expected.step == actual.step == RUN["num_train_steps"]
  np.testing.assert_array_equal(_all_values(expected.params), _all_values(actual.params))
  for name in ("model.safetensors", "config.json", "vocab.txt"):
    assert (export / name).read_bytes() == (straight / "hf" / name).read_bytes(), name


def _all_values(tree) -> np.ndarray:
  import jax

  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


# --------------------------------------------------------------------------------------- training: storage
@pytest.mark.slow  # trains (pretrain CLI runs)
def test_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(
  corpus, tmp_path, compile_cache
):
  mountpoint, saved = tmp_path / "small", tmp_path / "saved"
  result, left = run_on_small_fs(
    pretrain_command(*cli_args(corpus, mountpoint / "run", **RUN)),
    mountpoint,
    "700k",
    copy_out=saved,
    env=subprocess_env(compile_cache),
  )
  assert result.returncode == 2, result.stderr[-3000:]
  line = assert_one_line_error(result, "cannot write checkpoint", "No space left on device (ENOSPC)")
  assert "Future exception" not in result.stderr
  _no_temporaries(left)
  steps = checkpointing.restorable_steps(saved / "run")
  assert steps, line  # 700k holds one checkpoint of the tiny model, not two
  assert f"previous checkpoint (step {steps[-1]}) is intact" in line
  assert model_io.load_model(saved / "run", step=steps[-1]).step == steps[-1]  # verifies against its checksums


@pytest.mark.slow  # runs the data tools
@pytest.mark.parametrize("tool", ["create_pretraining_data", "format_mimic"])
def test_full_disk_in_the_data_tools_is_one_line_and_leaves_nothing(tool, demo_text, vocab, tmp_path):
  mountpoint = tmp_path / "small"
  output = mountpoint / "out"
  command = (
    _cpd_command(demo_text, vocab, output, "--num_workers=2")
    if tool == "create_pretraining_data"
    else _mimic_command(output, "--num_workers=2")
  )
  result, left = run_on_small_fs(command, mountpoint, "48k", env=_data_env())
  assert result.returncode == 2
  assert_one_line_error(result, str(mountpoint), "No space left on device")
  assert left == []


@pytest.mark.slow  # runs the CLIs; converts the trained `straight` run
@pytest.mark.parametrize("tool", ["create_pretraining_data", "format_mimic", "pretrain", "convert"])
def test_read_only_output_directory_is_one_line(tool, demo_text, vocab, corpus, straight, tmp_path, compile_cache):
  mountpoint = tmp_path / "ro"
  output = mountpoint / "out"
  command = {
    "create_pretraining_data": _cpd_command(demo_text, vocab, output),
    "format_mimic": _mimic_command(output),
    "pretrain": pretrain_command(*cli_args(corpus, output, **RUN)),
    "convert": [
      sys.executable,
      "-m",
      "clinical_bert_jax.convert",
      "to_hf",
      f"--checkpoint_dir={straight / 'run'}",
      f"--output_dir={output}",
    ],
  }[tool]
  result, left = run_on_small_fs(
    command, mountpoint, "1m", read_only=True, env=subprocess_env(compile_cache, PYTHONPATH=str(REPO))
  )
  assert result.returncode == 2
  assert_one_line_error(result, str(output), "Read-only file system")
  assert left == []


# ---------------------------------------------------------------------------------------------- data: signals
@pytest.mark.slow  # runs the data tools
def test_killed_format_mimic_reruns_identically(tmp_path):
  straight_out, killed_out = tmp_path / "straight", tmp_path / "killed"
  assert (
    subprocess.run(
      _mimic_command(straight_out, "--num_workers=2"), env=_data_env(), capture_output=True, timeout=300
    ).returncode
    == 0
  )
  process = subprocess.Popen(
    _mimic_command(killed_out, "--num_workers=2"),
    env=_data_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  staging = lambda: [path for path in tmp_path.glob(".killed.tmp-*") if any(path.iterdir())]
  _wait_for(staging, process, "the first shard in the staging directory")
  os.killpg(process.pid, signal.SIGKILL)  # the parent and its workers, mid-run
  process.wait()
  assert not killed_out.exists()
  rerun = subprocess.run(
    _mimic_command(killed_out, "--num_workers=2"), env=_data_env(), capture_output=True, text=True, timeout=300
  )
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert _tree_bytes(killed_out) == _tree_bytes(straight_out)
  _no_temporaries(_walk(tmp_path))


@pytest.mark.slow  # runs the data tools
def test_create_pretraining_data_killed_at_the_final_rename_reruns_identically(demo_text, vocab, tmp_path):
  """Two workers; SIGKILL as soon as the manifest (written last, just before the rename) is in the staging
  directory. Either nothing or the complete result is under the final name; the rerun gives the same bytes."""
  straight_out, killed_out = tmp_path / "straight", tmp_path / "killed"
  assert (
    subprocess.run(
      _cpd_command(demo_text, vocab, straight_out, "--num_workers=2"), env=_data_env(), capture_output=True, timeout=300
    ).returncode
    == 0
  )
  process = subprocess.Popen(
    _cpd_command(demo_text, vocab, killed_out, "--num_workers=2"),
    env=_data_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  done = lambda: any(tmp_path.glob(".killed.tmp-*/manifest.json")) or killed_out.exists()
  _wait_for(done, process, "the manifest", poll=0.0002)
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()
  if killed_out.exists():  # the rename won the race: the result is complete
    assert records.read_manifest(killed_out)["total_instances"] > 0
    shutil.rmtree(killed_out)
  rerun = subprocess.run(
    _cpd_command(demo_text, vocab, killed_out, "--num_workers=2"),
    env=_data_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert _tree_bytes(killed_out) == _tree_bytes(straight_out)
  _no_temporaries(_walk(tmp_path))


def _cmdline(pid: int) -> str:
  try:
    return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
  except OSError:
    return ""


def _children(pid: int) -> list[int]:
  try:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
  except OSError:
    return []


@pytest.mark.slow  # runs the data tools
@pytest.mark.parametrize("tool", ["create_pretraining_data", "format_mimic"])
def test_a_killed_worker_is_reported_in_one_line_and_leaves_nothing(tool, demo_text, vocab, tmp_path):
  if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
    pytest.skip("needs /proc/PID/task/PID/children to find the workers")
  output = tmp_path / "out"
  command = (
    _cpd_command(demo_text, vocab, output, "--num_workers=2", "--dupe_factor=20")
    if tool == "create_pretraining_data"
    else _mimic_command(output, "--num_workers=2")
  )
  process = subprocess.Popen(command, env=_data_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # spawn starts a resource tracker too; the workers are the children started by multiprocessing.spawn
  workers = lambda: [pid for pid in _children(process.pid) if "spawn_main" in _cmdline(pid)]
  if tool == "create_pretraining_data":
    _wait_for(lambda: len(workers()) >= 2 and any(tmp_path.glob(".out.tmp-*")), process, "the workers")
    time.sleep(0.5)  # into the work
  else:  # its workers are quick: kill the first one as soon as it exists
    _wait_for(lambda: workers(), process, "a worker", poll=0.0005)
  os.kill(workers()[0], signal.SIGKILL)
  out, err = process.communicate(timeout=300)
  result = subprocess.CompletedProcess(command, process.returncode, out, err)
  assert result.returncode == 2, err[-2000:]
  assert_one_line_error(result, "worker process died")
  assert _walk(tmp_path) == []


# --------------------------------------------------------------------------------------------- damaged files
def _copy_data(corpus, tmp_path: Path, kind: str) -> Path:
  if kind == "tfrecord":
    return make_corpus(tmp_path / "c", train_count=32, eval_count=8, tfrecord=True).train
  target = tmp_path / "train"
  shutil.copytree(corpus.train, target)
  return target


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flipped_byte", "truncated"])
@pytest.mark.parametrize("kind", ["shard", "tfrecord", "manifest"])
def test_damaged_training_data_is_refused_in_one_line(kind, damage, corpus, tmp_path):
  directory = _copy_data(corpus, tmp_path, kind)
  target = (
    directory / records.MANIFEST_NAME
    if kind == "manifest"
    else sorted(path for path in directory.iterdir() if path.suffix in (".cbj", ".tfrecord"))[0]
  )
  if damage is _truncate and kind == "tfrecord":
    # Mid-record. Google's TFRecords carry no record count: one cut exactly between records (here every record has
    # the same size, so half the file is such a cut) reads as a shorter file; see docs/reliability.md.
    _truncate(target, target.stat().st_size // 2 + 100)
  else:
    damage(target, **({"offset": 5} if damage is _flip and kind == "manifest" else {}))
  with pytest.raises(UserError) as raised:
    data = records.PretrainingData.open(str(directory))
    for index in range(len(data)):  # TFRecords are checked as they are read
      data[index]
  message = str(raised.value)
  assert "\n" not in message and target.name in message or str(directory) in message, message


@pytest.mark.slow  # damages copies of the trained `straight` run
@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flipped_byte", "truncated"])
@pytest.mark.parametrize("kind", ["checkpoint", "config.json", "model.safetensors"])
def test_damaged_model_files_are_refused_in_one_line(kind, damage, straight, tmp_path):
  if kind == "model.safetensors":
    directory = tmp_path / "hf"
    shutil.copytree(straight / "hf", directory)
    target = directory / kind
    if damage is _flip:
      damage(target, offset=20)  # the JSON header; tensor bytes carry no checksum in this format (reliability.md)
    else:
      damage(target)
  else:
    directory = tmp_path / "run"
    shutil.copytree(straight / "run", directory)
    if kind == "config.json":
      target = directory / kind
      damage(target, **({"offset": 0} if damage is _flip else {}))
    else:
      step = checkpointing.restorable_steps(directory)[-1]
      params = directory / checkpointing.CHECKPOINT_DIR / str(step) / "params"
      target = max((path for path in params.rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)
      damage(target)
  with pytest.raises(UserError) as raised:
    model_io.load_model(directory)
  message = str(raised.value)
  assert "\n" not in message and str(directory) in message, message
