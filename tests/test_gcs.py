"""Every path on gs://, against a real GCS JSON-API server (gcp-storage-emulator, tests/gcs_emulator.py).

The tools run as users run them (subprocesses) with only STORAGE_EMULATOR_HOST set: notes -> sentences -> vocabulary
-> shards -> pretraining (killed after its first checkpoint, rerun: bitwise the same as an uninterrupted run) ->
Hugging Face export -> `transformers` loads the export after it is copied down. Bad input on object storage gets one
line and exit 2, and leaves nothing half-written.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clinical_bert_jax import fileio, records, shard_cache
from clinical_bert_jax.errors import UserError
from cli_util import REPO, assert_one_line_error
from gcs_emulator import running_emulator
from test_pretrain import subprocess_env

BUCKET = "gs://data"
READONLY = "gs://readonly-bucket"
pytestmark = pytest.mark.slow  # the CLI tools and pretraining against the GCS emulator

NOTES = REPO / "data_prep" / "demo_corpus" / "NOTEEVENTS_synthetic.csv"
TINY = {
  "hidden_size": 32,
  "num_hidden_layers": 1,
  "num_attention_heads": 2,
  "intermediate_size": 64,
  "max_position_embeddings": 64,
  "type_vocab_size": 2,
  "hidden_act": "gelu",
  "initializer_range": 0.02,
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
  "layer_norm_eps": 1e-12,
  "model_type": "bert",
}
RUN = [
  "--max_seq_length=64",
  "--max_predictions_per_seq=10",
  "--train_batch_size=8",
  "--num_train_steps=40",
  "--num_warmup_steps=5",
  "--learning_rate=1e-3",
  "--optimizer=adamw",
  "--save_checkpoints_steps=20",  # two checkpoint writes to the emulator per run: one to resume from, the final
  "--keep_checkpoints=2",
  "--log_every_steps=10",
  "--async_checkpointing=false",
  "--seed=7",
]


@pytest.fixture(scope="module")
def emulator():
  with running_emulator(("data", "readonly-bucket")) as server:
    yield server


def _tool(module: str, *args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
  )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _objects(prefix: str) -> list[str]:
  import fsspec

  filesystem, _ = fsspec.core.url_to_fs(prefix)
  return sorted(filesystem.find(prefix))


def _upload(local: Path, uri: str) -> None:
  with fileio.atomic_write(uri, mode="wb") as handle:
    handle.write(local.read_bytes())


def test_demo_chain_with_every_path_on_gcs(emulator, compile_cache, tmp_path):
  env = subprocess_env(compile_cache, STORAGE_EMULATOR_HOST=emulator.endpoint)
  _upload(NOTES, f"{BUCKET}/notes/NOTEEVENTS.csv")

  _ok(
    _tool(
      "data_prep.format_mimic",
      f"--input={BUCKET}/notes/NOTEEVENTS.csv",
      f"--output_dir={BUCKET}/text",
      "--shard_size_notes=40",
      env=env,
    )
  )
  texts = [uri for uri in _objects(f"{BUCKET}/text") if uri.endswith(".txt")]
  assert len(texts) >= 2 and not any(".tmp" in uri for uri in _objects(BUCKET))

  _ok(
    _tool(
      "data_prep.build_vocab",
      f"--input={BUCKET}/text/*.txt",
      f"--output={BUCKET}/vocab.txt",
      "--vocab_size=600",
      "--cased",
      env=env,
    )
  )
  vocab = fileio.as_path(f"{BUCKET}/vocab.txt").read_text().splitlines()
  with fileio.atomic_write(f"{BUCKET}/bert_config.json") as handle:
    json.dump({**TINY, "vocab_size": len(vocab)}, handle)

  _ok(
    _tool(
      "data_prep.create_pretraining_data",
      f"--input={BUCKET}/text/*.txt",
      f"--vocab_file={BUCKET}/vocab.txt",
      f"--output_dir={BUCKET}/shards",
      "--max_seq_length=64",
      "--max_predictions_per_seq=10",
      "--dupe_factor=2",
      "--do_lower_case=false",
      "--progress=false",
      env=env,
    )
  )
  manifest = json.loads(fileio.as_path(f"{BUCKET}/shards/{records.MANIFEST_NAME}").read_text())
  assert manifest["totals"]["count"] >= 8

  def pretrain(workdir: str, *extra: str) -> list[str]:
    return [
      sys.executable,
      "-m",
      "clinical_bert_jax.pretrain",
      f"--input_file={BUCKET}/shards",
      f"--bert_config_file={BUCKET}/bert_config.json",
      f"--vocab_file={BUCKET}/vocab.txt",
      f"--output_dir={workdir}",
      f"--data_cache_dir={tmp_path / 'cache'}",
      *RUN,
      *extra,
    ]

  straight = subprocess.run(
    pretrain(f"{BUCKET}/straight"), env=env, capture_output=True, text=True, timeout=900, cwd=REPO
  )
  _ok(straight)

  interrupted = f"{BUCKET}/interrupted"
  first = fileio.as_path(f"{interrupted}/checkpoints/20/commit_success.txt")
  killed = subprocess.Popen(
    pretrain(interrupted), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
  )
  deadline = time.monotonic() + 180
  while not first.exists():
    assert killed.poll() is None, killed.communicate()[1][-3000:]
    assert time.monotonic() < deadline, "no checkpoint at step 20"
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL
  from clinical_bert_jax import checkpointing

  assert max(checkpointing.restorable_steps(interrupted)) == 20
  # A step that never got orbax's commit marker (a save cut short) is not a checkpoint: orbax's step API skips it.
  with fileio.atomic_write(f"{interrupted}/checkpoints/35/params/partial", mode="wb") as handle:
    handle.write(b"cut short")
  assert 35 not in checkpointing.restorable_steps(interrupted)
  resumed = subprocess.run(
    pretrain(interrupted, f"--export_hf_dir={BUCKET}/hf"),
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    cwd=REPO,
  )
  _ok(resumed)
  assert "resuming" in resumed.stdout

  # Bitwise the same model and metrics as the uninterrupted run; every workdir file is in the bucket.
  for name in ("metrics.jsonl", "flags.txt", "config.json", "vocab.txt", "loss_curve.png"):
    assert fileio.as_path(f"{interrupted}/{name}").exists(), name
  assert any("events.out.tfevents" in uri for uri in _objects(interrupted))

  def metrics(workdir: str) -> list[dict]:
    lines = fileio.as_path(f"{workdir}/metrics.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if not key.startswith("perf/")} for line in lines]

  assert metrics(interrupted) == metrics(f"{BUCKET}/straight") and len(metrics(interrupted)) == 4
  from clinical_bert_jax import model_io, weight_names

  final = [
    weight_names.flatten_params(model_io.load_model(workdir).params) for workdir in (interrupted, f"{BUCKET}/straight")
  ]  # orbax reads the checkpoints in the bucket
  assert final[0].keys() == final[1].keys()
  assert all(np.array_equal(final[0][name], final[1][name]) for name in final[0])
  local_export = fileio.local_copy(f"{BUCKET}/hf", "--export_hf_dir")
  assert json.loads((local_export / "config.json").read_text())["vocab_size"] == len(vocab)

  # transformers loads the export copied down from the bucket.
  import torch
  from transformers import AutoTokenizer, BertForPreTraining

  model = BertForPreTraining.from_pretrained(local_export).eval()
  tokenizer = AutoTokenizer.from_pretrained(local_export)
  inputs = tokenizer("The patient was admitted.", return_tensors="pt")
  with torch.no_grad():
    logits = model(**inputs).prediction_logits
  assert logits.shape[-1] == len(vocab) and torch.isfinite(logits).all()
  assert not any(".tmp-" in uri for uri in _objects(BUCKET))

  # A workdir on a bucket this machine may only read: one line, after the inputs were checked, nothing written.
  refused = subprocess.run(pretrain(f"{READONLY}/run"), env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
  assert_one_line_error(refused, f"--output_dir={READONLY}/run", "permission denied")
  assert refused.returncode == 2 and _objects(READONLY) == []


# ---------------------------------------------------------------------------------------------------- bad input
def test_missing_bucket_and_empty_glob_are_one_line_errors(emulator, compile_cache):
  env = subprocess_env(compile_cache, STORAGE_EMULATOR_HOST=emulator.endpoint)
  result = _tool("data_prep.build_vocab", "--input=gs://no-such-bucket/text/*.txt", f"--output={BUCKET}/v.txt", env=env)
  assert_one_line_error(result, "gs://no-such-bucket", "does not exist")
  assert result.returncode == 2
  result = _tool("data_prep.build_vocab", f"--input={BUCKET}/nothing/*.txt", f"--output={BUCKET}/v.txt", env=env)
  # The same message as for a local glob that matches nothing.
  assert_one_line_error(result, f"--input={BUCKET}/nothing/*.txt matches no files; check the path or glob")
  assert result.returncode == 2
  assert not fileio.as_path(f"{BUCKET}/v.txt").exists()


def test_output_on_a_read_only_bucket_is_one_line_and_writes_nothing(emulator, compile_cache):
  env = subprocess_env(compile_cache, STORAGE_EMULATOR_HOST=emulator.endpoint)
  result = _tool("data_prep.format_mimic", f"--input={NOTES}", f"--output_dir={READONLY}/text", env=env)
  assert_one_line_error(result, f"--output_dir={READONLY}/text: cannot write there: permission denied")
  assert result.returncode == 2
  assert _objects(READONLY) == []


def _shard_uri(emulator, tmp_path) -> tuple[str, bytes]:
  """A real native shard in the bucket, with its manifest."""
  writer = records.NativeShardWriter(
    tmp_path / "part-00000-of-00001.cbj", max_seq_length=16, max_predictions_per_seq=2, vocab_size=100
  )
  rng = np.random.default_rng(0)
  for _ in range(4):
    writer.write(
      {
        "input_ids": rng.integers(5, 100, 16),
        "input_mask": np.ones(16, np.int32),
        "segment_ids": np.zeros(16, np.int32),
        "masked_lm_positions": np.array([1, 2]),
        "masked_lm_ids": np.array([7, 8]),
        "masked_lm_weights": np.ones(2, np.float32),
        "next_sentence_labels": np.int32(0),
      }
    )
  info = writer.close()
  data = (tmp_path / info.name).read_bytes()
  return info.name, data


def test_a_shard_corrupted_in_the_bucket_fails_its_checksum_after_download(emulator, tmp_path):
  name, data = _shard_uri(emulator, tmp_path)
  corrupt = bytearray(data)
  corrupt[records.NATIVE_HEADER_SIZE + 3] ^= 0xFF
  with fileio.atomic_write(f"{BUCKET}/bad/{name}", mode="wb") as handle:
    handle.write(bytes(corrupt))
  cache = tmp_path / "cache"
  with pytest.raises(UserError, match=rf"--input_file: {BUCKET}/bad/{name} has checksum crc32:\w+ after download"):
    shard_cache.localize(f"{BUCKET}/bad/*.cbj", cache, "--input_file")
  assert not any(path.is_file() and path.suffix == ".cbj" for path in cache.rglob("*"))

  with fileio.atomic_write(f"{BUCKET}/good/{name}", mode="wb") as handle:
    handle.write(data)
  local = shard_cache.localize(f"{BUCKET}/good/*.cbj", cache, "--input_file")
  assert Path(local).read_bytes() == data and len(records.PretrainingData.open(local)) == 4
  assert shard_cache.localize(f"{BUCKET}/good/*.cbj", cache, "--input_file") == local  # reused, not fetched again


def test_a_full_data_cache_is_refused_before_downloading(emulator, tmp_path, monkeypatch):
  name, data = _shard_uri(emulator, tmp_path)
  with fileio.atomic_write(f"{BUCKET}/full/{name}", mode="wb") as handle:
    handle.write(data)
  cache = tmp_path / "small-cache"
  real = shard_cache.shutil.disk_usage
  monkeypatch.setattr(
    shard_cache.shutil, "disk_usage", lambda path: real(path)._replace(free=shard_cache.FREE_SPACE_MARGIN)
  )  # no room left
  with pytest.raises(UserError, match=rf"--data_cache_dir={cache} has 1.0 GiB free but the --input_file shards need"):
    shard_cache.localize(f"{BUCKET}/full/*.cbj", cache, "--input_file")
  assert not any(path.is_file() for path in cache.rglob("*"))


def test_atomic_write_on_object_storage_leaves_nothing_on_failure(emulator):
  with fileio.atomic_write(f"{BUCKET}/atomic/a.json") as handle:
    handle.write("previous")
  with pytest.raises(ValueError):
    with fileio.atomic_write(f"{BUCKET}/atomic/a.json") as handle:
      handle.write("partial")
      raise ValueError
  with pytest.raises(RuntimeError):
    with fileio.atomic_output_dir(f"{BUCKET}/atomic/out") as staging:
      (staging / "part.txt").write_text("half")
      raise RuntimeError("killed")
  assert _objects(f"{BUCKET}/atomic") == ["data/atomic/a.json"]
  assert fileio.as_path(f"{BUCKET}/atomic/a.json").read_text() == "previous"
  assert fileio.glob(f"{BUCKET}/atomic/*.json") == [f"{BUCKET}/atomic/a.json"]
  assert fileio.glob(f"{BUCKET}/atomic/*.none") == []


def test_the_documented_pod_command_takes_every_path_from_the_bucket(emulator, compile_cache, tmp_path):
  """experiments/tpu_pod.cfg as documented (YOUR_BUCKET filled in), on one CPU process: its flags parse, the XLA
  cache and workdir are on gs://, and the first input it reads is looked up in the bucket."""
  flagfile = tmp_path / "tpu_pod.cfg"
  flagfile.write_text((REPO / "experiments" / "tpu_pod.cfg").read_text().replace("YOUR_BUCKET", "data"))
  env = subprocess_env(compile_cache, devices=4, STORAGE_EMULATOR_HOST=emulator.endpoint)  # its mesh: fsdp 4
  result = _tool("clinical_bert_jax.pretrain", f"--flagfile={flagfile}", "--coordinator_address=", env=env)
  assert_one_line_error(result, "checkpoint gs://data/models/bert-base-cased not found")
  assert result.returncode == 2
  assert not fileio.as_path(f"{BUCKET}/runs/clinical_bert_pod").exists()  # nothing written before the inputs check
