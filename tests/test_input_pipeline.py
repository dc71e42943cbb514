"""Input pipeline: global shuffle, per-host slices, epoch boundaries, resumable position, prefetch, validation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.input_pipeline import (
  EvalInput,
  Prefetcher,
  PretrainingInput,
  needs_dynamic_masking,
  open_pretraining_data,
  prefetch_to_device,
)
from clinical_bert_jax.records import NativeShardWriter, PretrainingData, vocab_fingerprint, write_manifest
from clinical_bert_jax.sharding import make_mesh
from cli_util import XLA_TEST_FLAG

SEQ_LEN, PREDICTIONS, VOCAB_SIZE = 16, 4, 200
ID_OFFSET = 10  # input_ids[:, 1] = ID_OFFSET + instance number: tells which instance a row is
SHARD_SIZES = (40, 40, 23)  # 103 instances: no batch size used below divides it
NUM_INSTANCES = sum(SHARD_SIZES)


def _instance(number: int, masked: bool) -> dict[str, np.ndarray]:
  input_ids = np.zeros(SEQ_LEN, np.int64)
  input_ids[:6] = [2, ID_OFFSET + number, 5, 3, 6, 3]  # [CLS] A A [SEP] B [SEP]
  predictions = 1 if masked else 0
  return {
    "input_ids": input_ids,
    "input_mask": (np.arange(SEQ_LEN) < 6).astype(np.int64),
    "segment_ids": ((np.arange(SEQ_LEN) >= 4) & (np.arange(SEQ_LEN) < 6)).astype(np.int64),
    "masked_lm_positions": np.array([2] * predictions + [0] * (PREDICTIONS - predictions)),
    "masked_lm_ids": np.array([5] * predictions + [0] * (PREDICTIONS - predictions)),
    "masked_lm_weights": np.array([1.0] * predictions + [0.0] * (PREDICTIONS - predictions)),
    "next_sentence_labels": number % 2,
  }


def _write_shards(directory, masked: bool = True):
  directory.mkdir(parents=True, exist_ok=True)
  number = 0
  for shard, size in enumerate(SHARD_SIZES):
    with NativeShardWriter(directory / f"part-{shard}.cbj", SEQ_LEN, PREDICTIONS, VOCAB_SIZE) as writer:
      for _ in range(size):
        writer.write(_instance(number, masked))
        number += 1
  return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def data(data_dir):
  return PretrainingData.open(str(data_dir / "*.cbj"))


def _numbers(batch) -> list[int]:
  return (batch["input_ids"][:, 1] - ID_OFFSET).tolist()


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def test_process_slices_concatenate_to_the_single_process_batch(data):
  single = PretrainingInput(data, global_batch_size=8, seed=3)
  hosts = [PretrainingInput(data, global_batch_size=8, seed=3, process_index=p, process_count=2) for p in range(2)]
  assert hosts[0].host_batch_size == 4
  for _ in range(30):  # 12 batches per epoch: crosses two epoch boundaries
    expected = next(single)
    parts = [next(host) for host in hosts]
    assert _numbers(parts[0]) != _numbers(parts[1])
    for name, values in expected.items():
      np.testing.assert_array_equal(np.concatenate([part[name] for part in parts]), values, err_msg=name)
  assert single.get_state() == hosts[0].get_state() == hosts[1].get_state()


def test_each_epoch_is_a_fresh_permutation_and_drop_remainder_skips_the_tail(data):
  pipeline = PretrainingInput(data, global_batch_size=8, seed=0)
  assert pipeline.batches_per_epoch == 12
  epochs = []
  for epoch in range(3):
    seen = sum((_numbers(batch) for batch in _take(pipeline, 12)), [])
    assert len(set(seen)) == 96, "an instance repeated within an epoch"
    assert seen == pipeline.epoch_order(epoch)[:96].tolist()
    assert pipeline.get_state()["epoch"] == epoch + 1 and pipeline.get_state()["index"] == 0
    epochs.append(seen)
  assert epochs[0] != epochs[1] != epochs[2]
  skipped = [set(range(NUM_INSTANCES)) - set(seen) for seen in epochs]
  assert skipped[0] != skipped[1]  # the dropped tail is a different few instances each epoch


def test_keeping_the_remainder_streams_into_the_next_epoch(data):
  pipeline = PretrainingInput(data, global_batch_size=10, seed=1, drop_remainder=False)
  stream = sum((_numbers(batch) for batch in _take(pipeline, 21)), [])  # 210 = 2 epochs + 4
  expected = np.concatenate([pipeline.epoch_order(0), pipeline.epoch_order(1), pipeline.epoch_order(2)[:4]])
  assert stream == expected.tolist()
  assert sorted(stream[:NUM_INSTANCES]) == list(range(NUM_INSTANCES))  # nothing dropped or repeated
  assert pipeline.get_state()["epoch"] == 2 and pipeline.get_state()["index"] == 4


def test_resume_from_saved_state_continues_exactly_mid_epoch(data):
  reference = PretrainingInput(data, global_batch_size=8, seed=5)
  _take(reference, 7)
  saved = json.loads(json.dumps(reference.get_state()))  # what the checkpoint stores
  assert saved["epoch"] == 0 and saved["index"] == 56
  expected = _take(reference, 10)  # crosses into epoch 1

  resumed = PretrainingInput(data, global_batch_size=8, seed=5)
  resumed.set_state(saved)
  for want, got in zip(expected, _take(resumed, 10)):
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)

  # The position is global: a run resumed on two processes reads the same global batches.
  hosts = [PretrainingInput(data, global_batch_size=8, seed=5, process_index=p, process_count=2) for p in range(2)]
  for host in hosts:
    host.set_state(saved)
  for want in expected[:3]:
    assert sum((_numbers(next(host)) for host in hosts), []) == _numbers(want)


def test_seed_and_shuffle_control_the_order(data):
  def first_epoch(**kwargs):
    return PretrainingInput(data, global_batch_size=8, **kwargs).epoch_order(0).tolist()

  assert first_epoch(seed=1) == first_epoch(seed=1)
  assert first_epoch(seed=1) != first_epoch(seed=2)
  assert first_epoch(seed=1, shuffle=False) == list(range(NUM_INSTANCES))
  assert sorted(first_epoch(seed=2)) == list(range(NUM_INSTANCES))


def test_position_from_other_data_or_seed_is_refused(data):
  state = PretrainingInput(data, global_batch_size=8, seed=1).get_state()
  with pytest.raises(UserError, match="seed=1 but this run has seed=2"):
    PretrainingInput(data, global_batch_size=8, seed=2).set_state(state)
  with pytest.raises(UserError, match="num_instances"):
    PretrainingInput(data, global_batch_size=8, seed=1).set_state({**state, "num_instances": 7})
  with pytest.raises(UserError, match="malformed"):
    PretrainingInput(data, global_batch_size=8, seed=1).set_state({"epoch": 0})
  with pytest.raises(UserError, match="corrupt"):
    PretrainingInput(data, global_batch_size=8, seed=1).set_state({**state, "index": NUM_INSTANCES + 1})


def test_batch_size_errors_name_the_flag(data):
  with pytest.raises(UserError, match=r"--train_batch_size=9 is not divisible by the 2 processes"):
    PretrainingInput(data, global_batch_size=9, seed=0, process_index=0, process_count=2)
  with pytest.raises(UserError, match=r"--train_batch_size=128 is larger than the 103 training instances"):
    PretrainingInput(data, global_batch_size=128, seed=0)
  with pytest.raises(UserError, match=r"--eval_batch_size=0 must be a positive"):
    EvalInput(data, global_batch_size=0)


def test_eval_input_reads_in_order_whole_batches_only(data):
  evaluation = EvalInput(data, global_batch_size=16, max_batches=100)
  assert len(evaluation) == 6  # 103 // 16
  assert sum((_numbers(batch) for batch in evaluation), []) == list(range(96))
  assert [_numbers(batch) for batch in evaluation] == [_numbers(batch) for batch in evaluation]  # restartable
  hosts = [EvalInput(data, global_batch_size=16, max_batches=2, process_index=p, process_count=2) for p in range(2)]
  assert [_numbers(batch) for batch in hosts[1]] == [list(range(8, 16)), list(range(24, 32))]
  with pytest.raises(UserError, match="--eval_batch_size=128 is larger than the 103 evaluation instances"):
    EvalInput(data, global_batch_size=128)


def test_open_pretraining_data_validates_against_the_model(data_dir, tmp_path):
  kwargs = dict(vocab_size=VOCAB_SIZE, vocab_sha256=None, max_seq_length=SEQ_LEN, max_predictions_per_seq=PREDICTIONS)
  assert len(open_pretraining_data(str(data_dir / "*.cbj"), **kwargs)) == NUM_INSTANCES
  with pytest.raises(UserError, match=r"--input_file=.*nothing-\*\.cbj.*matches no files"):
    open_pretraining_data(str(tmp_path / "nothing-*.cbj"), **kwargs)
  with pytest.raises(UserError, match="--input_file is empty"):
    open_pretraining_data(" ", **kwargs)
  NativeShardWriter(tmp_path / "empty.cbj", SEQ_LEN, PREDICTIONS, VOCAB_SIZE).close()
  with pytest.raises(UserError, match=r"--input_file=.*empty\.cbj.*holds no instances"):
    open_pretraining_data(str(tmp_path / "empty.cbj"), **kwargs)
  with pytest.raises(UserError, match=r"--eval_input_file=.*max_seq_length mismatch.*--max_seq_length=16"):
    open_pretraining_data(str(data_dir), flag="--eval_input_file", **{**kwargs, "max_seq_length": 128})
  with pytest.raises(UserError, match="max_predictions_per_seq mismatch"):
    open_pretraining_data(str(data_dir), **{**kwargs, "max_predictions_per_seq": 20})
  with pytest.raises(UserError, match="vocab_size mismatch"):
    open_pretraining_data(str(data_dir), **{**kwargs, "vocab_size": 300})


def test_unmasked_data_is_detected_and_its_prediction_width_not_checked(data, tmp_path):
  assert not needs_dynamic_masking(data)
  unmasked_dir = _write_shards(tmp_path / "unmasked", masked=False)
  kwargs = dict(vocab_size=VOCAB_SIZE, vocab_sha256=None, max_seq_length=SEQ_LEN, max_predictions_per_seq=20)
  assert needs_dynamic_masking(open_pretraining_data(str(unmasked_dir / "*.cbj"), **kwargs))

  # A manifest decides when present, and its vocabulary fingerprint is checked.
  vocab_file = tmp_path / "vocab.txt"
  vocab_file.write_text("".join(f"t{i}\n" for i in range(VOCAB_SIZE)), encoding="utf-8")
  sha256, size = vocab_fingerprint(vocab_file)
  shards = [{"name": f"part-{i}.cbj", "count": count} for i, count in enumerate(SHARD_SIZES)]
  write_manifest(
    unmasked_dir,
    {
      "format": "cbj",
      "vocab_sha256": sha256,
      "vocab_size": size,
      "do_lower_case": False,
      "max_seq_length": SEQ_LEN,
      "max_predictions_per_seq": PREDICTIONS,
      "masking": "none",
      "shards": shards,
    },
  )
  assert needs_dynamic_masking(open_pretraining_data(str(unmasked_dir), **{**kwargs, "vocab_sha256": sha256}))
  with pytest.raises(UserError, match="vocabulary mismatch"):
    open_pretraining_data(str(unmasked_dir), **{**kwargs, "vocab_sha256": "0" * 64})


def test_prefetcher_returns_the_same_batches_and_the_consumed_position(data):
  expected_input = PretrainingInput(data, global_batch_size=8, seed=4)
  expected = [(_numbers(next(expected_input)), expected_input.get_state()) for _ in range(6)]
  with Prefetcher(PretrainingInput(data, global_batch_size=8, seed=4), buffer_size=3) as prefetcher:
    assert prefetcher.get_state()["index"] == 0
    for numbers, state in expected:
      assert _numbers(next(prefetcher)) == numbers
      assert prefetcher.get_state() == state  # not the read-ahead position


def test_prefetcher_reraises_producer_errors_and_ends_with_its_source():
  def failing():
    yield {"x": np.zeros(1)}
    raise UserError("shard is corrupt")

  prefetcher = Prefetcher(failing())
  next(prefetcher)
  for _ in range(2):
    with pytest.raises(UserError, match="shard is corrupt"):
      next(prefetcher)
  prefetcher.close()
  with Prefetcher(iter([1, 2])) as finite:
    assert list(finite) == [1, 2]

  blocked = Prefetcher(iter(range(1000)), buffer_size=1)  # the producer waits on a full queue
  blocked.close()
  assert not any(thread.name == "input-prefetch" for thread in threading.enumerate())


def test_prefetch_to_device_shards_batches_and_tracks_the_position(data):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",))
  source = PretrainingInput(data, global_batch_size=16, seed=2)
  reference = PretrainingInput(data, global_batch_size=16, seed=2)
  for sharding in (NamedSharding(mesh, PartitionSpec("data")), jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"))):
    on_device = prefetch_to_device(source, 2, sharding)
    for _ in range(3):
      batch = next(on_device)
      want = next(reference)
      assert on_device.get_state() == reference.get_state()
      assert len(batch["input_ids"].sharding.device_set) == 8
      assert batch["input_ids"].addressable_shards[0].data.shape == (2, SEQ_LEN)
      for name, values in want.items():
        np.testing.assert_array_equal(np.asarray(batch[name]), values, err_msg=name)
    assert source.get_state() != on_device.get_state()  # read ahead, but the consumed position is what counts
    reference.set_state(source.get_state())  # the second pass continues where the first one read to


def _two_process_worker(port: str, process_id: str, data_glob: str, output: str) -> None:
  """One of two real JAX processes (4 CPU devices each): loads its slices and assembles global batches."""
  from jax.experimental import multihost_utils

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=int(process_id))
  source = PretrainingInput(PretrainingData.open(data_glob), global_batch_size=16, seed=9)
  on_device = prefetch_to_device(Prefetcher(source), 2, make_mesh(-1, 1, 1))
  batches = []
  for _ in range(8):  # 6 batches per epoch: crosses an epoch boundary
    batch = next(on_device)
    assert batch["input_ids"].shape == (16, SEQ_LEN)
    batches.append(_numbers(multihost_utils.process_allgather(batch, tiled=True)))
  on_device.close()
  if jax.process_index() == 0:
    with open(output, "w", encoding="utf-8") as handle:
      json.dump({"batches": batches, "state": on_device.get_state()}, handle)


@pytest.mark.slow  # two JAX processes
def test_two_real_processes_assemble_the_single_process_global_batches(data_dir, tmp_path):
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = str(probe.getsockname()[1])
  output = tmp_path / "batches.json"
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {XLA_TEST_FLAG}", "JAX_PLATFORMS": "cpu"}
  workers = [
    subprocess.Popen(
      [sys.executable, __file__, port, str(process), str(data_dir / "*.cbj"), str(output)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for process in range(2)
  ]
  logs = [worker.communicate(timeout=120)[0] for worker in workers]
  assert [worker.returncode for worker in workers] == [0, 0], "\n".join(log[-2000:] for log in logs)

  reference = PretrainingInput(PretrainingData.open(str(data_dir / "*.cbj")), global_batch_size=16, seed=9)
  result = json.loads(output.read_text(encoding="utf-8"))
  assert result["batches"] == [_numbers(batch) for batch in _take(reference, 8)]
  assert result["state"] == reference.get_state()


if __name__ == "__main__":
  _two_process_worker(*sys.argv[1:])
