"""Checkpoints of a pretraining run: save every N steps (asynchronously), keep the last K, resume from the newest one
that is complete.

Layout (docs/ARCHITECTURE.md): an orbax `CheckpointManager` under `WORKDIR/checkpoints/<step>/` with three items:

* `params`: StandardSave of the parameter pytree, restorable on its own (export, evaluation, `model_io`);
* `train_state`: StandardSave of `{opt_state, rng, step}`;
* `data_state`: JsonSave of the input pipeline's position (and the open metric window, see `metrics_io`);
* `checksums`: JsonSave of a checksum of every array of `params` and `train_state` and of `data_state`, computed from
  the values being saved before the background write starts (see "Verification" below).

Saving is asynchronous: `save` returns once the arrays are copied to host memory (orbax's synchronous device-to-host
transfer, so the train step may donate and overwrite the device buffers right away) and the files are written in a
background thread. Orbax writes each step into a temporary directory, puts `commit_success.txt` in it and renames it,
so a step directory missing that marker (or one whose restore fails) was not finished: `restore_latest` skips it with
a warning, moves it to `WORKDIR/checkpoints_incomplete/` (kept for inspection; it would otherwise block the next
save of that step) and falls back to the previous step. If no step restores at all, that is not treated as damage but
as a workdir written by a different model/optimizer configuration, and reported as a UserError.

Verification: orbax commits the four items together (one temporary directory, one rename), so the checksums are
exactly as durable as what they describe. Restoring recomputes them from the restored values and compares: a step
whose values differ (a flipped byte that still decodes to numbers, a truncated or swapped file) is named in one line,
set aside like an incomplete one, and the previous step is tried. When steps exist but none verifies, the run stops
with a UserError instead of starting from scratch. Checkpoints written before this item existed have no `checksums`
directory: they are restored with a warning that they were not verified.

The array checksum (`CHECKSUM_ALGORITHM`) is computed on the devices by a jitted reduction per array (one array at a
time, see `array_checksums`), so it works unchanged for arrays sharded over many processes (pjit/FSDP) and never gathers
an array onto one host: every element's raw bits are combined with its global flat index by a 32-bit bijective mixer and
the results are summed modulo 2**32, in two lanes keyed differently (64 bits in all). The sum does not depend on how an
array is split into shards or in what order they are added, so save-time and restore-time meshes may differ; a change of
any single element always changes both lanes, and random damage to several elements goes unnoticed with probability
about 2**-64. `data_state` is small JSON and gets a SHA-256 of its canonical form.

Storage failures (a full disk, a read-only filesystem, permission denied, an I/O error), whether raised by the save
call or by the background write and surfaced at the next save, `wait` or `close`, become one UserError naming the
checkpoint and what to do; the unfinished `*.orbax-checkpoint-tmp*` directories are removed and the previous
checkpoints stay as they were. Orbax's own log records of such failures keep their one line but lose the traceback.

All processes of a multi-process run call every method here (orbax coordinates them); only process 0 moves files.

The workdir may be a `gs://` URI (fileio.as_path): orbax writes there directly (tensorstore for the arrays, with
`commit_success.txt` as the completion marker on object storage), and steps are discovered through orbax's public
`ocp.path.step.checkpoint_steps` (finalized steps only) before the content check of `incomplete_reason`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging as python_logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import logging

from clinical_bert_jax import fileio
from clinical_bert_jax.errors import STORAGE_ERRNOS, UserError

CHECKPOINT_DIR = "checkpoints"
INCOMPLETE_DIR = "checkpoints_incomplete"
COMMIT_MARKER = "commit_success.txt"
METADATA_FILE = "_CHECKPOINT_METADATA"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step (or item) directory still being written
ITEMS = ("params", "train_state", "data_state")
CHECKSUM_ITEM = "checksums"  # optional: checkpoints written before verification existed lack it
CHECKSUM_ALGORITHM = "cbj-mix32x2-v1"


@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  train_state: Any
  data_state: dict[str, Any]
  verified: bool = True  # False: an old checkpoint without checksums


class VerificationError(Exception):
  """A checkpoint's restored values do not match the checksums saved with it."""


