"""Checkpoints: a run killed (SIGKILL) and preempted (SIGTERM) ends bitwise identical to an uninterrupted one;
incomplete checkpoints are skipped; damaged ones fail verification against the checksums saved with them; a workdir of
another configuration is refused."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clinical_bert_jax import checkpointing, metrics_io, model_io
from clinical_bert_jax.errors import UserError
from conftest import REFERENCE_RUN
from test_pretrain import (
  Corpus,
  cli_args,
  deterministic_records,
  pretrain_command,
  subprocess_env,
  write_dataset,
)

pytestmark = pytest.mark.slow  # trains and spawns pretrain

# The session's reference run (tests/conftest.py: test_pretrain's 40-step run of 16 records, evaluating 48 batches at
# steps 0, 20 and 40), shared with test_faults, so its uninterrupted run is trained once per test run; here the
# interrupted run checkpoints every 5 steps, so that each interruption lands well after one and well before the end;
# 40 steps cross the 256 records' epoch boundary twice.
RESUME_RUN = {**REFERENCE_RUN, "save_checkpoints_steps": 5, "keep_checkpoints": 3}
STEPS = REFERENCE_RUN["num_train_steps"]


def _wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      output = process.communicate()
      pytest.fail(f"run ended (status {process.returncode}) before {what}:\n{output[0][-2000:]}\n{output[1][-3000:]}")
    if time.monotonic() > deadline:
      process.kill()
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.01)


def _first_logged_step(stdout: str) -> int:
  """The step of an attempt's first progress line (`step N/TOTAL ...`)."""
  return int(re.search(r"\bstep (\d+)/\d+", stdout).group(1))


