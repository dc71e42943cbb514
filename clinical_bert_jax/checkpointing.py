"""Checkpoints of a pretraining run: save every N steps (asynchronously), keep the last K, resume from the newest one
that is complete.

Layout (docs/ARCHITECTURE.md): an orbax `CheckpointManager` under `WORKDIR/checkpoints/<step>/` with three items:

* `params`: StandardSave of the parameter pytree, restorable on its own (export, evaluation, `model_io`);
* `train_state`: StandardSave of `{opt_state, rng, step}`;
* `data_state`: JsonSave of the input pipeline's position (and the open metric window, see `metrics_io`).

Saving is asynchronous: `save` returns once the arrays are copied to host memory (orbax's synchronous device-to-host
transfer, so the train step may donate and overwrite the device buffers right away) and the files are written in a
background thread. Orbax writes each step into a temporary directory, puts `commit_success.txt` in it and renames it,
so a step directory missing that marker (or one whose restore fails) was not finished: `restore_latest` skips it with
a warning, moves it to `WORKDIR/checkpoints_incomplete/` (kept for inspection; it would otherwise block the next
save of that step) and falls back to the previous step. If no step restores at all, that is not treated as damage but
as a workdir written by a different model/optimizer configuration, and reported as a UserError.

All processes of a multi-process run call every method here (orbax coordinates them); only process 0 moves files.

The workdir may be a `gs://` URI (fileio.as_path): orbax writes there directly (tensorstore for the arrays, with
`commit_success.txt` as the completion marker on object storage), and steps are discovered through orbax's public
`ocp.path.step.checkpoint_steps` (finalized steps only) before the content check of `incomplete_reason`.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath
from absl import logging

from clinical_bert_jax import fileio
from clinical_bert_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"
INCOMPLETE_DIR = "checkpoints_incomplete"
COMMIT_MARKER = "commit_success.txt"
METADATA_FILE = "_CHECKPOINT_METADATA"
ITEMS = ("params", "train_state", "data_state")


@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  train_state: Any
  data_state: dict[str, Any]


def _one_line(error: BaseException, limit: int = 240) -> str:
  return " ".join(f"{type(error).__name__}: {error}".split())[:limit]


def incomplete_reason(step_dir: Any) -> str | None:
  """Why a step directory is not a finished checkpoint, or None when it looks complete."""
  missing = [name for name in (COMMIT_MARKER, METADATA_FILE, *ITEMS) if not (step_dir / name).exists()]
  return f"missing {', '.join(missing)}" if missing else None


class CheckpointStore:
  """The run's checkpoints; wraps one orbax CheckpointManager."""

  def __init__(self, workdir: str | Path, keep: int, async_save: bool = True):
    self.workdir = fileio.as_path(workdir)
    if not fileio.is_remote(self.workdir):
      self.workdir = self.workdir.resolve()
    self.directory = self.workdir / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    try:
      self._manager = ocp.CheckpointManager(_orbax_path(self.directory), item_names=ITEMS, options=options)
    except OSError as error:
      raise fileio.storage_error(self.directory, error, action="cannot create it (check --output_dir)") from None

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, params: Any, train_state: Mapping[str, Any], data_state: Mapping[str, Any]) -> bool:
    """Starts saving `step` (global jax.Arrays in multi-process runs); False if that step is already saved."""
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                              train_state=ocp.args.StandardSave(dict(train_state)),
                              data_state=ocp.args.JsonSave(dict(data_state)))
    return bool(self._manager.save(step, args=args, force=True))

  def restore(self, step: int, abstract_params: Any, abstract_train_state: Any) -> Restored:
    """Restores `step` into the shapes, dtypes and shardings of the abstract (ShapeDtypeStruct) targets."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        train_state=ocp.args.StandardRestore(abstract_train_state),
        data_state=ocp.args.JsonRestore()))
    return Restored(step, restored["params"], restored["train_state"], restored["data_state"])

  def restore_latest(self, abstract_params: Any, abstract_train_state: Any) -> Restored | None:
    """The newest complete checkpoint, or None for a fresh run. See the module docstring for incomplete ones."""
    steps = self.all_steps()
    failures: list[tuple[int, str]] = []
    for step in reversed(steps):
      reason = incomplete_reason(self.directory / str(step))
      if reason is None:
        try:
          restored = self.restore(step, abstract_params, abstract_train_state)
        except Exception as error:  # orbax/tensorstore raise many types for damaged files
          reason = f"restore failed: {_one_line(error)}"
        else:
          self._set_aside(failures)
          return restored
      failures.append((step, reason))
    if failures and any(reason.startswith("restore failed") for _, reason in failures):
      step, reason = next((step, reason) for step, reason in failures if reason.startswith("restore failed"))
      raise UserError(f"no checkpoint in {self.directory} can be restored (step {step}: {reason}); if the model or "
                      "optimizer flags changed since the run started, use a new --output_dir")
    self._set_aside(failures)
    return None

  def _set_aside(self, failures: list[tuple[int, str]]) -> None:
    """Moves unfinished step directories out of the manager's way (process 0), then re-reads the step list."""
    if not failures:
      return
    for step, reason in failures:
      target = self.workdir / INCOMPLETE_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      logging.warning("checkpoint %s/%d is incomplete (%s): skipping it, moved to %s", self.directory, step, reason,
                      target)
      if jax.process_index() == 0 and fileio.is_remote(target):
        fileio.move_tree(self.directory / str(step), target)  # object storage: copy + delete, recursively
      elif jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("checkpointing: incomplete checkpoints set aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


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
