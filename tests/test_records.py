"""Instance storage: native shards and TFRecords round-trip, TensorFlow reads ours and we read its, bad files fail."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import struct
import zlib

import numpy as np
import pytest

from clinical_bert_jax import records
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.records import (
  FEATURE_DTYPES,
  FEATURE_NAMES,
  NativeShardWriter,
  PretrainingData,
  ShardInfo,
  TFRecordWriter,
  crc32c_many,
  decode_example,
  encode_examples,
  read_manifest,
  vocab_fingerprint,
  write_manifest,
)

SEQ_LEN = 32
PREDICTIONS = 5
VOCAB_SIZE = 1000


def make_instances(
  count: int, seed: int, seq_len: int = SEQ_LEN, predictions: int = PREDICTIONS, vocab_size: int = VOCAB_SIZE
) -> list[dict[str, np.ndarray]]:
  """Well-formed instances with varied lengths, A/B splits and prediction counts; id 0 ([PAD]) may occur inside
  the real tokens, as Google's random replacement can produce it."""
  rng = np.random.default_rng(seed)
  instances = []
  for _ in range(count):
    num_tokens = int(rng.integers(3, seq_len + 1))
    b_start = int(rng.integers(1, num_tokens + 1))
    num_predictions = int(rng.integers(0, min(predictions, num_tokens - 1) + 1))
    positions = np.arange(seq_len)
    input_ids = np.where(positions < num_tokens, rng.integers(0, vocab_size, seq_len), 0).astype(np.int32)
    masked_positions = np.zeros(predictions, np.int32)
    masked_positions[:num_predictions] = np.sort(rng.choice(np.arange(1, num_tokens), num_predictions, replace=False))
    masked_ids = np.zeros(predictions, np.int32)
    masked_ids[:num_predictions] = rng.integers(0, vocab_size, num_predictions)
    instances.append(
      {
        "input_ids": input_ids,
        "input_mask": (positions < num_tokens).astype(np.int32),
        "segment_ids": ((positions >= b_start) & (positions < num_tokens)).astype(np.int32),
        "masked_lm_positions": masked_positions,
        "masked_lm_ids": masked_ids,
        "masked_lm_weights": (np.arange(predictions) < num_predictions).astype(np.float32),
        "next_sentence_labels": np.int32(rng.integers(0, 2)),
      }
    )
  return instances


def stacked(instances, order=None) -> dict[str, np.ndarray]:
  order = range(len(instances)) if order is None else order
  return {name: np.stack([np.asarray(instances[i][name]) for i in order]) for name in FEATURE_NAMES}


def assert_batches_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
  assert set(actual) == set(FEATURE_NAMES)
  for name in FEATURE_NAMES:
    assert actual[name].dtype == FEATURE_DTYPES[name], name
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def writer_info(path) -> ShardInfo:
  """The ShardInfo a reader computes, to compare with the writer's."""
  data = PretrainingData.open(str(path))
  shard = data.shards[0]
  return ShardInfo(path.name, shard.count, shard.checksum, shard.max_id)