def _next_log_step(checkpoint_step: int) -> int:
  every = 10  # cli_args' log_every_steps
  return (checkpoint_step // every + 1) * every


def test_killed_then_preempted_run_ends_bitwise_identical_to_an_uninterrupted_one(
  tmp_path, reference_run, compile_cache
):
  """Killed (SIGKILL) once its first checkpoint is written, then resumed past a never-committed checkpoint directory
  and preempted (SIGTERM) as soon as the resumed attempt logs its first step, then finished: metrics and parameters
  equal the uninterrupted run's bit for bit, each attempt began at the newest checkpoint.

  The uninterrupted run is the session's reference run (tests/conftest.py), trained from the same records in our
  shard format and checkpointed every 10 steps: neither the training files' format nor the checkpoint interval may
  change a bit of the result."""
  shared, reference = reference_run
  train = write_dataset(tmp_path / "train", shared.vocab, 256, seed=1, tfrecord=True)  # Google-format records
  corpus = Corpus(shared.vocab, shared.model_config, train, shared.eval)
  env = subprocess_env(compile_cache, PYTHONUNBUFFERED="1")
  overrides = RESUME_RUN
  straight, interrupted = reference / "run", tmp_path / "interrupted"

  command = pretrain_command(*cli_args(corpus, interrupted, **overrides))
  checkpoints = interrupted / "checkpoints"
  killed = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first_saved = lambda: (checkpoints / "5").is_dir() and checkpointing.restorable_steps(interrupted)
  _wait_until(first_saved, killed, "the checkpoint at step 5")
  killed.kill()
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL
  killed_at = max(checkpointing.restorable_steps(interrupted))
  assert killed_at < STEPS

  # A checkpoint directory that never got orbax's commit marker must be skipped (and set aside), not resumed from.
  (checkpoints / "35").mkdir()
  preempted = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines: list[str] = []
  logged = lambda: lines.append(preempted.stdout.readline()) or re.match(r"step \d+/", lines[-1])
  _wait_until(logged, preempted, "the resumed attempt's first step line")
  preempted.send_signal(signal.SIGTERM)
  stdout, stderr = preempted.communicate(timeout=120)
  stdout = "".join(lines) + stdout
  assert preempted.returncode == 0, stderr[-3000:]
  assert "resuming" in stdout and "received SIGTERM" in stdout
  assert _first_logged_step(stdout) == _next_log_step(killed_at)  # it began at the checkpoint, not at step 0
  assert "eval at step 0" not in stdout
  assert "checkpoints/35 is incomplete" in stderr
  assert not (checkpoints / "35").exists() and any((interrupted / checkpointing.INCOMPLETE_DIR).iterdir())
  stopped_at = max(checkpointing.restorable_steps(interrupted))
  assert _next_log_step(killed_at) <= stopped_at < STEPS

  finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert "resuming" in finished.stdout
  assert _first_logged_step(finished.stdout) == _next_log_step(stopped_at)

  assert deterministic_records(interrupted) == deterministic_records(straight)
  assert [record["step"] for record in deterministic_records(straight) if "train/loss" in record] == list(
    range(10, STEPS + 1, 10)
  )
  expected, actual = model_io.load_model(straight), model_io.load_model(interrupted)
  assert expected.step == actual.step == STEPS
  for name, (left, right) in _flat_pairs(expected.params, actual.params):
    assert np.array_equal(left, right), name
  assert checkpointing.restorable_steps(interrupted) == [30, 35, 40]  # keep_checkpoints=3


def _flat_pairs(left, right):
  flat_left = jax.tree_util.tree_flatten_with_path(left)[0]
  flat_right = jax.tree.leaves(right)
  assert len(flat_left) == len(flat_right)
  return [(jax.tree_util.keystr(path), (np.asarray(a), np.asarray(b))) for (path, a), b in zip(flat_left, flat_right)]


# ----------------------------------------------------------------------------------- CheckpointStore directly
def _state(value: float):
  params = {"dense": {"kernel": jnp.full((3, 4), value), "bias": jnp.full((4,), value)}}
  train_state = {"opt_state": {"mu": params}, "rng": jnp.zeros((2,), jnp.uint32), "step": jnp.asarray(int(value))}
  return params, train_state


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_incomplete_latest_checkpoints_are_skipped_and_set_aside(tmp_path, caplog):
  store = checkpointing.CheckpointStore(tmp_path, keep=5)
  for step in (10, 20, 30):
    store.save(step, *_state(step), data_state={"input": {"index": step}})
  store.close()
  directory = tmp_path / checkpointing.CHECKPOINT_DIR
  (directory / "30" / checkpointing.COMMIT_MARKER).unlink()  # never committed
  (directory / "40").mkdir()  # created, nothing written
  damaged = directory / "20" / "params"
  for path in sorted(damaged.rglob("*")):  # committed but its array data is gone: restore fails
    if path.is_file() and path.parent.name == "d":
      path.unlink()
  assert checkpointing.restorable_steps(tmp_path) == [10, 20]

  store = checkpointing.CheckpointStore(tmp_path, keep=5)
  params, train_state = _state(0)
  restored = store.restore_latest(_abstract(params), _abstract(train_state))
  assert restored.step == 10 and restored.data_state == {"input": {"index": 10}}
  assert float(restored.params["dense"]["kernel"][0, 0]) == 10.0 and int(restored.train_state["step"]) == 10
  assert store.all_steps() == [10]
  assert sorted(path.name.split("-")[0] for path in (tmp_path / checkpointing.INCOMPLETE_DIR).iterdir()) == [
    "20",
    "30",
    "40",
  ]
  messages = [record.getMessage() for record in caplog.records]
  assert sum("is incomplete" in message for message in messages) == 2
  assert sum("/20 cannot be restored" in message for message in messages) == 1
  assert store.save(20, *_state(20), data_state={})  # the step number is free again
  store.close()


def test_checkpoints_of_another_configuration_are_refused_and_kept(tmp_path):
  store = checkpointing.CheckpointStore(tmp_path, keep=2)
  store.save(5, *_state(5), data_state={})
  store.close()
  params, train_state = _state(0)
  train_state["opt_state"] = {"mu": params, "nu": params}  # e.g. another optimizer
  store = checkpointing.CheckpointStore(tmp_path, keep=2)
  with pytest.raises(UserError, match="no checkpoint .* can be restored .*new --output_dir"):
    store.restore_latest(_abstract(params), _abstract(train_state))
  store.close()
  assert checkpointing.restorable_steps(tmp_path) == [5]


def test_empty_workdir_starts_fresh(tmp_path):
  store = checkpointing.CheckpointStore(tmp_path / "run", keep=1)
  assert store.restore_latest(*map(_abstract, _state(0))) is None
  store.close()


def test_resumed_metrics_drop_what_the_interrupted_attempt_logged_after_its_checkpoint(tmp_path):
  path = tmp_path / metrics_io.METRICS_FILE
  path.write_text(
    "".join(json.dumps({"step": step, "train/loss": 1.0 / (step + 1)}) + "\n" for step in (0, 10, 20))
    + '{"step": 30, "train/lo'
  )  # torn by SIGKILL mid-write
  metrics_io.MetricsWriter(tmp_path, resume_step=10).close()
  assert [record["step"] for record in metrics_io.read_metrics(path)] == [0, 10]
  writer = metrics_io.MetricsWriter(tmp_path, resume_step=None)  # killed before its first checkpoint: start over
  writer.write(0, {"eval/loss": 2.5})
  writer.close()
  assert metrics_io.read_metrics(path) == [{"step": 0, "eval/loss": 2.5}]


# ------------------------------------------------------------------------------------------------------ checksums
def _random_state(seed: int):
  rng = np.random.default_rng(seed)
  params = {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(256,)), jnp.bfloat16),
    }
  }
  train_state = {
    "opt_state": {"mu": params},
    "rng": jnp.asarray([seed, 1], jnp.uint32),
    "step": jnp.asarray(seed, jnp.int32),
  }
  return params, train_state


def _flip(path, offset: int | None = None, count: int = 4) -> None:
  data = bytearray(path.read_bytes())
  offset = len(data) // 2 if offset is None else offset
  data[offset : offset + count] = bytes(byte ^ 0xFF for byte in data[offset : offset + count])
  path.write_bytes(bytes(data))