# ------------------------------------------------------------------------------------------------- checksums
def _mix32(x: jax.Array) -> jax.Array:
  """A bijection of uint32 with good avalanche (the "lowbias32" integer hash)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _as_words(x: jax.Array) -> jax.Array:
  """The raw bits of every element as uint32 (8-byte elements become a trailing axis of two words)."""
  x = jnp.asarray(x)
  size = np.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # shape + (2,)
  raise TypeError(f"cannot checksum dtype {x.dtype}")


def _leaf_checksum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  words = _as_words(x)
  index = jnp.zeros(words.shape, jnp.uint32)  # the global row-major flat index, built without reshaping shards
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  lanes = []
  for key in (0x9E3779B9, 0x632BE5AB):
    lanes.append(jnp.sum(_mix32(words ^ _mix32(index ^ jnp.uint32(key))), dtype=jnp.uint32))
  return lanes[0], lanes[1]


# One program per leaf shape/dtype/sharding, not one per tree: a model's layers repeat a few shapes, so the first
# checksum of a 139-leaf tree (the tests' tiny model with Adam) compiles small programs in 0.4-2 s instead of one in
# 3-6 s, and BERT-Large's ~1,200 leaves a dozen programs instead of a huge one.
_checksum_leaf = jax.jit(_leaf_checksum)


def _leaf_names(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _host_value(array: Any) -> int:
  return int(np.asarray(array.addressable_data(0) if isinstance(array, jax.Array) else array))


def array_checksums(tree: Any) -> dict[str, str]:
  """{leaf path: 16 hex digits} of a pytree of (global or host) arrays; a collective in multi-process runs.

  One leaf's program at a time: a sharded leaf's program all-reduces across devices, and XLA:CPU's in-process
  collectives deadlock when several such programs are queued at once (each device's thread waits in a different
  program's rendezvous; XLA aborts the process after 40 s: seen with FSDP over 8 simulated devices)."""
  host = []
  for leaf in jax.tree.leaves(tree):
    lanes = jax.block_until_ready(_checksum_leaf(leaf))  # every device done before the next program starts
    host.extend(_host_value(lane) for lane in lanes)
  return {name: f"{host[2 * i]:08x}{host[2 * i + 1]:08x}" for i, name in enumerate(_leaf_names(tree))}


def json_checksum(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def checkpoint_checksums(params: Any, train_state: Any, data_state: Any) -> dict[str, Any]:
  return {
    "algorithm": CHECKSUM_ALGORITHM,
    "params": array_checksums(params),
    "train_state": array_checksums(train_state),
    "data_state": json_checksum(data_state),
  }


def verify(saved: Mapping[str, Any], **items: Any) -> None:
  """Raises VerificationError naming the first item/array whose checksum differs from `saved`."""
  if saved.get("algorithm") != CHECKSUM_ALGORITHM:
    raise VerificationError(f"unknown checksum algorithm {saved.get('algorithm')!r}")
  for name, value in items.items():
    if name not in saved:
      raise VerificationError(f"no checksum recorded for {name}")
    if name == "data_state":
      if json_checksum(value) != saved[name]:
        raise VerificationError("data_state checksum mismatch")
      continue
    actual, expected = array_checksums(value), saved[name]
    if actual.keys() != expected.keys():
      raise VerificationError(f"{name} holds other arrays than were saved")
    bad = [leaf for leaf in actual if actual[leaf] != expected[leaf]]
    if bad:
      raise VerificationError(
        f"checksum mismatch in {name}{bad[0]}" + (f" and {len(bad) - 1} more array(s)" if len(bad) > 1 else "")
      )


def _one_line(error: BaseException, limit: int = 240) -> str:
  return " ".join(f"{type(error).__name__}: {error}".split())[:limit]


def incomplete_reason(step_dir: Any) -> str | None:
  """Why a step directory is not a finished checkpoint, or None when it looks complete."""
  missing = [name for name in (COMMIT_MARKER, METADATA_FILE, *ITEMS) if not (step_dir / name).exists()]
  return f"missing {', '.join(missing)}" if missing else None


# ------------------------------------------------------------------------------------------- storage failures
def storage_failure(error: BaseException) -> tuple[str, int | None] | None:
  """(reason, errno) when `error` (or what caused it) is a storage failure; tensorstore reports those as ValueErrors
  with an `os_error_code`, Python as OSErrors."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
      return f"{error.strerror} ({errno.errorcode[error.errno]})", error.errno
    match = re.search(r"os_error_code='?(\d+)", str(error))
    if match and int(match.group(1)) in STORAGE_ERRNOS:
      code = int(match.group(1))
      return f"{os.strerror(code)} ({errno.errorcode[code]})", code
    # Not a bare RESOURCE_EXHAUSTED: on an accelerator that is also how XLA reports running out of device memory.
    if re.search(r"PERMISSION_DENIED|No space left on device|Read-only file system|Disk quota exceeded", str(error)):
      return _one_line(error, 160), None
    error = error.__cause__ or error.__context__
  return None


class _QuietOrbaxStorageFailures(python_logging.Filter):
  """Orbax logs a failed background write from every thread involved, each with a traceback; the UserError raised in
  the main thread names it in one line. Drops those records (storage failures, and anything after a store gave up);
  other orbax records with a traceback keep their first line."""

  abandoned = False

  def filter(self, record: python_logging.LogRecord) -> bool:
    if not record.exc_info or f"{os.sep}orbax{os.sep}" not in (record.pathname or ""):
      return True
    if self.abandoned or storage_failure(record.exc_info[1]) is not None:
      return False
    record.exc_info, record.exc_text = None, None
    return True


_ORBAX_LOG_FILTER = _QuietOrbaxStorageFailures()
_ASYNCIO_LOG_FILTER = None  # set below


class _QuietAsyncioStorageFailures(python_logging.Filter):
  """asyncio's "Future exception was never retrieved" for the writes orbax abandoned after a storage failure."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return error is None or not (_ORBAX_LOG_FILTER.abandoned or storage_failure(error) is not None)


_ASYNCIO_LOG_FILTER = _QuietAsyncioStorageFailures()


def _quiet_late_callbacks() -> None:
  """When a write fails, tensorstore completes the writes still in flight and calls back into the event loop that
  orbax already closed; each callback reports "RuntimeError: Event loop is closed" with a traceback through
  sys.unraisablehook. Nothing is lost by those (the step is abandoned and reported in one line), so they are
  dropped; every other unraisable exception is printed as before."""
  previous = sys.unraisablehook
  if getattr(previous, "_cbj_quiet", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
      return
    previous(unraisable)

  hook._cbj_quiet = True
  sys.unraisablehook = hook


def _join_orbax_threads(timeout_s: float = 60.0) -> None:
  """Waits for orbax's background writer threads (they may still write after the first of them failed)."""
  deadline = time.monotonic() + timeout_s
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
      threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))  # orbax's join() re-raises


def _remove_tree(path: Any) -> None:
  if hasattr(path, "rmtree"):  # etils.epath (also gs://)
    with contextlib.suppress(Exception):
      path.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


class CheckpointStore:
  """The run's checkpoints; wraps one orbax CheckpointManager."""

  def __init__(self, workdir: str | Path, keep: int, async_save: bool = True):
    self.workdir = fileio.as_path(workdir)
    if not fileio.is_remote(self.workdir):
      self.workdir = self.workdir.resolve()
    self.directory = self.workdir / CHECKPOINT_DIR
    # cleanup_tmp_directories: what a SIGKILLed run was still writing is removed when the next one opens the store.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
    )
    try:
      self._manager = ocp.CheckpointManager(
        _orbax_path(self.directory), item_names=(*ITEMS, CHECKSUM_ITEM), options=options
      )
    except OSError as error:
      raise UserError(f"cannot create {self.directory}: {error.strerror}; check --output_dir") from None
    self._writing_step: int | None = None  # the newest save started (its files may still be being written)
    self._failed = False
    python_logging.getLogger("absl").addFilter(_ORBAX_LOG_FILTER)  # idempotent
    python_logging.getLogger("asyncio").addFilter(_ASYNCIO_LOG_FILTER)
    _quiet_late_callbacks()

  @contextlib.contextmanager
  def _storage_errors(self, step: int | None):
    """Turns a storage failure of a save (this one or the one still in flight) into one UserError, cleaning up."""
    try:
      yield
    except UserError:
      raise
    except Exception as error:
      failure = storage_failure(error)
      if failure is None:
        raise
      reason, code = failure
      named = re.search(rf"{CHECKPOINT_DIR}/(\d+)", f"{error} {getattr(error, 'filename', '')}")
      failed_step = int(named.group(1)) if named else self._writing_step if self._writing_step is not None else step
      self._abandon()
      kept = [other for other in restorable_steps(self.workdir) if other != failed_step]
      previous = (
        f"the previous checkpoint (step {kept[-1]}) is intact and a rerun resumes from it"
        if kept
        else "no earlier checkpoint exists, so a rerun starts from the beginning"
      )
      advice = STORAGE_ERRNOS.get(code, "free space or choose another --output_dir")
      raise UserError(
        f"cannot write checkpoint {self.directory}/{failed_step}: {reason}; {advice}; {previous}"
      ) from None

  def _abandon(self) -> None:
    """After a failed save: lets orbax's threads finish, removes the unfinished directories (process 0)."""
    self._failed = True
    _ORBAX_LOG_FILTER.abandoned = True
    with contextlib.suppress(Exception):
      self._manager.close()
    _join_orbax_threads()
    if jax.process_index() == 0:
      with contextlib.suppress(Exception):
        for path in self.directory.glob(f"*{TMP_SUFFIX}*"):
          _remove_tree(path)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, params: Any, train_state: Mapping[str, Any], data_state: Mapping[str, Any]) -> bool:
    """Starts saving `step` (global jax.Arrays in multi-process runs); False if that step is already saved.

    The checksums are computed here, synchronously, from the very arrays handed to orbax (before the caller may
    donate their buffers to the next step), and saved as one more item of the same checkpoint.
    """
    if self._failed or step in self._manager.all_steps():
      return False
    train_state, data_state = dict(train_state), dict(data_state)
    checksums = checkpoint_checksums(params, train_state, data_state)
    args = ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      train_state=ocp.args.StandardSave(train_state),
      data_state=ocp.args.JsonSave(data_state),
      **{CHECKSUM_ITEM: ocp.args.JsonSave(checksums)},
    )
    with self._storage_errors(step):
      started = bool(self._manager.save(step, args=args, force=True))
    self._writing_step = step if started else self._writing_step
    return started

  def restore(self, step: int, abstract_params: Any, abstract_train_state: Any) -> Restored:
    """Restores `step` into the shapes, dtypes and shardings of the abstract (ShapeDtypeStruct) targets and verifies
    it against its checksums (VerificationError when they differ)."""
    verified = (self.directory / str(step) / CHECKSUM_ITEM).exists()
    items = dict(
      params=ocp.args.StandardRestore(abstract_params),
      train_state=ocp.args.StandardRestore(abstract_train_state),
      data_state=ocp.args.JsonRestore(),
    )
    if verified:
      items[CHECKSUM_ITEM] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if verified:
      verify(
        restored[CHECKSUM_ITEM],
        params=restored["params"],
        train_state=restored["train_state"],
        data_state=restored["data_state"],
      )
    else:
      logging.warning(
        "checkpoint %s/%d has no checksums (written by an older version): restored without verification",
        self.directory,
        step,
      )
    return Restored(step, restored["params"], restored["train_state"], restored["data_state"], verified)

  def restore_latest(self, abstract_params: Any, abstract_train_state: Any) -> Restored | None:
    """The newest checkpoint that is complete and verifies, or None for a fresh run (no checkpoint at all).

    Unusable steps are set aside (module docstring). Raises UserError when steps exist but none can be used.
    """
    steps = self.all_steps()
    failures: list[tuple[int, str]] = []
    for step in reversed(steps):
      reason = incomplete_reason(self.directory / str(step))
      if reason is None:
        try:
          restored = self.restore(step, abstract_params, abstract_train_state)
        except VerificationError as error:
          reason = f"fails verification: {error}"
        except Exception as error:  # orbax/tensorstore raise many types for damaged files
          reason = f"cannot be restored: {_one_line(error)}"
        else:
          self._set_aside(failures)
          return restored
      else:
        reason = f"is incomplete ({reason})"
      failures.append((step, reason))
    damaged = [(step, reason) for step, reason in failures if not reason.startswith("is incomplete")]
    if any(reason.startswith("fails verification") for _, reason in damaged):
      listing = "; ".join(f"step {step} {reason}" for step, reason in damaged[:3])
      raise UserError(
        f"no checkpoint in {self.directory} verifies ({listing}); the run does not start over by "
        f"itself: restore the directory from a backup, or move it away to train from scratch"
      )
    if damaged:
      step, reason = damaged[0]
      raise UserError(
        f"no checkpoint in {self.directory} can be restored (step {step} {reason}); if the model or "
        "optimizer flags changed since the run started, use a new --output_dir"
      )
    self._set_aside(failures)
    return None

  def resume_point(self, abstract_params: Any, abstract_train_state: Any) -> str:
    """Where a rerun would resume, for messages: waits for pending saves, then verifies the steps newest first."""
    self.wait()
    skipped = []
    for step in reversed(self.all_steps()):
      if incomplete_reason(self.directory / str(step)) is not None:
        continue
      try:
        restored = self.restore(step, abstract_params, abstract_train_state)
      except VerificationError as error:
        skipped.append(f"step {step} fails verification ({error})")
        continue
      except Exception as error:  # orbax/tensorstore raise many types for damaged files
        skipped.append(f"step {step} cannot be restored ({_one_line(error, 120)})")
        continue
      note = "; ".join(skipped) + "; " if skipped else ""
      how = "verified: its checksums match" if restored.verified else "not verified: it has no checksums"
      return f"{note}the last good checkpoint is step {step} in {self.directory} ({how}), where a rerun resumes"
    if skipped:
      return "; ".join(skipped) + f"; no checkpoint in {self.directory} can be resumed from"
    return "no checkpoint was saved"

  def _set_aside(self, failures: list[tuple[int, str]]) -> None:
    """Moves unusable step directories out of the manager's way (process 0), then re-reads the step list."""
    if not failures:
      return
    for step, reason in failures:
      target = self.workdir / INCOMPLETE_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      logging.warning("checkpoint %s/%d %s: skipping it, moved to %s", self.directory, step, reason, target)
      if jax.process_index() == 0 and fileio.is_remote(target):
        fileio.move_tree(self.directory / str(step), target)  # object storage: copy + delete, recursively
      elif jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("checkpointing: unusable checkpoints set aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is on disk (UserError when it could not be written)."""
    if self._failed:
      return
    with self._storage_errors(None):
      self._manager.wait_until_finished()
    self._writing_step = None

  def close(self) -> None:
    if self._failed:
      return
    with self._storage_errors(None):
      self._manager.wait_until_finished()
      self._manager.close()
    self._writing_step = None


def _orbax_path(path: Any) -> Any:
  """The path type orbax expects: etils.epath for URIs, pathlib locally (as before)."""
  return epath.Path(str(path)) if fileio.is_remote(path) else path


def restorable_steps(workdir: str | Path) -> list[int]:
  """Steps under `WORKDIR/checkpoints` that orbax reports finalized and whose content is complete (for readers
  such as `model_io`); local or `gs://`."""
  directory = fileio.as_path(workdir) / CHECKPOINT_DIR
  try:
    steps = ocp.path.step.checkpoint_steps(_orbax_path(directory))
  except FileNotFoundError:
    return []
  return sorted(step for step in steps if incomplete_reason(directory / str(step)) is None)


def read_params(workdir: str | Path, step: int, target: Any) -> Any:
  """The verified `params` item of `WORKDIR/checkpoints/<step>` as host arrays shaped like `target` (for readers such
  as `model_io`: export, evaluation, the Python API). UserError when it cannot be read or fails verification."""
  directory = fileio.as_path(workdir) / CHECKPOINT_DIR
  if not fileio.is_remote(directory):
    directory = directory.resolve()
  manager = ocp.CheckpointManager(_orbax_path(directory), options=ocp.CheckpointManagerOptions(read_only=True))
  verified = (directory / str(step) / CHECKSUM_ITEM).exists()
  items = {"params": ocp.args.StandardRestore(target)}
  if verified:
    items[CHECKSUM_ITEM] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as error:  # orbax raises many types for damaged checkpoints
    raise UserError(f"{workdir}: checkpoint at step {step} cannot be restored ({_one_line(error, 200)})") from None
  finally:
    manager.close()
  params = jax.tree.map(np.asarray, restored["params"])
  if verified:
    try:
      verify(restored[CHECKSUM_ITEM], params=params)
    except VerificationError as error:
      others = [other for other in restorable_steps(workdir) if other != step]
      hint = f"pass --step with an older one ({', '.join(map(str, others))})" if others else "no other step exists"
      raise UserError(
        f"{directory / str(step)} fails verification ({error}): the checkpoint is damaged; {hint}"
      ) from None
  else:
    logging.warning(
      "checkpoint %s/%d has no checksums (written by an older version): read without verification", directory, step
    )
  return params