def _crc32c_bitwise(data: bytes) -> int:
  """Textbook bit-at-a-time CRC-32C, independent of the table-driven implementation."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def test_crc32c_matches_published_vectors_and_a_bitwise_reference():
  assert int(crc32c_many([b"123456789"])[0]) == 0xE3069283  # the CRC catalogue check value
  assert int(crc32c_many([bytes(32)])[0]) == 0x8A9136AA  # RFC 3720 B.4
  assert int(crc32c_many([b"\xff" * 32])[0]) == 0x62A8AB43
  rng = np.random.default_rng(0)
  messages = [rng.bytes(int(length)) for length in [0, 1, 3, 4, 5, 17, 64, 255, 1000]]
  assert crc32c_many(messages).tolist() == [_crc32c_bitwise(message) for message in messages]


@pytest.mark.parametrize("writer_class", [NativeShardWriter, TFRecordWriter])
def test_round_trip_in_random_order(tmp_path, writer_class):
  instances = make_instances(40, seed=1)
  path = tmp_path / f"data-00000-of-00001{'.cbj' if writer_class is NativeShardWriter else '.tfrecord'}"
  writer = writer_class(path, SEQ_LEN, PREDICTIONS, VOCAB_SIZE)
  writer.write(instances[0])
  writer.write_many(instances[1:])
  info = writer.close()
  assert info.name == path.name and info.count == 40
  assert info.max_id == max(max(int(x["input_ids"].max()), int(x["masked_lm_ids"].max())) for x in instances)
  assert info.checksum.startswith("crc32:")
  data = PretrainingData.open(str(path))
  assert (len(data), data.max_seq_length, data.max_predictions_per_seq) == (40, SEQ_LEN, PREDICTIONS)
  assert data.manifest is None
  order = np.random.default_rng(2).permutation(40)
  assert_batches_equal(data.get_batch(order), stacked(instances, order))
  single = data[7]
  assert single["input_ids"].shape == (SEQ_LEN,) and single["next_sentence_labels"].shape == ()
  np.testing.assert_array_equal(single["segment_ids"], instances[7]["segment_ids"])
  assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("writer_class", [NativeShardWriter, TFRecordWriter])
def test_batch_writes_are_byte_identical_to_instance_writes(tmp_path, writer_class):
  # 2,500 instances cross the per-instance writer's chunk boundaries; the batch writer gets uneven batches, a
  # [n, 1] label column, an empty batch and single instances queued in between, as callers may mix them.
  instances = make_instances(2500, seed=21, vocab_size=70_000)
  one_by_one, batched = tmp_path / "one_by_one.bin", tmp_path / "batched.bin"
  with writer_class(one_by_one, SEQ_LEN, PREDICTIONS, 70_000) as writer:
    writer.write_many(instances)
  expected_info = dataclasses.replace(writer.info, name=batched.name)
  with writer_class(batched, SEQ_LEN, PREDICTIONS, 70_000) as writer:
    writer.write_batch(stacked(instances[:1500]))
    writer.write(instances[1500])
    tail = stacked(instances[1501:])
    writer.write_batch({name: values[:0] for name, values in tail.items()})
    writer.write_batch(tail | {"next_sentence_labels": tail["next_sentence_labels"][:, None]})
  assert one_by_one.read_bytes() == batched.read_bytes()
  assert writer.info == expected_info and expected_info.count == 2500


def test_batch_writes_reject_malformed_rows_and_fix_shapes_when_not_given(tmp_path):
  instances = make_instances(5, seed=22)
  batch = stacked(instances)
  batch["input_mask"] = batch["input_mask"].copy()
  batch["input_mask"][3, 0] = 0  # a hole in the mask: every instance has at least 3 tokens
  for writer_class in (NativeShardWriter, TFRecordWriter):
    writer = writer_class(tmp_path / "bad.bin", SEQ_LEN, PREDICTIONS, VOCAB_SIZE)
    writer.write(instances[0])
    with pytest.raises(ValueError, match=r"instance 4 written to .*bad\.bin: input_mask"):
      writer.write_batch(batch)
    writer.abort()
    with pytest.raises(ValueError, match="input_ids has the shape"):
      writer_class(tmp_path / "flat.bin", SEQ_LEN, PREDICTIONS, VOCAB_SIZE).write_batch(instances[0])
    with pytest.raises(ValueError, match="lacks the feature 'segment_ids'"):
      writer_class(tmp_path / "partial.bin", SEQ_LEN, PREDICTIONS, VOCAB_SIZE).write_batch(
        {name: values for name, values in batch.items() if name != "segment_ids"}
      )
  assert os.listdir(tmp_path) == []
  with TFRecordWriter(tmp_path / "unknown_shapes.tfrecord") as writer:
    writer.write_batch(stacked(instances))
  assert writer.info.count == 5
  assert_batches_equal(
    PretrainingData.open(str(tmp_path / "unknown_shapes.tfrecord")).get_batch(np.arange(5)), stacked(instances)
  )


def test_native_shard_is_compact_and_switches_to_uint32_ids_for_large_vocabularies(tmp_path):
  small, large = tmp_path / "small.cbj", tmp_path / "large.cbj"
  instances = make_instances(10, seed=3)
  with NativeShardWriter(small, SEQ_LEN, PREDICTIONS, vocab_size=65536) as writer:
    writer.write_many(instances)
  big_instances = make_instances(10, seed=3, vocab_size=120_000)
  with NativeShardWriter(large, SEQ_LEN, PREDICTIONS, vocab_size=120_000) as writer:
    writer.write_many(big_instances)
  record_u16 = 2 * SEQ_LEN + 2 * PREDICTIONS + 2 * PREDICTIONS + 7
  record_u32 = 4 * SEQ_LEN + 4 * PREDICTIONS + 2 * PREDICTIONS + 7
  overhead = records.NATIVE_HEADER_SIZE + records.NATIVE_FOOTER_SIZE
  assert small.stat().st_size == overhead + 10 * record_u16
  assert large.stat().st_size == overhead + 10 * record_u32
  data = PretrainingData.open(str(large))
  assert data.get_batch(np.arange(10))["input_ids"].max() >= 65536  # ids above uint16 survive
  assert_batches_equal(data.get_batch(np.arange(10)), stacked(big_instances))


@pytest.mark.parametrize("writer_class", [NativeShardWriter, TFRecordWriter])
def test_unmasked_instances_with_zero_prediction_slots(tmp_path, writer_class):
  instances = make_instances(6, seed=4, predictions=0)
  path = tmp_path / "unmasked.bin"
  with writer_class(path, SEQ_LEN, 0, VOCAB_SIZE) as writer:
    writer.write_many(instances)
  batch = PretrainingData.open(str(path)).get_batch(np.arange(6))
  assert batch["masked_lm_positions"].shape == (6, 0) and batch["masked_lm_weights"].shape == (6, 0)
  assert_batches_equal(batch, stacked(instances))


def test_mixed_shards_manifest_and_global_order(tmp_path):
  first, second, third = make_instances(7, seed=5), make_instances(0, seed=6), make_instances(9, seed=7)
  infos = []
  for name, writer_class, instances in [
    ("d-00000-of-00003.cbj", NativeShardWriter, first),
    ("d-00001-of-00003.cbj", NativeShardWriter, second),
    ("d-00002-of-00003.tfrecord", TFRecordWriter, third),
  ]:
    with writer_class(tmp_path / name, SEQ_LEN, PREDICTIONS, VOCAB_SIZE) as writer:
      writer.write_many(instances)
    infos.append(writer.info)
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("".join(f"t{i}\n" for i in range(VOCAB_SIZE)), encoding="utf-8")
  sha256, size = vocab_fingerprint(vocab)
  assert sha256 == hashlib.sha256(vocab.read_bytes()).hexdigest() and size == VOCAB_SIZE
  write_manifest(
    tmp_path,
    {
      "format": "cbj",
      "vocab_sha256": sha256,
      "vocab_size": size,
      "do_lower_case": False,
      "max_seq_length": SEQ_LEN,
      "max_predictions_per_seq": PREDICTIONS,
      "masking": "static",
      "dupe_factor": 5,
      "seed": 12345,
      "flags": {"short_seq_prob": 0.1},
      "shards": infos,
    },
  )
  manifest = read_manifest(tmp_path)
  assert manifest["total_instances"] == 16 and manifest["tool_version"] == records.TOOL_VERSION
  assert [shard["count"] for shard in manifest["shards"]] == [7, 0, 9]

  for spec in (str(tmp_path), f"{tmp_path}/*.cbj,{tmp_path}/*.tfrecord", [str(tmp_path / "d-*")]):
    data = PretrainingData.open(spec)
    assert len(data) == 16 and data.manifest == manifest
    assert_batches_equal(data.get_batch(np.arange(15, -1, -1)), stacked(first + third, range(15, -1, -1)))
  data.validate_against(VOCAB_SIZE, sha256, SEQ_LEN, PREDICTIONS)
  clone = pickle.loads(pickle.dumps(data))  # data loaders hand the dataset to worker processes
  assert_batches_equal(clone.get_batch(np.array([8, 0])), stacked(first + third, [8, 0]))


def test_writer_reports_what_the_reader_sees(tmp_path):
  path = tmp_path / "x.cbj"
  writer = NativeShardWriter(path, SEQ_LEN, PREDICTIONS, VOCAB_SIZE)
  writer.write_many(make_instances(2500, seed=8))  # more than one internal chunk
  info = writer.close()
  assert info == writer_info(path)
  tf_path = tmp_path / "x.tfrecord"
  with TFRecordWriter(tf_path) as tf_writer:
    tf_writer.write_many(make_instances(3, seed=9))
  assert tf_writer.info.checksum == writer_info(tf_path).checksum == f"crc32:{zlib.crc32(tf_path.read_bytes()):08x}"
  assert records.shard_file_name("train", 3, 8) == "train-00003-of-00008.cbj"
  assert records.shard_file_name("train", 0, 1, records.FORMAT_TFRECORD) == "train-00000-of-00001.tfrecord"
  for file_format in (records.FORMAT_NATIVE, records.FORMAT_TFRECORD):
    with records.open_writer(file_format, tmp_path / f"w.{file_format}", SEQ_LEN, PREDICTIONS, VOCAB_SIZE) as writer:
      writer.write_many(make_instances(2, seed=9))
    assert len(PretrainingData.open(str(tmp_path / f"w.{file_format}"))) == 2
  with pytest.raises(UserError, match="unknown output format 'csv'"):
    records.open_writer("csv", tmp_path / "w.csv", SEQ_LEN, PREDICTIONS, VOCAB_SIZE)


def test_interrupted_writers_leave_no_file(tmp_path):
  with pytest.raises(RuntimeError):
    with NativeShardWriter(tmp_path / "a.cbj", SEQ_LEN, PREDICTIONS, VOCAB_SIZE) as writer:
      writer.write_many(make_instances(3, seed=10))
      raise RuntimeError("generator crashed")
  unfinished = TFRecordWriter(tmp_path / "b.tfrecord")
  unfinished.write_many(make_instances(3, seed=10))
  assert not (tmp_path / "b.tfrecord").exists()  # only a hidden temporary name until close()
  unfinished.abort()
  assert os.listdir(tmp_path) == []


def test_malformed_instances_are_rejected_by_writers(tmp_path):
  good = make_instances(1, seed=11)[0]
  broken = {
    "holes in input_mask": {**good, "input_mask": np.r_[good["input_mask"][:-1], 1]},
    "ids outside the vocabulary": {**good, "input_ids": np.r_[VOCAB_SIZE, good["input_ids"][1:]]},
    "wrong length": {**good, "input_ids": good["input_ids"][:-1]},
    "missing feature": {name: value for name, value in good.items() if name != "segment_ids"},
    "bad label": {**good, "next_sentence_labels": 2},
  }
  for case, instance in broken.items():
    writer = NativeShardWriter(tmp_path / "bad.cbj", SEQ_LEN, PREDICTIONS, VOCAB_SIZE)
    with pytest.raises(ValueError, match=r"instance 2 written to .*bad\.cbj"):
      writer.write_many([good, good, instance, good])
      writer.close()
    assert not (tmp_path / "bad.cbj").exists(), case

  # Instances are copied on write: a generator may reuse its arrays for the next instance.
  reused = {name: np.array(value) for name, value in good.items()}
  with NativeShardWriter(tmp_path / "reuse.cbj", SEQ_LEN, PREDICTIONS, VOCAB_SIZE) as writer:
    writer.write(reused)
    reused["input_ids"][:] = 0
  np.testing.assert_array_equal(PretrainingData.open(str(tmp_path / "reuse.cbj"))[0]["input_ids"], good["input_ids"])


def test_incomplete_and_corrupt_files_are_rejected_with_the_file_name(tmp_path):
  instances = make_instances(20, seed=12)
  native, tfrecord = tmp_path / "n.cbj", tmp_path / "t.tfrecord"
  for writer_class, path in [(NativeShardWriter, native), (TFRecordWriter, tfrecord)]:
    with writer_class(path, SEQ_LEN, PREDICTIONS, VOCAB_SIZE) as writer:
      writer.write_many(instances)
  content = native.read_bytes()

  killed = tmp_path / "killed.cbj"
  killed.write_bytes(content[: -records.NATIVE_FOOTER_SIZE])  # what a killed run without rename would leave
  with pytest.raises(UserError, match=r"killed\.cbj.*no valid footer"):
    PretrainingData.open(str(killed))
  flipped = bytearray(content)
  flipped[records.NATIVE_HEADER_SIZE + 5] ^= 1
  corrupt = tmp_path / "corrupt.cbj"
  corrupt.write_bytes(bytes(flipped))
  with pytest.raises(UserError, match=r"corrupt\.cbj.*checksum"):
    PretrainingData.open(str(corrupt))
  assert len(PretrainingData.open(str(corrupt), verify_checksums=False)) == 20

  tf_content = tfrecord.read_bytes()
  truncated = tmp_path / "truncated.tfrecord"
  truncated.write_bytes(tf_content[:-7])
  with pytest.raises(UserError, match=r"truncated\.tfrecord: record 19"):
    PretrainingData.open(str(truncated))
  huge = tmp_path / "huge.tfrecord"
  huge.write_bytes(struct.pack("<Q", 1 << 40) + bytes(8))
  with pytest.raises(UserError, match=r"huge\.tfrecord: record 0 claims 1099511627776 bytes"):
    PretrainingData.open(str(huge))
  stub = tmp_path / "stub.cbj"
  stub.write_bytes(content[:20])
  with pytest.raises(UserError, match=r"stub\.cbj: native shard header is cut short"):
    PretrainingData.open(str(stub))
  tf_flipped = bytearray(tf_content)
  tf_flipped[-10] ^= 1  # inside the last record's payload
  bad_data = tmp_path / "bad_data.tfrecord"
  bad_data.write_bytes(bytes(tf_flipped))
  opened = PretrainingData.open(str(bad_data))  # framing is intact; the data CRC is checked on read
  opened.get_batch(np.arange(19))
  with pytest.raises(UserError, match=r"bad_data\.tfrecord: record 19 has a bad data checksum"):
    opened.get_batch(np.array([19]))


def test_missing_empty_and_inconsistent_inputs(tmp_path):
  with pytest.raises(UserError, match="matches no files"):
    PretrainingData.open(str(tmp_path / "nothing-*.cbj"))
  with pytest.raises(UserError, match="no pretraining data"):
    PretrainingData.open(" , ")
  with NativeShardWriter(tmp_path / "empty.cbj", SEQ_LEN, PREDICTIONS, VOCAB_SIZE):
    pass
  with pytest.raises(UserError, match="holds no instances"):
    PretrainingData.open(str(tmp_path / "empty.cbj"))
  with NativeShardWriter(tmp_path / "long.cbj", SEQ_LEN * 2, PREDICTIONS, VOCAB_SIZE) as writer:
    writer.write_many(make_instances(2, seed=13, seq_len=SEQ_LEN * 2))
  with NativeShardWriter(tmp_path / "short.cbj", SEQ_LEN, PREDICTIONS, VOCAB_SIZE) as writer:
    writer.write_many(make_instances(2, seed=13))
  with pytest.raises(UserError, match="same settings"):
    PretrainingData.open(f"{tmp_path}/long.cbj,{tmp_path}/short.cbj")

  # A manifest that disagrees with the files (another run's leftovers) is caught on open.
  (tmp_path / "long.cbj").unlink()
  (tmp_path / "empty.cbj").unlink()
  base = {
    "format": "cbj",
    "vocab_sha256": "0" * 64,
    "vocab_size": VOCAB_SIZE,
    "do_lower_case": True,
    "max_seq_length": SEQ_LEN,
    "max_predictions_per_seq": PREDICTIONS,
    "masking": "static",
  }
  write_manifest(tmp_path, {**base, "shards": [{"name": "short.cbj", "count": 3}]})
  with pytest.raises(UserError, match=r"short\.cbj holds 2 instances but manifest\.json lists 3"):
    PretrainingData.open(str(tmp_path / "*.cbj"))
  write_manifest(tmp_path, {**base, "shards": [{"name": "other.cbj", "count": 2}]})
  with pytest.raises(UserError, match="not listed"):
    PretrainingData.open(str(tmp_path / "short.cbj"))
  (tmp_path / "manifest.json").write_text("{not json", encoding="utf-8")
  with pytest.raises(UserError, match="not valid JSON"):
    read_manifest(tmp_path)


def test_validate_against_names_the_mismatch(tmp_path):
  with NativeShardWriter(tmp_path / "d.cbj", SEQ_LEN, PREDICTIONS, VOCAB_SIZE) as writer:
    writer.write_many(make_instances(5, seed=14))
  with TFRecordWriter(tmp_path / "e.tfrecord") as writer:
    writer.write_many(make_instances(5, seed=15))
  native = PretrainingData.open(str(tmp_path / "d.cbj"))
  native.validate_against(VOCAB_SIZE, None, SEQ_LEN, PREDICTIONS)
  native.validate_against(VOCAB_SIZE, None, SEQ_LEN, None)
  cases = [
    ((VOCAB_SIZE, None, 64, PREDICTIONS), r"max_seq_length mismatch: .*d\.cbj has 32 but training uses 64"),
    ((VOCAB_SIZE, None, SEQ_LEN, 20), r"max_predictions_per_seq mismatch: .*has 5 but training uses 20"),
    ((VOCAB_SIZE + 1, None, SEQ_LEN, PREDICTIONS), r"vocab_size mismatch: .*1000 ids .* 1001"),
  ]
  for arguments, message in cases:
    with pytest.raises(UserError, match=message):
      native.validate_against(*arguments)

  tfrecords = PretrainingData.open(str(tmp_path / "e.tfrecord"))
  largest = int(tfrecords.get_batch(np.arange(5))["input_ids"].max())
  tfrecords.validate_against(largest, None, SEQ_LEN, PREDICTIONS)  # no manifest: ids are checked on read
  with pytest.raises(UserError, match=rf"e\.tfrecord: token id {largest} is outside the vocabulary of {largest}"):
    tfrecords.get_batch(np.arange(5))

  write_manifest(
    tmp_path,
    {
      "format": "cbj",
      "vocab_sha256": "a" * 64,
      "vocab_size": VOCAB_SIZE,
      "do_lower_case": True,
      "max_seq_length": SEQ_LEN,
      "max_predictions_per_seq": PREDICTIONS,
      "masking": "static",
      "shards": [{"name": "d.cbj", "count": 5}],
    },
  )
  with pytest.raises(UserError, match="vocabulary mismatch: .*sha256 a{64} .*sha256 b{64}"):
    PretrainingData.open(str(tmp_path / "d.cbj")).validate_against(VOCAB_SIZE, "b" * 64, SEQ_LEN, PREDICTIONS)


def test_unpacked_repeated_fields_decode_like_packed_ones():
  # Hand-encoded Example with unpacked int64 values (legal protobuf; some writers emit it).
  def length_delimited(tag: int, payload: bytes) -> bytes:
    return bytes([tag, len(payload)]) + payload

  unpacked_ints = b"".join(bytes([0x08, value]) for value in (3, 0, 127))
  unpacked_floats = b"".join(b"\x0d" + struct.pack("<f", value) for value in (1.0, 0.5))
  entries = length_delimited(
    0x0A, length_delimited(0x0A, b"ids") + length_delimited(0x12, length_delimited(0x1A, unpacked_ints))
  ) + length_delimited(
    0x0A, length_delimited(0x0A, b"w") + length_delimited(0x12, length_delimited(0x12, unpacked_floats))
  )
  decoded = decode_example(length_delimited(0x0A, entries))
  assert decoded["ids"].tolist() == [3, 0, 127] and decoded["w"].tolist() == [1.0, 0.5]
  instances = make_instances(2, seed=16)
  for example, instance in zip(encode_examples(stacked(instances)), instances):
    assert all(np.array_equal(decode_example(example)[name], np.atleast_1d(instance[name])) for name in FEATURE_NAMES)


@pytest.mark.slow  # imports TensorFlow (~15 s)
def test_tensorflow_reads_our_tfrecords_and_we_read_tensorflows(tmp_path):
  tf = pytest.importorskip("tensorflow")
  instances = make_instances(12, seed=17)
  ours = tmp_path / "ours.tfrecord"
  with TFRecordWriter(ours) as writer:
    writer.write_many(instances)
  # run_pretraining.py's feature spec (bert-pretraining.md §3).
  spec = {name: tf.io.FixedLenFeature([SEQ_LEN], tf.int64) for name in records.SEQUENCE_FEATURES}
  spec |= {
    "masked_lm_positions": tf.io.FixedLenFeature([PREDICTIONS], tf.int64),
    "masked_lm_ids": tf.io.FixedLenFeature([PREDICTIONS], tf.int64),
    "masked_lm_weights": tf.io.FixedLenFeature([PREDICTIONS], tf.float32),
    "next_sentence_labels": tf.io.FixedLenFeature([1], tf.int64),
  }
  parsed = [tf.io.parse_single_example(record, spec) for record in tf.data.TFRecordDataset(str(ours))]
  assert len(parsed) == 12
  expected = stacked(instances)
  for name in FEATURE_NAMES:
    np.testing.assert_array_equal(
      np.stack([p[name].numpy() for p in parsed]).reshape(expected[name].shape), expected[name], err_msg=name
    )

  theirs = tmp_path / "theirs.tfrecord"
  with tf.io.TFRecordWriter(str(theirs)) as writer:
    for instance in instances:
      feature = {}
      for name in FEATURE_NAMES:
        values = np.atleast_1d(instance[name]).tolist()
        feature[name] = (
          tf.train.Feature(float_list=tf.train.FloatList(value=values))
          if name == "masked_lm_weights"
          else tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        )
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  data = PretrainingData.open(str(theirs))
  assert (len(data), data.max_seq_length, data.max_predictions_per_seq) == (12, SEQ_LEN, PREDICTIONS)
  assert_batches_equal(data.get_batch(np.arange(12)), expected)
  # TensorFlow's serialisation takes the vectorised reader (records.wire._canonical_feature_spans), not the fallback.
  assert data.shards[0]._read_canonical(np.arange(12)) is not None


def test_vectorised_tfrecord_reader_equals_the_general_parser(tmp_path, monkeypatch):
  instances = make_instances(40, seed=18)
  path = tmp_path / "ours.tfrecord"
  with TFRecordWriter(path) as writer:
    writer.write_many(instances)
  order = np.random.default_rng(0).permutation(40)
  fast = PretrainingData.open(str(path)).get_batch(order)
  assert PretrainingData.open(str(path)).shards[0]._read_canonical(order) is not None
  monkeypatch.setattr(records.tfrecord, "_canonical_feature_spans", lambda *args: None)  # where the reader calls it
  general = PretrainingData.open(str(path)).get_batch(order)
  assert_batches_equal(fast, general)
  assert_batches_equal(fast, {name: values[order] for name, values in stacked(instances).items()})


def test_vectorised_tfrecord_reader_decodes_every_varint_length(tmp_path, monkeypatch):
  """Ids of 1-5 varint bytes, positions of 1 or 2 (seq 300), and batches whose features are all one byte or mixed:
  the vectorised reader's single-byte and varint paths both equal the general parser and the written values."""
  instances = make_instances(60, seed=19, seq_len=300, vocab_size=2**31 - 1)
  rng = np.random.default_rng(1)
  for instance in instances:
    scale = 2 ** rng.integers(0, 31, instance["input_ids"].shape)  # values of every byte length
    instance["input_ids"] = (instance["input_ids"] % scale).astype(np.int32)
  path = tmp_path / "wide.tfrecord"
  with TFRecordWriter(path) as writer:
    writer.write_many(instances)
  expected = stacked(instances)
  short = np.flatnonzero(expected["masked_lm_positions"].max(axis=1) < 128)  # positions one byte each
  assert 0 < short.size < 60
  for order in (np.random.default_rng(0).permutation(60), short, short[::-1], np.array([short[0], 59 - short[0]])):
    data = PretrainingData.open(str(path))
    assert data.shards[0]._read_canonical(order) is not None
    assert_batches_equal(data.get_batch(order), {name: values[order] for name, values in expected.items()})
  monkeypatch.setattr(records.tfrecord, "_canonical_feature_spans", lambda *args: None)
  order = np.arange(60)
  assert_batches_equal(PretrainingData.open(str(path)).get_batch(order), expected)