def _largest_file(directory):
  return max((path for path in directory.rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)


def test_array_checksums_ignore_sharding_and_catch_any_single_change():
  """The checksum is a function of the global values only (how the array is split over devices does not matter), and
  changing one element (also just its sign bit, or swapping two elements) changes it."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  values = np.random.default_rng(0).normal(size=(16, 24)).astype(np.float32)
  reference = checkpointing.array_checksums({"a": values})
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
  for spec in (PartitionSpec("x", "y"), PartitionSpec("y", "x"), PartitionSpec(None, "x"), PartitionSpec()):
    placed = jax.device_put(values, NamedSharding(mesh, spec))
    assert checkpointing.array_checksums({"a": placed}) == reference, spec
  variants = []
  for change in range(3):
    other = values.copy()
    if change == 0:
      other[3, 5] = np.nextafter(other[3, 5], np.float32(np.inf))  # the last bit of one element
    elif change == 1:
      other[[0, 15], [0, 23]] *= -1  # the sign bits of two elements
    else:
      other[[2, 7]] = other[[7, 2]]  # two rows swapped
    variants.append(checkpointing.array_checksums({"a": other})["['a']"])
  assert len(set(variants + [reference["['a']"]])) == 4
  for dtype in (np.int32, np.uint8, np.float16, np.bool_):  # every dtype a train state holds
    assert (
      checkpointing.array_checksums({"a": values.astype(dtype)})
      != checkpointing.array_checksums({"a": (values + 1).astype(dtype)})
      or dtype == np.bool_
    )


def test_a_damaged_checkpoint_that_still_decodes_is_named_and_skipped(tmp_path, caplog):
  """Bytes overwritten in the array data of the newest step: orbax reads finite, wrong numbers without complaint; the
  checksums catch it, the step is set aside in one log line and the previous verified step is resumed."""
  store = checkpointing.CheckpointStore(tmp_path, keep=5)
  for step in (10, 20):
    store.save(step, *_random_state(step), data_state={"input": {"index": step}})
  store.close()
  directory = tmp_path / checkpointing.CHECKPOINT_DIR
  _flip(_largest_file(directory / "20" / "train_state"))

  store = checkpointing.CheckpointStore(tmp_path, keep=5)
  with pytest.raises(checkpointing.VerificationError, match=r"checksum mismatch in train_state\['opt_state'\]"):
    store.restore(20, *map(_abstract, _random_state(0)))
  restored = store.restore_latest(*map(_abstract, _random_state(0)))
  assert restored.step == 10 and restored.verified
  np.testing.assert_array_equal(restored.params["dense"]["kernel"], _random_state(10)[0]["dense"]["kernel"])
  lines = [record.getMessage() for record in caplog.records if "fails verification" in record.getMessage()]
  assert len(lines) == 1 and "checkpoints/20 fails verification" in lines[0] and "\n" not in lines[0]
  assert store.all_steps() == [10]
  store.close()


def test_when_no_checkpoint_verifies_the_run_stops_instead_of_starting_over(tmp_path):
  store = checkpointing.CheckpointStore(tmp_path, keep=5)
  store.save(10, *_random_state(10), data_state={"input": {"index": 10}})
  store.close()
  _flip(_largest_file(tmp_path / checkpointing.CHECKPOINT_DIR / "10" / "params"))
  store = checkpointing.CheckpointStore(tmp_path, keep=5)
  with pytest.raises(UserError, match="no checkpoint in .* verifies .*step 10 fails verification.*does not start over"):
    store.restore_latest(*map(_abstract, _random_state(0)))
  store.close()
  assert checkpointing.restorable_steps(tmp_path) == [10]  # kept where it was, for the user to inspect


def test_data_state_and_checksum_files_are_verified_too(tmp_path):
  store = checkpointing.CheckpointStore(tmp_path, keep=5)
  store.save(10, *_random_state(10), data_state={"input": {"index": 10, "epoch": 0}})
  store.close()
  step_dir = tmp_path / checkpointing.CHECKPOINT_DIR / "10"
  metadata = step_dir / "data_state" / "metadata"
  metadata.write_text(metadata.read_text().replace('"index": 10', '"index": 11'))  # still valid JSON
  store = checkpointing.CheckpointStore(tmp_path, keep=5)
  with pytest.raises(checkpointing.VerificationError, match="data_state"):
    store.restore(10, *map(_abstract, _random_state(0)))
  store.close()


def test_old_checkpoints_without_checksums_restore_with_a_warning(tmp_path, caplog):
  """Checkpoints written before verification existed: resumed (refusing would strand every existing run), with a
  warning naming the step; readers (export, cbj.load) say the same."""
  import shutil

  store = checkpointing.CheckpointStore(tmp_path, keep=5)
  store.save(10, *_random_state(10), data_state={"input": {"index": 10}})
  store.close()
  shutil.rmtree(tmp_path / checkpointing.CHECKPOINT_DIR / "10" / checkpointing.CHECKSUM_ITEM)
  store = checkpointing.CheckpointStore(tmp_path, keep=5)
  restored = store.restore_latest(*map(_abstract, _random_state(0)))
  store.close()
  assert restored.step == 10 and not restored.verified
  assert any("/10 has no checksums" in record.getMessage() for record in caplog.records)
