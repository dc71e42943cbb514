"""Pod behaviour on one machine: two JAX processes (jax.distributed, gloo), one of them preempted (SIGTERM).

JAX's preemption service (on by default with jax.distributed) receives the notice on the preempted host, spreads it
to every host, and the hosts agree on a step (`reached_preemption_sync_point`); all of them save a checkpoint there and
stop cleanly, so a rerun resumes from a step every host finished.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from clinical_bert_jax import checkpointing
from test_pretrain import cli_args, make_corpus, pretrain_command, subprocess_env

STEPS = 4000
pytestmark = pytest.mark.slow  # multi-process pretraining


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def test_a_preempted_host_makes_every_host_save_at_the_agreed_step(tmp_path, compile_cache):
  corpus = make_corpus(tmp_path / "data", train_count=256, eval_count=32)
  workdir = tmp_path / "pod"
  overrides = {
    "num_train_steps": STEPS,
    "log_every_steps": 1000,
    "save_checkpoints_steps": 5,
    "keep_checkpoints": 2,
    "eval_input_file": "",
    "async_checkpointing": "false",
  }
  command = pretrain_command(
    *cli_args(corpus, workdir, **overrides), f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"
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
  try:
    deadline = time.monotonic() + 400
    while not checkpointing.restorable_steps(workdir):
      assert all(process.poll() is None for process in processes), processes[0].communicate()[1][-3000:]
      assert time.monotonic() < deadline, "no checkpoint"
      time.sleep(0.1)
    processes[1].send_signal(signal.SIGTERM)  # only the non-primary host gets the notice
    outputs = [process.communicate(timeout=300) for process in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  assert "preemption notice" in outputs[0][0], outputs[0][0][-2000:]  # process 0 heard of it through JAX
  saved = max(checkpointing.restorable_steps(workdir))
  assert 5 <= saved < STEPS and f"saved a checkpoint at step {saved}" in outputs[0][0]


def test_profile_steps_and_compilation_cache_dir(tmp_path, compile_cache):
  from cli_util import assert_one_line_error

  corpus = make_corpus(tmp_path / "data", train_count=64, eval_count=32)
  workdir, cache = tmp_path / "run", tmp_path / "xla_cache"
  overrides = {"num_train_steps": 4, "save_checkpoints_steps": 4, "log_every_steps": 2, "eval_input_file": ""}
  done = subprocess.run(
    pretrain_command(
      *cli_args(corpus, workdir, **overrides), "--profile_steps=2,3", f"--compilation_cache_dir={cache}"
    ),
    env=subprocess_env(compile_cache),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert list((workdir / "profile").rglob("*.xplane.pb"))  # TensorBoard's profile plugin / Perfetto read these
  assert any(cache.iterdir())  # the compiled train step is in the persistent cache
  bad = subprocess.run(
    pretrain_command(*cli_args(corpus, tmp_path / "bad", **overrides), "--profile_steps=3"),
    env=subprocess_env(compile_cache),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert_one_line_error(bad, "--profile_steps=3 must be START,END")
  assert not (tmp_path / "bad").exists()
