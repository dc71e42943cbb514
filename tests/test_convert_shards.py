"""data_prep.convert_shards: TFRecords ↔ native shards, instance for instance, with a manifest, atomically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clinical_bert_jax.records import NativeShardWriter, PretrainingData, TFRecordWriter
from cli_util import assert_one_line_error, run_module
from data_prep.convert_shards import convert_shards
from test_records import VOCAB_SIZE, assert_batches_equal, make_instances, stacked

pytestmark = pytest.mark.slow  # runs the convert_shards CLI


def test_tfrecords_to_native_and_back_keep_every_instance_in_order(tmp_path):
  instances = make_instances(30, seed=21)
  source = tmp_path / "google"
  source.mkdir()
  for index, part in enumerate((instances[:17], instances[17:])):
    with TFRecordWriter(source / f"tf_examples-{index}.tfrecord") as writer:
      writer.write_many(part)
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("".join(f"t{i}\n" for i in range(VOCAB_SIZE)))

  result = run_module(
    "data_prep.convert_shards",
    f"--input={source}/*.tfrecord",
    f"--output_dir={tmp_path}/native",
    "--output_format=native",
    f"--vocab_file={vocab}",
    "--do_lower_case=false",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  manifest = json.loads((tmp_path / "native" / "manifest.json").read_text())
  assert manifest["format"] == "cbj" and manifest["vocab_size"] == VOCAB_SIZE and manifest["masking"] == "static"
  assert [shard["count"] for shard in manifest["shards"]] == [17, 13]
  native = PretrainingData.open(str(tmp_path / "native"))
  assert_batches_equal(native.get_batch(np.arange(30)), stacked(instances))

  # Back to TFRecords from the directory (its manifest gives vocabulary and casing): byte-identical to the input.
  manifest = convert_shards(str(tmp_path / "native"), tmp_path / "tfrecord", "tfrecord")
  assert manifest["do_lower_case"] is False
  for index in range(2):
    written = tmp_path / "tfrecord" / f"instances-{index:05d}-of-00002.tfrecord"
    assert written.read_bytes() == (source / f"tf_examples-{index}.tfrecord").read_bytes()


def test_bad_input_gets_one_line_and_writes_nothing(tmp_path):
  with NativeShardWriter(tmp_path / "a.cbj", 32, 5, VOCAB_SIZE) as writer:
    writer.write_many(make_instances(3, seed=22))
  result = run_module(
    "data_prep.convert_shards",
    f"--input={tmp_path}/a.cbj",
    f"--output_dir={tmp_path}/out",
    "--output_format=tfrecord",
    "--do_lower_case=true",
  )
  assert_one_line_error(result, "--vocab_file")
  result = run_module(
    "data_prep.convert_shards",
    f"--input={tmp_path}/missing-*.tfrecord",
    f"--output_dir={tmp_path}/out",
    "--vocab_file=/nonexistent/vocab.txt",
    "--do_lower_case=true",
  )
  assert_one_line_error(result)
  (tmp_path / "bad.tfrecord").write_bytes(b"\x05\x00\x00")
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("a\nb\n")
  result = run_module(
    "data_prep.convert_shards",
    f"--input={tmp_path}/bad.tfrecord",
    f"--output_dir={tmp_path}/out",
    f"--vocab_file={vocab}",
    "--do_lower_case=true",
  )
  assert_one_line_error(result, "bad.tfrecord")
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
