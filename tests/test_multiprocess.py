"""Two processes with one CPU device each (jax.distributed, gloo collectives) train exactly like one process with two
devices on the same global batch, each process reading only its half of every batch.

Four steps with two checkpoints are enough: the comparison is per logged step and per parameter, and the run's time is
three interpreter start-ups and their compilations, not the steps."""

from __future__ import annotations

import socket
import subprocess

import jax
import numpy as np
import pytest

from clinical_bert_jax import checkpointing, model_io
from test_pretrain import (
  cli_args,
  deterministic_records,
  make_corpus,
  pretrain_command,
  subprocess_env,
)

pytestmark = pytest.mark.slow  # multi-process pretraining

STEPS = 4


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def test_two_processes_train_like_one_process_with_two_devices(tmp_path, compile_cache):
  corpus = make_corpus(tmp_path / "data", train_count=64, eval_count=32)
  overrides = {"num_train_steps": STEPS, "log_every_steps": 2, "save_checkpoints_steps": 2, "eval_input_file": ""}
  single = subprocess.run(
    pretrain_command(*cli_args(corpus, tmp_path / "single", **overrides)),
    env=subprocess_env(compile_cache, devices=2),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert single.returncode == 0, single.stderr[-3000:]
  assert "2 device(s); this process reads 16 of every 16 sequences" in single.stdout

  coordinator = f"localhost:{_free_port()}"
  command = pretrain_command(
    *cli_args(corpus, tmp_path / "multi", **overrides), f"--coordinator_address={coordinator}", "--num_processes=2"
  )
  processes = [
    subprocess.Popen(
      command + [f"--process_id={index}"],
      env=subprocess_env(compile_cache, devices=1),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for index in range(2)
  ]
  outputs = [process.communicate(timeout=600) for process in processes]
  for process, (stdout, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  for index, (stdout, _) in enumerate(outputs):
    assert f"process {index}/2: starting" in stdout and "this process reads 8 of every 16 sequences" in stdout
  assert (
    f"step {STEPS}/{STEPS}" in outputs[0][0] and f"step {STEPS}/{STEPS}" not in outputs[1][0]
  )  # only process 0 reports

  expected, actual = deterministic_records(tmp_path / "single"), deterministic_records(tmp_path / "multi")
  assert [record["step"] for record in actual] == [record["step"] for record in expected]
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    np.testing.assert_allclose(
      [got[key] for key in sorted(got)],
      [want[key] for key in sorted(want)],
      rtol=1e-5,
      atol=1e-7,
      err_msg=str(want["step"]),
    )
  assert checkpointing.restorable_steps(tmp_path / "multi") == [2, 4]
  single_params = model_io.load_model(tmp_path / "single").params
  multi_params = model_io.load_model(tmp_path / "multi").params
  for left, right in zip(jax.tree.leaves(single_params), jax.tree.leaves(multi_params)):
    np.testing.assert_allclose(right, left, atol=1e-6)
