"""Checkpoints: a run killed (SIGKILL) and preempted (SIGTERM) ends bitwise identical to an uninterrupted one;
incomplete checkpoints are skipped; a workdir of another configuration is refused."""

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
from test_pretrain import (LEARNING_RUN, cli_args, compile_cache,  # noqa: F401 (compile_cache is a fixture)
                           deterministic_records, make_corpus, pretrain_command, subprocess_env)

pytestmark = pytest.mark.slow  # trains and spawns pretrain

STEPS = LEARNING_RUN["num_train_steps"]


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
  every = LEARNING_RUN["log_every_steps"]
  return (checkpoint_step // every + 1) * every


def test_killed_then_preempted_run_ends_bitwise_identical_to_an_uninterrupted_one(tmp_path, compile_cache):
  corpus = make_corpus(tmp_path / "data", train_count=2048, tfrecord=True)  # Google-format training records
  env = subprocess_env(compile_cache)
  overrides = LEARNING_RUN  # the learning test's run, so its compiled programs come from the cache
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"

  done = subprocess.run(pretrain_command(*cli_args(corpus, straight, **overrides)), env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]

  command = pretrain_command(*cli_args(corpus, interrupted, **overrides))
  checkpoints = interrupted / "checkpoints"
  killed = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_until(lambda: (checkpoints / "100").is_dir(), killed, "the checkpoint at step 100")
  killed.kill()
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL
  killed_at = max(checkpointing.restorable_steps(interrupted))
  assert killed_at < STEPS

  # A checkpoint directory that never got orbax's commit marker must be skipped (and set aside), not resumed from.
  (checkpoints / "350").mkdir()
  preempted = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_until(lambda: (checkpoints / "200").is_dir(), preempted, "the checkpoint at step 200")
  preempted.send_signal(signal.SIGTERM)
  stdout, stderr = preempted.communicate(timeout=120)
  assert preempted.returncode == 0, stderr[-3000:]
  assert "resuming" in stdout and "received SIGTERM" in stdout
  assert _first_logged_step(stdout) == _next_log_step(killed_at)  # it began at the checkpoint, not at step 0
  assert "eval at step 0" not in stdout
  assert "checkpoints/350 is incomplete" in stderr
  assert not (checkpoints / "350").exists() and any((interrupted / checkpointing.INCOMPLETE_DIR).iterdir())
  stopped_at = max(checkpointing.restorable_steps(interrupted))
  assert 200 <= stopped_at < STEPS

  finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert "resuming" in finished.stdout
  assert _first_logged_step(finished.stdout) == _next_log_step(stopped_at)

  assert deterministic_records(interrupted) == deterministic_records(straight)
  assert [record["step"] for record in deterministic_records(straight) if "train/loss" in record] == list(
      range(10, STEPS + 1, 10))
  expected, actual = model_io.load_model(straight), model_io.load_model(interrupted)
  assert expected.step == actual.step == STEPS
  for name, (left, right) in _flat_pairs(expected.params, actual.params):
    assert np.array_equal(left, right), name
  assert checkpointing.restorable_steps(interrupted) == [300, 350, 400]  # keep_checkpoints=3


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
      "20", "30", "40"]
  assert sum("is incomplete" in record.getMessage() for record in caplog.records) == 3
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
  path.write_text("".join(json.dumps({"step": step, "train/loss": 1.0 / (step + 1)}) + "\n" for step in (0, 10, 20))
                  + '{"step": 30, "train/lo')  # torn by SIGKILL mid-write
  metrics_io.MetricsWriter(tmp_path, resume_step=10).close()
  assert [record["step"] for record in metrics_io.read_metrics(path)] == [0, 10]
  writer = metrics_io.MetricsWriter(tmp_path, resume_step=None)  # killed before its first checkpoint: start over
  writer.write(0, {"eval/loss": 2.5})
  writer.close()
  assert metrics_io.read_metrics(path) == [{"step": 0, "eval/loss": 2.5}]
