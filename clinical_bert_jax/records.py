"""Storage of BERT pretraining instances: native memory-mapped shards, TFRecord files, manifests and readers.

An *instance* is what Google's `create_pretraining_data.py` writes for one sequence pair: a dict of numpy arrays
with exactly its TFRecord feature names (bert-pretraining.md §3):

  input_ids, input_mask, segment_ids      int32 [max_seq_length], 0-padded
  masked_lm_positions, masked_lm_ids      int32 [max_predictions_per_seq], 0-padded
  masked_lm_weights                       float32 [max_predictions_per_seq], 1.0 real / 0.0 padding
  next_sentence_labels                    int32 [] (0 = B really follows A, 1 = B is random)

Two on-disk formats hold them:

* the native shard (`*.cbj`): fixed-size little-endian records after a 64-byte header and before a 24-byte footer,
  so a reader `np.memmap`s the file and fancy-indexes any batch of records without parsing. Only what cannot be
  derived is stored (ids, number of real tokens, start of segment B, predictions, label); the footer holds the
  record count, a CRC-32 of the payload and the largest id, so a shard from a killed run (no footer) is rejected and
  ids can be checked against the vocabulary without a scan. The exact layout is in docs/data-formats.md.
* TFRecord (`*.tfrecord`): `tf.train.Example` protos with Google's feature names and types, framed with masked
  CRC-32C, readable by TensorFlow and by Google's `run_pretraining.py`. Encoded and decoded here in numpy, without
  importing TensorFlow (which is optional for users and slow to import).

Writers take single instances (`write`, buffered into vectorised chunks) or whole [n, ...] batches (`write_batch`,
the generator's path: no per-instance copies); either way gives the same bytes. They stream to a temporary name
and rename on `close()`, so a partial shard never exists under its final name.
`PretrainingData` opens any mix of both formats as one random-access dataset for the training input pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import math
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from clinical_bert_jax import __version__
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.fileio import atomic_write
from clinical_bert_jax.vocab import vocab_fingerprint  # noqa: F401  (records.vocab_fingerprint: its old home)

# Feature names and dtypes in Google's order (create_pretraining_data.write_instance_to_example_files).
SEQUENCE_FEATURES = ("input_ids", "input_mask", "segment_ids")
PREDICTION_FEATURES = ("masked_lm_positions", "masked_lm_ids", "masked_lm_weights")
FEATURE_NAMES = SEQUENCE_FEATURES + PREDICTION_FEATURES + ("next_sentence_labels",)
FEATURE_DTYPES = {name: np.int32 for name in FEATURE_NAMES} | {"masked_lm_weights": np.float32}

NATIVE_SUFFIX = ".cbj"
TFRECORD_SUFFIX = ".tfrecord"
FORMAT_NATIVE = "cbj"
FORMAT_TFRECORD = "tfrecord"
MANIFEST_NAME = "manifest.json"
TOOL_VERSION = __version__

NATIVE_MAGIC = b"CBJINST\x00"
NATIVE_FOOTER_MAGIC = b"CBJEND\x00\x00"
NATIVE_VERSION = 1
# magic, version, header size, max_seq_length, max_predictions_per_seq, bytes per id, record size, vocab size.
_HEADER = struct.Struct("<8sIIIIIII")
NATIVE_HEADER_SIZE = 64
# magic, record count, CRC-32 of the payload, largest id stored.
_FOOTER = struct.Struct("<8sQII")
NATIVE_FOOTER_SIZE = _FOOTER.size  # 24
_MAX_NATIVE_SEQ_LENGTH = 65535  # positions and lengths are stored as uint16
_UINT16_VOCAB_LIMIT = 65536

_WRITE_CHUNK = 1024  # instances encoded per vectorised batch
_MAX_TFRECORD_BYTES = 1 << 24  # an instance of 65,535 tokens is under 1 MB; anything far larger is not one


# ----------------------------------------------------------------------------------------------------------------
# Shard bookkeeping and manifests
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardInfo:
  """What a writer reports on close; goes into `manifest.json` as one entry of `shards`.

  `checksum` is "crc32:<8 hex>" of the record payload (native) or of the whole file (TFRecord); `max_id` is the
  largest token id written (padding zeros included), used to check a shard against a vocabulary without reading it.
  """
  name: str
  count: int
  checksum: str
  max_id: int

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def shard_file_name(prefix: str, index: int, num_shards: int, file_format: str = FORMAT_NATIVE) -> str:
  """`<prefix>-00003-of-00008.cbj` (or `.tfrecord`): sorts in shard order and tells how many shards to expect."""
  suffix = {FORMAT_NATIVE: NATIVE_SUFFIX, FORMAT_TFRECORD: TFRECORD_SUFFIX}[file_format]
  return f"{prefix}-{index:05d}-of-{num_shards:05d}{suffix}"


_REQUIRED_MANIFEST_KEYS = ("format", "vocab_sha256", "vocab_size", "do_lower_case", "max_seq_length",
                           "max_predictions_per_seq", "masking", "shards")


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
  """Writes `directory/manifest.json` atomically and returns its path.

  `manifest["shards"]` may hold `ShardInfo`s or dicts; `total_instances` and `tool_version` are filled in when
  absent (a given `total_instances` must match the shards). Other keys (dupe_factor, seed, flags, ...) are kept.
  """
  missing = [key for key in _REQUIRED_MANIFEST_KEYS if key not in manifest]
  if missing:
    raise ValueError(f"manifest lacks required keys {missing}")
  content = dict(manifest)
  content["shards"] = [shard.to_json() if isinstance(shard, ShardInfo) else dict(shard)
                       for shard in manifest["shards"]]
  total = sum(int(shard["count"]) for shard in content["shards"])
  if content.setdefault("total_instances", total) != total:
    raise ValueError(f"manifest total_instances={content['total_instances']} but its shards hold {total}")
  content.setdefault("tool_version", TOOL_VERSION)
  path = Path(directory) / MANIFEST_NAME
  with atomic_write(path) as handle:
    json.dump(content, handle, indent=2)
    handle.write("\n")
  return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
  """Reads `directory/manifest.json` (or the given manifest file); UserError if absent or malformed."""
  path = Path(directory)
  if path.is_dir():
    path = path / MANIFEST_NAME
  try:
    content = json.loads(path.read_text(encoding="utf-8"))
  except OSError as error:
    raise UserError(f"cannot read manifest {path}: {error.strerror}; point to a directory written by "
                    "create_pretraining_data") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"manifest {path} is not valid JSON ({error}); regenerate the data") from None
  missing = [key for key in _REQUIRED_MANIFEST_KEYS if key not in content] if isinstance(content, dict) else ["all"]
  if missing:
    raise UserError(f"manifest {path} lacks the keys {missing}; regenerate the data with create_pretraining_data")
  return content


# ----------------------------------------------------------------------------------------------------------------
# Instance validation (shared by both writers)
# ----------------------------------------------------------------------------------------------------------------


def _feature_shape(name: str, max_seq_length: int, max_predictions: int) -> tuple[int, ...]:
  if name == "next_sentence_labels":
    return ()
  return (max_seq_length,) if name in SEQUENCE_FEATURES else (max_predictions,)


def _stack_instances(instances: Sequence[Mapping[str, np.ndarray]], max_seq_length: int, max_predictions: int,
                     first_index: int, path: Path) -> dict[str, np.ndarray]:
  """Stacks single instances into [n, ...] arrays, naming the first instance whose feature has the wrong shape."""
  batch = {}
  for name in FEATURE_NAMES:
    expected_shape = _feature_shape(name, max_seq_length, max_predictions)
    allowed_shapes = {expected_shape, (1,)} if name == "next_sentence_labels" else {expected_shape}
    bad = [index for index, instance in enumerate(instances) if instance[name].shape not in allowed_shapes]
    if bad:
      raise ValueError(f"instance {first_index + bad[0]} written to {path}: {name} does not have the shape "
                       f"{expected_shape}")
    batch[name] = np.stack([instance[name].reshape(expected_shape) for instance in instances])
  return batch


def _check_batch(arrays: Mapping[str, np.ndarray], max_seq_length: int, max_predictions: int,
                 vocab_size: int | None, first_index: int, path: Path) -> dict[str, np.ndarray]:
  """Checks that [n, ...] arrays are well-formed padded instances; returns them with the derived lengths added.

  The native format stores lengths instead of masks, so a mask that is not a prefix of ones (or segment ids that are
  not 0...0 1...1 over the real tokens) cannot be stored; such an instance is a bug in the caller: ValueError naming
  the instance's index in the shard. Integer features come back as int64, the weights as float32.
  """
  def check(row_ok: np.ndarray, problem: str) -> None:
    bad = np.flatnonzero(~row_ok)
    if bad.size:
      raise ValueError(f"instance {first_index + int(bad[0])} written to {path}: {problem}")

  count = len(arrays["input_ids"])
  batch = {}
  for name in FEATURE_NAMES:
    array = arrays[name]
    expected_shape = (count,) + _feature_shape(name, max_seq_length, max_predictions)
    if name == "next_sentence_labels" and array.shape == (count, 1):
      array = array.reshape(count)
    if array.shape != expected_shape:
      raise ValueError(f"instances {first_index}.. written to {path}: {name} has the shape {array.shape}, expected "
                       f"{expected_shape}")
    if name == "masked_lm_weights":
      batch[name] = array.astype(np.float32, copy=False)
      continue
    if not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"instances {first_index}.. written to {path}: {name} has dtype {array.dtype}, not integer")
    flat = array.reshape(count, math.prod(expected_shape[1:])).astype(np.int64)  # -1 fails for count 0
    check((flat >= 0).all(axis=1) & (flat < 2**32).all(axis=1), f"{name} must hold integers in [0, 2**32)")
    batch[name] = flat.reshape(expected_shape)

  positions = np.arange(max_seq_length)
  num_tokens = batch["input_mask"].sum(axis=1)
  check((batch["input_mask"] == (positions < num_tokens[:, None])).all(axis=1),
        "input_mask must be 1 on a prefix of real tokens and 0 after it")
  segment_b_start = num_tokens - batch["segment_ids"].sum(axis=1)
  expected_segments = (positions >= segment_b_start[:, None]) & (positions < num_tokens[:, None])
  check((batch["segment_ids"] == expected_segments).all(axis=1),
        "segment_ids must be 0 on segment A, 1 on segment B and 0 on padding")
  check(~np.any((batch["input_ids"] != 0) & (positions >= num_tokens[:, None]), axis=1),
        "input_ids must be 0 where input_mask is 0")

  num_predictions = (batch["masked_lm_weights"] > 0).sum(axis=1)
  real = np.arange(max_predictions) < num_predictions[:, None]
  check((batch["masked_lm_weights"] == real).all(axis=1),
        "masked_lm_weights must be 1.0 on a prefix of slots and 0.0 after it")
  check(~np.any(~real & ((batch["masked_lm_positions"] != 0) | (batch["masked_lm_ids"] != 0)), axis=1),
        "masked_lm_positions/ids must be 0 in unused slots")
  check(~np.any(real & (batch["masked_lm_positions"] >= num_tokens[:, None]), axis=1),
        "a masked_lm_position points past the real tokens")
  check(batch["next_sentence_labels"] <= 1, "next_sentence_labels must be 0 or 1")
  if vocab_size is not None:
    row_max = np.maximum(batch["input_ids"].max(axis=1, initial=0), batch["masked_lm_ids"].max(axis=1, initial=0))
    check(row_max < vocab_size, f"a token id is outside the vocabulary of {vocab_size} entries")
  return batch | {"num_tokens": num_tokens, "segment_b_start": segment_b_start, "num_predictions": num_predictions}


def _max_id(batch: Mapping[str, np.ndarray]) -> int:
  return int(max(batch["input_ids"].max(initial=0), batch["masked_lm_ids"].max(initial=0)))


class _StreamingWriter:
  """Common writer behaviour: single instances buffered into vectorised chunks or whole batches written at once,
  temp file renamed on close, context manager."""

  def __init__(self, path: str | os.PathLike, max_seq_length: int | None, max_predictions_per_seq: int | None,
               vocab_size: int | None):
    self.path = Path(path)
    self.max_seq_length = max_seq_length
    self.max_predictions_per_seq = max_predictions_per_seq
    self.vocab_size = vocab_size
    self.count = 0
    self.max_id = 0
    self._crc = 0
    self._pending: list[dict[str, np.ndarray]] = []
    self._closed = False
    self.info: ShardInfo | None = None  # set by close(), also when the `with` block closed the writer
    self._stack = contextlib.ExitStack()
    self._file = self._stack.enter_context(atomic_write(self.path, "wb"))

  def write(self, instance: Mapping[str, Any]) -> None:
    """Queues a copy of one instance (the caller may reuse its arrays); encoded with up to `_WRITE_CHUNK - 1` others.

    A malformed instance raises ValueError here or at the write/close that encodes its chunk.
    """
    try:
      self._pending.append({name: np.array(instance[name]) for name in FEATURE_NAMES})
    except KeyError as error:
      raise ValueError(f"instance {self.count + len(self._pending)} written to {self.path} lacks the feature "
                       f"{error}; expected {list(FEATURE_NAMES)}") from None
    if len(self._pending) >= _WRITE_CHUNK:
      self._flush()

  def write_many(self, instances: Iterable[Mapping[str, Any]]) -> None:
    for instance in instances:
      self.write(instance)

  def write_batch(self, batch: Mapping[str, Any]) -> None:
    """Writes n instances given as [n, ...] arrays of the `FEATURE_NAMES` (next_sentence_labels [n] or [n, 1]).

    The fast path for generators that already hold instances as arrays: no per-instance copies or stacking. The
    bytes are exactly those of `write`-ing the rows one by one (after any instances still queued by `write`), since
    records are encoded independently and the checksum streams. The batch is encoded at once, so the caller bounds
    memory by its batch size. A malformed row raises ValueError naming its index in the shard, before anything of
    the batch is written.
    """
    self._flush()
    try:
      arrays = {name: np.asarray(batch[name]) for name in FEATURE_NAMES}
    except KeyError as error:
      raise ValueError(f"batch written to {self.path} at instance {self.count} lacks the feature {error}; expected "
                       f"{list(FEATURE_NAMES)}") from None
    for name in ("input_ids", "masked_lm_ids"):
      if arrays[name].ndim != 2:
        raise ValueError(f"batch written to {self.path} at instance {self.count}: {name} has the shape "
                         f"{arrays[name].shape}, not [n, width]; use write() for a single instance")
    if self.max_seq_length is None:
      self.max_seq_length = arrays["input_ids"].shape[1]
      self.max_predictions_per_seq = arrays["masked_lm_ids"].shape[1]
    self._write_checked(arrays)

  def _flush(self) -> None:
    if not self._pending:
      return
    instances, self._pending = self._pending, []
    if self.max_seq_length is None:
      self.max_seq_length = instances[0]["input_ids"].size
      self.max_predictions_per_seq = instances[0]["masked_lm_ids"].size
    self._write_checked(_stack_instances(instances, self.max_seq_length, self.max_predictions_per_seq, self.count,
                                         self.path))

  def _write_checked(self, arrays: Mapping[str, np.ndarray]) -> None:
    """Checks, encodes and appends [n, ...] arrays of instances."""
    batch = _check_batch(arrays, self.max_seq_length, self.max_predictions_per_seq, self.vocab_size, self.count,
                         self.path)
    if not len(batch["num_tokens"]):
      return  # an empty batch adds no bytes, as writing no instance would not
    data = self._encode(batch)
    self._file.write(data)
    self._crc = zlib.crc32(data, self._crc)
    self.count += len(batch["num_tokens"])
    self.max_id = max(self.max_id, _max_id(batch))

  def _encode(self, batch: dict[str, np.ndarray]) -> bytes:
    raise NotImplementedError

  def _finish(self) -> None:
    """Writes whatever must follow the records (the native footer)."""

  def close(self) -> ShardInfo:
    """Flushes, renames the file to its final name and returns its `ShardInfo`."""
    if self._closed:
      raise ValueError(f"writer for {self.path} is already closed")
    try:
      self._flush()
      self._finish()
    except BaseException as error:
      self.abort(error)
      raise
    self._closed = True
    self._stack.close()
    self.info = ShardInfo(self.path.name, self.count, f"crc32:{self._crc:08x}", self.max_id)
    return self.info

  def abort(self, error: BaseException | None = None) -> None:
    """Removes the temporary file; the final path is never created."""
    if self._closed:
      return
    self._closed = True
    error = error or RuntimeError("writer aborted")
    self._stack.__exit__(type(error), error, error.__traceback__)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    if exc is not None:
      self.abort(exc)
    elif not self._closed:
      self.close()


# ----------------------------------------------------------------------------------------------------------------
# Native shards
# ----------------------------------------------------------------------------------------------------------------


def native_record_dtype(max_seq_length: int, max_predictions_per_seq: int, id_bytes: int) -> np.dtype:
  """Packed little-endian record layout; padding slots of ids/positions are stored as zeros."""
  id_type = {2: "<u2", 4: "<u4"}[id_bytes]
  return np.dtype([
      ("input_ids", id_type, (max_seq_length,)),
      ("masked_lm_ids", id_type, (max_predictions_per_seq,)),
      ("masked_lm_positions", "<u2", (max_predictions_per_seq,)),
      ("num_tokens", "<u2"),
      ("segment_b_start", "<u2"),
      ("num_predictions", "<u2"),
      ("next_sentence_label", "u1"),
  ])


class NativeShardWriter(_StreamingWriter):
  """Writes one native `.cbj` shard. Use as a context manager, or call `close()` (or `abort()` on failure)."""

  def __init__(self, path: str | os.PathLike, max_seq_length: int, max_predictions_per_seq: int, vocab_size: int):
    if not 3 <= max_seq_length <= _MAX_NATIVE_SEQ_LENGTH:
      raise ValueError(f"max_seq_length={max_seq_length} must be in [3, {_MAX_NATIVE_SEQ_LENGTH}]")
    if not 0 <= max_predictions_per_seq <= max_seq_length:
      raise ValueError(f"max_predictions_per_seq={max_predictions_per_seq} must be in [0, max_seq_length]")
    if not 0 < vocab_size < 2**32:
      raise ValueError(f"vocab_size={vocab_size} must be in [1, 2**32)")
    super().__init__(path, max_seq_length, max_predictions_per_seq, vocab_size)
    self.id_bytes = 2 if vocab_size <= _UINT16_VOCAB_LIMIT else 4
    self._dtype = native_record_dtype(max_seq_length, max_predictions_per_seq, self.id_bytes)
    header = _HEADER.pack(NATIVE_MAGIC, NATIVE_VERSION, NATIVE_HEADER_SIZE, max_seq_length, max_predictions_per_seq,
                          self.id_bytes, self._dtype.itemsize, vocab_size)
    self._file.write(header.ljust(NATIVE_HEADER_SIZE, b"\x00"))

  def _encode(self, batch: dict[str, np.ndarray]) -> bytes:
    records = np.zeros(len(batch["num_tokens"]), self._dtype)
    for name in ("input_ids", "masked_lm_ids", "masked_lm_positions", "num_tokens", "segment_b_start",
                 "num_predictions"):
      records[name] = batch[name]
    records["next_sentence_label"] = batch["next_sentence_labels"]
    return records.tobytes()

  def _finish(self) -> None:
    self._file.write(_FOOTER.pack(NATIVE_FOOTER_MAGIC, self.count, self._crc, self.max_id))


# ----------------------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli) for TFRecord framing, vectorised over many messages
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _crc32c_tables() -> np.ndarray:
  """Slicing-by-4 tables for the reflected CRC-32C polynomial 0x82F63B78: row k advances a byte by 3 - k bytes."""
  tables = np.zeros((4, 256), np.uint32)
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    tables[0, byte] = crc
  for k in range(1, 4):
    tables[k] = (tables[k - 1] >> 8) ^ tables[0][tables[k - 1] & 0xFF]
  return tables


@functools.cache
def _crc32c_word_tables() -> tuple[np.ndarray, np.ndarray]:
  """The slicing-by-4 step as two 65,536-entry lookups (low and high half of the register): half the gathers."""
  t0, t1, t2, t3 = _crc32c_tables()
  return (t2[:, None] ^ t3[None, :]).reshape(-1), (t0[:, None] ^ t1[None, :]).reshape(-1)


_CRC_CHUNK_MESSAGES = 4096
_CRC_CHUNK_BYTES = 1 << 25  # bounds the zero-padded matrix of one vectorised step


def _crc32c_bytewise(message: bytes) -> int:
  table = _crc32c_tables()[0].tolist()
  crc = 0xFFFFFFFF
  for byte in message:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _crc32c_aligned(messages: Sequence[bytes], lengths: np.ndarray) -> np.ndarray:
  """CRC-32C of messages of at least 4 bytes, 4 bytes of every message per numpy step.

  Messages are right-aligned behind zero bytes, which leave a zero register unchanged. The standard initial register
  0xFFFFFFFF is equivalent to a zero register with the message's first 4 bytes inverted, so every message starts
  from the same (zero) state whatever its padding.
  """
  count = len(messages)
  width = -(-int(lengths.max()) // 4) * 4
  padded = b"".join(bytes(width - len(message)) + message for message in messages)
  aligned = np.frombuffer(padded, np.uint8).reshape(count, width).copy()
  rows = np.arange(count)
  for k in range(4):
    aligned[rows, width - lengths + k] ^= 0xFF
  columns = np.ascontiguousarray(aligned.view("<u4").T)  # step j reads row j: 4 bytes of every message
  low_half, high_half = _crc32c_word_tables()
  crc = np.zeros(count, np.uint32)
  low, high = np.empty_like(crc), np.empty_like(crc)
  for column in columns:
    crc ^= column
    np.bitwise_and(crc, 0xFFFF, out=low)
    np.right_shift(crc, 16, out=high)
    np.bitwise_xor(low_half.take(low), high_half.take(high), out=crc)
  return ~crc


def crc32c_many(messages: Sequence[bytes]) -> np.ndarray:
  """CRC-32C of each message, vectorised across messages (CRC is sequential only within a message).

  Messages are processed in chunks of similar length (sorted), so zero padding stays small; messages shorter than
  4 bytes take a bytewise path.
  """
  lengths = np.fromiter((len(message) for message in messages), np.int64, len(messages))
  result = np.zeros(len(messages), np.uint32)
  for index in np.flatnonzero(lengths < 4).tolist():
    result[index] = _crc32c_bytewise(messages[index])
  order = [index for index in np.argsort(lengths, kind="stable").tolist() if lengths[index] >= 4]
  start = 0
  while start < len(order):
    end = start + 1
    while (end < len(order) and end - start < _CRC_CHUNK_MESSAGES
           and (end - start + 1) * lengths[order[end]] <= _CRC_CHUNK_BYTES):
      end += 1
    chunk = order[start:end]
    result[chunk] = _crc32c_aligned([messages[index] for index in chunk], lengths[chunk])
    start = end
  return result


def masked_crc32c(messages: Sequence[bytes]) -> np.ndarray:
  """TFRecord's masked CRC: rotate right by 15 bits and add 0xA282EAD8."""
  crc = crc32c_many(messages)
  return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)


# ----------------------------------------------------------------------------------------------------------------
# tf.train.Example protobuf wire format
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 14)
def _varint(value: int) -> bytes:
  out = bytearray()
  while value >= 0x80:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _encode_varint_rows(values: np.ndarray) -> list[bytes]:
  """Packed varint encoding of each row of a non-negative integer matrix, vectorised over all values."""
  values = values.astype(np.uint64)
  num_bytes = np.ones(values.shape, np.int64)
  for shift in range(7, 64, 7):
    num_bytes += values >= np.uint64(1 << shift)
  flat_bytes = num_bytes.reshape(-1)
  flat_values = values.reshape(-1)
  starts = np.cumsum(flat_bytes) - flat_bytes
  out = np.zeros(int(flat_bytes.sum()), np.uint8)
  for k in range(int(flat_bytes.max(initial=1))):
    has = flat_bytes > k
    chunk = (flat_values[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
    more = (flat_bytes[has] > k + 1).astype(np.uint64) << np.uint64(7)
    out[starts[has] + k] = (chunk | more).astype(np.uint8)
  row_ends = np.cumsum(num_bytes.sum(axis=1))
  data = out.tobytes()
  return [data[begin:end] for begin, end in zip(np.r_[0, row_ends[:-1]].tolist(), row_ends.tolist())]


def _length_delimited(field_tag: bytes, payload: bytes) -> bytes:
  return field_tag + _varint(len(payload)) + payload


def _feature_entry(key_field: bytes, kind_tag: bytes, packed: bytes) -> bytes:
  """One `map<string, Feature>` entry of `Features` (`key_field` = encoded key), wrapped as field 1 of `Features`.

  Written out rather than composed from `_length_delimited`: it runs 7 times per instance.
  """
  value_list = b"\x0a" + _varint(len(packed)) + packed if packed else b""  # an empty repeated field is omitted
  feature = kind_tag + _varint(len(value_list)) + value_list  # Feature.float_list = 2, Feature.int64_list = 3
  entry = key_field + b"\x12" + _varint(len(feature)) + feature
  return b"\x0a" + _varint(len(entry)) + entry


# Per feature: (its encoded map key, the tag of its Feature.kind field).
_FEATURE_KEYS = {name: (_length_delimited(b"\x0a", name.encode()), b"\x12" if name == "masked_lm_weights" else b"\x1a")
                 for name in FEATURE_NAMES}


def encode_examples(batch: Mapping[str, np.ndarray]) -> list[bytes]:
  """Serialised `tf.train.Example`s for a stacked batch, features in Google's order (int64 lists, float weights)."""
  columns = []
  for name in FEATURE_NAMES:
    values = np.asarray(batch[name])
    if name == "masked_lm_weights":
      packed = [row.tobytes() for row in values.astype("<f4")]
    else:
      packed = _encode_varint_rows(values.reshape(len(values), -1))
    columns.append((*_FEATURE_KEYS[name], packed))
  return [_length_delimited(b"\x0a", b"".join(_feature_entry(key, tag, packed[index]) for key, tag, packed in columns))
          for index in range(len(columns[0][2]))]


class _ProtoError(Exception):
  """Malformed protobuf bytes; turned into a UserError naming the file and record."""


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if offset >= len(data) or shift > 63:
      raise _ProtoError("truncated varint")
    byte = data[offset]
    offset += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, offset
    shift += 7


def _iter_fields(data: bytes) -> Iterable[tuple[int, int, Any]]:
  """Yields (field number, wire type, value) of a message; value is an int or the bytes of a LEN field."""
  offset = 0
  while offset < len(data):
    key, offset = _read_varint(data, offset)
    field, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, offset = _read_varint(data, offset)
    elif wire_type == 2:
      length, offset = _read_varint(data, offset)
      if offset + length > len(data):
        raise _ProtoError("truncated field")
      value, offset = data[offset:offset + length], offset + length
    elif wire_type in (1, 5):
      size = 8 if wire_type == 1 else 4
      if offset + size > len(data):
        raise _ProtoError("truncated field")
      value, offset = data[offset:offset + size], offset + size
    else:
      raise _ProtoError(f"unsupported wire type {wire_type}")
    yield field, wire_type, value


def _decode_varints(data: bytes) -> np.ndarray:
  """All varints of a packed field, decoded at once (as int64: negative int64 values use 10 bytes)."""
  raw = np.frombuffer(data, np.uint8)
  ends = np.flatnonzero(raw < 0x80)
  if raw.size and (ends.size == 0 or ends[-1] != raw.size - 1):
    raise _ProtoError("truncated packed varints")
  starts = np.r_[0, ends[:-1] + 1]
  lengths = ends - starts + 1
  values = np.zeros(ends.size, np.uint64)
  for k in range(int(lengths.max(initial=0))):
    has = lengths > k
    values[has] |= (raw[starts[has] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
  return values.view(np.int64)


_FLOAT_LIST, _INT64_LIST = 2, 3  # field numbers of the `Feature.kind` oneof


def example_feature_payloads(data: bytes) -> dict[str, tuple[int, bytes]]:
  """Each float/int64 feature of a serialised `tf.train.Example` as (kind, its values in packed encoding).

  Unpacked repeated values (legal protobuf, though TF writes packed) are re-encoded packed, so callers can decode the
  values of many records with one vectorised call. Bytes features are skipped.
  """
  features = {}
  for field, wire_type, features_bytes in _iter_fields(data):
    if field != 1 or wire_type != 2:
      continue
    for entry_field, entry_type, entry in _iter_fields(features_bytes):
      if entry_field != 1 or entry_type != 2:
        continue
      name, feature = "", b""
      for part_field, part_type, part in _iter_fields(entry):
        if part_field == 1 and part_type == 2:
          name = part.decode("utf-8", "replace")
        elif part_field == 2 and part_type == 2:
          feature = part
      for kind, kind_type, value_list in _iter_fields(feature):
        if kind in (_FLOAT_LIST, _INT64_LIST) and kind_type == 2:
          features[name] = (kind, _packed_values(kind, value_list))
  return features


def _packed_values(kind: int, value_list: bytes) -> bytes:
  parts = []
  for field, wire_type, value in _iter_fields(value_list):
    if field != 1:
      continue
    if wire_type == 2:
      parts.append(value)
    elif kind == _INT64_LIST and wire_type == 0:
      parts.append(_varint(value))
    elif kind == _FLOAT_LIST and wire_type == 5:
      parts.append(value)
    else:
      raise _ProtoError(f"wire type {wire_type} in a {'float' if kind == _FLOAT_LIST else 'int64'} list")
  return b"".join(parts)


def _decode_packed(kind: int, payloads: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
  """Values of many packed payloads at once: (all values concatenated, number of values per payload)."""
  joined = b"".join(payloads)
  sizes = np.fromiter((len(payload) for payload in payloads), np.int64, len(payloads))
  if kind == _FLOAT_LIST:
    if np.any(sizes % 4):
      raise _ProtoError("packed floats are not a multiple of 4 bytes")
    return np.frombuffer(joined, "<f4").astype(np.float32), sizes // 4
  raw = np.frombuffer(joined, np.uint8)
  ends = np.cumsum(sizes)
  if np.any(raw[ends[sizes > 0] - 1] >= 0x80):
    raise _ProtoError("truncated packed varints")
  terminals = np.r_[0, np.cumsum(raw < 0x80)]
  return _decode_varints(joined), np.diff(terminals[np.r_[0, ends]])


def decode_example(data: bytes) -> dict[str, np.ndarray]:
  """All float/int64 features of a serialised `tf.train.Example` as float32/int64 arrays."""
  return {name: _decode_packed(kind, [payload])[0]
          for name, (kind, payload) in example_feature_payloads(data).items()}


# Vectorised decoding of the fixed pretraining schema. A `tf.train.Example` with Google's 7 features, as TF and
# `encode_examples` write it, is: 0x0A len Features{ 7 × [0x0A len MapEntry{0x0A len key, 0x12 len Feature{kind-tag
# len List{0x0A len packed-values}}}] }, the entries in any order. `_canonical_feature_spans` walks that structure
# for all records of a batch at once (numpy over records, a loop over the 7 entries), so a batch costs a few dozen
# array operations instead of a Python protobuf walk per record; anything else (unpacked lists, extra fields, other
# names) makes it return None and the reader falls back to the general parser, which also names the bad record.
_KEY_LENGTHS = {len(name): index for index, name in enumerate(FEATURE_NAMES)}  # the 7 names have distinct lengths
_KIND_TAGS = {_FLOAT_LIST: 0x12, _INT64_LIST: 0x1A}


def _varints_at(raw: np.ndarray, positions: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The varint starting at each position (not reading past `ends`): (values, positions after it, ok)."""
  values = np.zeros(positions.shape, np.int64)
  done = np.zeros(positions.shape, bool)
  after = positions.copy()
  for k in range(5):  # lengths inside one record fit in 35 bits
    index = positions + k
    inside = index < ends
    byte = raw[np.minimum(index, raw.size - 1)].astype(np.int64)
    active = ~done & inside
    values[active] |= (byte[active] & 0x7F) << (7 * k)
    after[active] += 1
    done |= active & (byte < 0x80)
  return values, after, done


def _canonical_feature_spans(raw: np.ndarray, starts: np.ndarray, ends: np.ndarray
                             ) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
  """(payload starts, payload lengths) in `raw` of each feature's packed values for records raw[starts:ends], or
  None when any record is not in the canonical layout (see above) or has a feature of the wrong kind."""
  count = starts.size
  ok = raw[np.minimum(starts, raw.size - 1)] == 0x0A
  length, cursor, good = _varints_at(raw, starts + 1, ends)
  ok &= good & (cursor + length == ends)
  found = np.zeros((count, len(FEATURE_NAMES)), np.int64)
  spans = {name: (np.zeros(count, np.int64), np.zeros(count, np.int64)) for name in FEATURE_NAMES}
  rows = np.arange(count)
  for _ in FEATURE_NAMES:
    ok &= raw[np.minimum(cursor, raw.size - 1)] == 0x0A
    entry_length, cursor, good = _varints_at(raw, cursor + 1, ends)
    entry_end = cursor + entry_length
    ok &= good & (entry_end <= ends) & (raw[np.minimum(cursor, raw.size - 1)] == 0x0A)
    key_length, key_start, good = _varints_at(raw, cursor + 1, entry_end)
    ok &= good
    feature = np.full(count, -1)
    for name_length, index in _KEY_LENGTHS.items():
      feature[key_length == name_length] = index
    ok &= feature >= 0
    cursor = key_start + key_length
    ok &= raw[np.minimum(cursor, raw.size - 1)] == 0x12
    feature_length, cursor, good = _varints_at(raw, cursor + 1, entry_end)
    ok &= good & (cursor + feature_length == entry_end)
    kind_tag = raw[np.minimum(cursor, raw.size - 1)]
    list_length, cursor, good = _varints_at(raw, cursor + 1, entry_end)
    ok &= good & (cursor + list_length == entry_end) & (raw[np.minimum(cursor, raw.size - 1)] == 0x0A)
    packed_length, cursor, good = _varints_at(raw, cursor + 1, entry_end)
    ok &= good & (cursor + packed_length == entry_end)
    if not ok.all():
      return None
    for name_index, name in enumerate(FEATURE_NAMES):
      these = feature == name_index
      if not these.any():
        continue
      window = raw[key_start[these, None] + np.arange(len(name))]
      expected_tag = _KIND_TAGS[_FLOAT_LIST if name == "masked_lm_weights" else _INT64_LIST]
      if not (np.all(window == np.frombuffer(name.encode(), np.uint8)) and np.all(kind_tag[these] == expected_tag)):
        return None
      spans[name][0][these], spans[name][1][these] = cursor[these], packed_length[these]
    found[rows, feature] += 1
    cursor = entry_end
  if not (np.all(cursor == ends) and np.all(found == 1)):
    return None
  return spans


def _gather_spans(raw: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """raw[starts[0]:starts[0]+lengths[0]] ++ raw[starts[1]:...] ++ … as one array (no Python loop)."""
  total = int(lengths.sum())
  offsets = np.cumsum(lengths) - lengths
  return raw[np.repeat(starts - offsets, lengths) + np.arange(total)]


class TFRecordWriter(_StreamingWriter):
  """Writes Google-compatible pretraining TFRecords (readable by `run_pretraining.py`) without TensorFlow.

  Shapes and the vocabulary size are checked when given; otherwise the first instance fixes the shapes.
  """

  def __init__(self, path: str | os.PathLike, max_seq_length: int | None = None,
               max_predictions_per_seq: int | None = None, vocab_size: int | None = None):
    super().__init__(path, max_seq_length, max_predictions_per_seq, vocab_size)

  def _encode(self, batch: dict[str, np.ndarray]) -> bytes:
    examples = encode_examples(batch)
    headers = [struct.pack("<Q", len(example)) for example in examples]
    header_crcs = masked_crc32c(headers).astype("<u4")
    data_crcs = masked_crc32c(examples).astype("<u4")
    return b"".join(header + header_crc.tobytes() + example + data_crc.tobytes()
                    for header, header_crc, example, data_crc in zip(headers, header_crcs, examples, data_crcs))


def open_writer(file_format: str, path: str | os.PathLike, max_seq_length: int, max_predictions_per_seq: int,
                vocab_size: int) -> NativeShardWriter | TFRecordWriter:
  """A writer for `file_format` (FORMAT_NATIVE or FORMAT_TFRECORD) with the same interface either way."""
  if file_format == FORMAT_NATIVE:
    return NativeShardWriter(path, max_seq_length, max_predictions_per_seq, vocab_size)
  if file_format == FORMAT_TFRECORD:
    return TFRecordWriter(path, max_seq_length, max_predictions_per_seq, vocab_size)
  raise UserError(f"unknown output format {file_format!r}; use {FORMAT_NATIVE} or {FORMAT_TFRECORD}")


# ----------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------


class _Shard:
  """One opened file: its metadata plus a lazily (re)opened mapping, so the dataset pickles to worker processes."""

  def __init__(self, path: Path):
    self.path = path
    self._mapping = None

  def __getstate__(self):
    return self.__dict__ | {"_mapping": None}

  def _file_size(self) -> int:
    return self.path.stat().st_size


class _NativeShard(_Shard):

  def __init__(self, path: Path, verify_checksum: bool):
    super().__init__(path)
    size = self._file_size()
    with open(path, "rb") as handle:
      header = handle.read(NATIVE_HEADER_SIZE)
      if size >= NATIVE_HEADER_SIZE + NATIVE_FOOTER_SIZE:
        handle.seek(size - NATIVE_FOOTER_SIZE)
        footer = handle.read(NATIVE_FOOTER_SIZE)
      else:
        footer = b""
    if len(header) < NATIVE_HEADER_SIZE:
      raise UserError(f"{path}: native shard header is cut short ({size} bytes); delete the file and regenerate it")
    (_, version, header_size, self.max_seq_length, self.max_predictions_per_seq, self.id_bytes, record_size,
     self.vocab_size) = _HEADER.unpack_from(header)
    if version != NATIVE_VERSION or header_size != NATIVE_HEADER_SIZE or self.id_bytes not in (2, 4):
      raise UserError(f"{path}: native shard version {version} (header {header_size} bytes) is not supported by "
                      f"this tool version {TOOL_VERSION}; regenerate the data or upgrade")
    self.dtype = native_record_dtype(self.max_seq_length, self.max_predictions_per_seq, self.id_bytes)
    if record_size != self.dtype.itemsize:
      raise UserError(f"{path}: header record size {record_size} does not match its layout; the file is corrupt")
    if len(footer) != NATIVE_FOOTER_SIZE or footer[:8] != NATIVE_FOOTER_MAGIC:
      raise UserError(f"{path}: shard has no valid footer (incomplete write or killed run); delete it and "
                      "regenerate the data")
    _, self.count, self.crc, self.max_id = _FOOTER.unpack(footer)
    if size != NATIVE_HEADER_SIZE + self.count * record_size + NATIVE_FOOTER_SIZE:
      raise UserError(f"{path}: file size {size} does not match its footer ({self.count} records of {record_size} "
                      "bytes); the file is truncated or corrupt: regenerate it")
    if verify_checksum:
      self.verify_checksum()

  @property
  def checksum(self) -> str:
    return f"crc32:{self.crc:08x}"

  def verify_checksum(self) -> None:
    crc = 0
    with open(self.path, "rb") as handle:
      handle.seek(NATIVE_HEADER_SIZE)
      remaining = self.count * self.dtype.itemsize
      while remaining:
        block = handle.read(min(remaining, 1 << 24))
        crc = zlib.crc32(block, crc)
        remaining -= len(block)
    if crc != self.crc:
      raise UserError(f"{self.path}: payload checksum crc32:{crc:08x} differs from its footer ({self.checksum}); "
                      "the file is corrupt: regenerate it")

  def records(self) -> np.ndarray:
    if self._mapping is None:
      self._mapping = np.memmap(self.path, self.dtype, mode="r", offset=NATIVE_HEADER_SIZE, shape=(self.count,))
    return self._mapping

  def read(self, local_indices: np.ndarray, vocab_size: int | None) -> dict[str, np.ndarray]:
    del vocab_size  # the footer's max id was checked against it once, in validate_against
    records = self.records()[local_indices]
    positions = np.arange(self.max_seq_length)
    num_tokens = records["num_tokens"][:, None].astype(np.int32)
    return {
        "input_ids": records["input_ids"].astype(np.int32),
        "input_mask": (positions < num_tokens).astype(np.int32),
        "segment_ids": ((positions >= records["segment_b_start"][:, None]) & (positions < num_tokens)).astype(
            np.int32),
        "masked_lm_positions": records["masked_lm_positions"].astype(np.int32),
        "masked_lm_ids": records["masked_lm_ids"].astype(np.int32),
        "masked_lm_weights": (np.arange(self.max_predictions_per_seq) < records["num_predictions"][:, None]).astype(
            np.float32),
        "next_sentence_labels": records["next_sentence_label"].astype(np.int32),
    }


class _TFRecordShard(_Shard):
  vocab_size = None  # TFRecords do not record it; ids are checked on read

  def __init__(self, path: Path, verify_checksum: bool):
    super().__init__(path)
    self.verify = verify_checksum
    self.offsets, self.lengths = self._index()
    self.count = len(self.offsets)
    self.max_id = None  # unknown without decoding every record: ids are checked on read instead
    self._block_ok: np.ndarray | None = None  # vectorised reader state (_canonical_block)
    self._spans: np.ndarray | None = None
    self._bad_crc: np.ndarray | None = None
    self.checksum = f"crc32:{zlib.crc32(self.data()):08x}" if verify_checksum else None
    if self.count == 0:
      self.max_seq_length = self.max_predictions_per_seq = None
    else:
      first = self._examples(np.zeros(1, np.int64))[0]
      self.max_seq_length = int(_decode_packed(_INT64_LIST, [first["input_ids"][1]])[1][0])
      self.max_predictions_per_seq = int(_decode_packed(_INT64_LIST, [first["masked_lm_ids"][1]])[1][0])

  def data(self) -> mmap.mmap | bytes:
    if self._mapping is None:
      with open(self.path, "rb") as handle:
        self._mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if self._file_size() else b""
    return self._mapping

  def _index(self) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and lengths of every record's payload; the framing (length CRCs) is checked for all records."""
    data, size = self.data(), self._file_size()
    offsets, lengths, headers = [], [], []
    offset = 0
    while offset < size:
      if offset + 12 > size:
        raise UserError(f"{self.path}: truncated TFRecord header at byte {offset} (record {len(offsets)}); the file "
                        "is incomplete: regenerate it")
      (length,) = struct.unpack_from("<Q", data, offset)
      if length > _MAX_TFRECORD_BYTES:
        raise UserError(f"{self.path}: record {len(offsets)} claims {length} bytes, far more than a pretraining "
                        "instance; the file is corrupt or not BERT pretraining data")
      if offset + 16 + length > size:
        raise UserError(f"{self.path}: record {len(offsets)} at byte {offset} runs past the end of the file; the "
                        "file is incomplete or not a TFRecord file: regenerate it")
      headers.append(data[offset:offset + 12])
      offsets.append(offset + 12)
      lengths.append(length)
      offset += 16 + length
    expected = masked_crc32c([header[:8] for header in headers])
    stored = np.frombuffer(b"".join(header[8:] for header in headers), "<u4")
    bad = np.flatnonzero(expected != stored)
    if bad.size:
      raise UserError(f"{self.path}: record {bad[0]} has a bad length checksum; the file is corrupt or not a "
                      "TFRecord file")
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)

  def _examples(self, local_indices: np.ndarray) -> list[dict[str, tuple[int, bytes]]]:
    """Feature payloads of the given records, after checking their CRCs and that all features are present."""
    data = self.data()
    spans = list(zip(self.offsets[local_indices].tolist(), self.lengths[local_indices].tolist()))
    payloads = [data[offset:offset + length] for offset, length in spans]
    if self.verify:
      stored = np.frombuffer(b"".join(data[offset + length:offset + length + 4] for offset, length in spans), "<u4")
      bad = np.flatnonzero(masked_crc32c(payloads) != stored)
      if bad.size:
        raise UserError(f"{self.path}: record {local_indices[bad[0]]} has a bad data checksum; the file is corrupt: "
                        "regenerate it")
    examples = []
    for index, payload in zip(local_indices.tolist(), payloads):
      try:
        example = example_feature_payloads(payload)
      except _ProtoError as error:
        raise UserError(f"{self.path}: record {index} is not a valid tf.train.Example ({error}); regenerate the "
                        "file") from None
      missing = [name for name in FEATURE_NAMES if name not in example]
      if missing:
        raise UserError(f"{self.path}: record {index} lacks the features {missing}; it is not BERT pretraining data "
                        "in Google's format")
      examples.append(example)
    return examples

  _BLOCK = 4096  # records parsed (and checksummed) together by the vectorised reader

  def _canonical_block(self, block: int) -> bool:
    """Parses records [block·B, (block+1)·B) once: verifies their data CRCs and stores every feature's packed-values
    span (offset within the record, length) in `self._spans` [records, 7, 2]. False: the block needs the general
    parser (some record is not in the canonical layout)."""
    if self._block_ok is None:
      blocks = -(-self.count // self._BLOCK)
      self._block_ok = np.zeros(blocks, np.int8)  # 0 unparsed, 1 canonical, -1 general
      self._bad_crc = np.zeros(self.count, bool)  # records whose data CRC failed (an error only when read)
      self._spans = np.zeros((self.count, len(FEATURE_NAMES), 2),
                             np.uint16 if self.lengths.max(initial=0) < 2**16 else np.uint32)
    if self._block_ok[block] == 0:
      data = self.data()
      rows = np.arange(block * self._BLOCK, min((block + 1) * self._BLOCK, self.count))
      starts, lengths = self.offsets[rows], self.lengths[rows]
      spans = None
      if isinstance(data, mmap.mmap):
        raw = np.frombuffer(data, np.uint8)
        if self.verify:
          stored = raw[(starts + lengths)[:, None] + np.arange(4)].copy().view("<u4")[:, 0]
          self._bad_crc[rows] = masked_crc32c([data[start:start + length] for start, length in
                                               zip(starts.tolist(), lengths.tolist())]) != stored
        spans = _canonical_feature_spans(raw, starts, starts + lengths)
      if spans is None:
        self._block_ok[block] = -1
      else:
        for index, name in enumerate(FEATURE_NAMES):
          self._spans[rows, index, 0] = spans[name][0] - starts
          self._spans[rows, index, 1] = spans[name][1]
        self._block_ok[block] = 1
    return self._block_ok[block] == 1

  def _read_canonical(self, local_indices: np.ndarray) -> dict[str, np.ndarray] | None:
    """The batch from the parsed blocks' spans: a gather and a vectorised varint decode per feature (None: some
    record needs the general parser, or has another shape than record 0)."""
    if not all([self._canonical_block(block) for block in np.unique(local_indices // self._BLOCK).tolist()]):
      return None
    bad = np.flatnonzero(self._bad_crc[local_indices])
    if bad.size:
      raise UserError(f"{self.path}: record {local_indices[bad[0]]} has a bad data checksum; the file is corrupt: "
                      "regenerate it")
    raw = np.frombuffer(self.data(), np.uint8)
    count = len(local_indices)
    spans = self._spans[local_indices].astype(np.int64)  # [n, 7, 2]
    record_starts = self.offsets[local_indices]
    widths = [1 if name == "next_sentence_labels" else self.max_seq_length if name in SEQUENCE_FEATURES else
              self.max_predictions_per_seq for name in FEATURE_NAMES]
    batch = {}
    weights = FEATURE_NAMES.index("masked_lm_weights")
    if np.any(spans[:, weights, 1] != 4 * widths[weights]):
      return None
    # Whole records joined (one memcpy each), then everything by position in that buffer.
    data = self.data()
    record_lengths = self.lengths[local_indices]
    buffer = np.frombuffer(b"".join([data[start:start + length] for start, length in
                                     zip(record_starts.tolist(), record_lengths.tolist())]), np.uint8)
    base = np.cumsum(record_lengths) - record_lengths  # where each record starts in `buffer`
    weight_index = (base + spans[:, weights, 0])[:, None] + np.arange(4 * widths[weights])
    batch["masked_lm_weights"] = buffer[weight_index].copy().view("<f4").astype(np.float32).reshape(
        count, widths[weights])
    # The int64 features: the last bytes of all varints in the buffer (header bytes included), then the ones inside
    # each feature's packed span, feature-major. The byte before a span is the last byte of its length varint, so
    # every varint inside a span starts right after the previous terminal byte.
    integer = [index for index, name in enumerate(FEATURE_NAMES) if name != "masked_lm_weights"]
    span_starts = (base[None, :] + spans[:, integer, 0].T).reshape(-1)
    span_ends = span_starts + spans[:, integer, 1].T.reshape(-1)
    terminals = np.flatnonzero(buffer < 0x80)
    first, last = np.searchsorted(terminals, span_starts), np.searchsorted(terminals, span_ends)
    expected = np.repeat(np.asarray([widths[index] for index in integer]), count)
    if np.any(last - first != expected) or np.any(buffer[np.maximum(span_ends - 1, 0)] >= 0x80):
      return None
    selected = np.repeat(first - np.cumsum(expected) + expected, expected) + np.arange(int(expected.sum()))
    ends = terminals[selected]
    varint_starts = terminals[selected - 1] + 1  # first >= 1: a header byte always precedes a span
    sizes = ends - varint_starts + 1
    if sizes.max(initial=1) > 9:  # 10-byte varints (negative values): the general parser handles them
      return None
    values = buffer
    decoded = (values[varint_starts] & 0x7F).astype(np.int64)
    for k in range(1, int(sizes.max(initial=1))):
      longer = np.flatnonzero(sizes > k)
      decoded[longer] |= (values[varint_starts[longer] + k] & 0x7F).astype(np.int64) << (7 * k)
    offset = 0
    for index in integer:
      name, size = FEATURE_NAMES[index], count * widths[index]
      batch[name] = decoded[offset:offset + size].astype(FEATURE_DTYPES[name]).reshape(count, widths[index])
      offset += size
    return batch

  def read(self, local_indices: np.ndarray, vocab_size: int | None) -> dict[str, np.ndarray]:
    batch = self._read_canonical(np.asarray(local_indices, np.int64))
    if batch is None:  # the general parser: any valid Example, and one-line errors naming the bad record
      examples = self._examples(local_indices)
      batch = {name: self._decode_feature(name, [example[name] for example in examples], local_indices)
               for name in FEATURE_NAMES}
    batch["next_sentence_labels"] = batch["next_sentence_labels"][:, 0]
    if vocab_size is not None:
      largest = max(batch["input_ids"].max(initial=0), batch["masked_lm_ids"].max(initial=0))
      if largest >= vocab_size or min(batch["input_ids"].min(initial=0), batch["masked_lm_ids"].min(initial=0)) < 0:
        raise UserError(f"{self.path}: token id {largest} is outside the vocabulary of {vocab_size} entries; the "
                        "data was built with another vocabulary: regenerate it or pass the right vocabulary")
    return batch

  def _decode_feature(self, name: str, kinds_and_payloads: list[tuple[int, bytes]],
                      local_indices: np.ndarray) -> np.ndarray:
    """[n, width] values of one feature across records; UserError naming the first record that does not fit."""
    expected_kind = _FLOAT_LIST if name == "masked_lm_weights" else _INT64_LIST
    wrong_kind = [i for i, (kind, _) in enumerate(kinds_and_payloads) if kind != expected_kind]
    if wrong_kind:
      raise UserError(f"{self.path}: record {local_indices[wrong_kind[0]]} stores {name} as the wrong type; "
                      "expected Google's format (int64 lists, float list for masked_lm_weights)")
    try:
      values, counts = _decode_packed(expected_kind, [payload for _, payload in kinds_and_payloads])
    except _ProtoError as error:
      raise UserError(f"{self.path}: a record among {local_indices.tolist()[:5]}... has a malformed {name} "
                      f"({error}); the file is corrupt") from None
    width = 1 if name == "next_sentence_labels" else (
        self.max_seq_length if name in SEQUENCE_FEATURES else self.max_predictions_per_seq)
    wrong = np.flatnonzero(counts != width)
    if wrong.size:
      raise UserError(f"{self.path}: record {local_indices[wrong[0]]} has {counts[wrong[0]]} {name} values, "
                      f"expected {width} like record 0; all records must share one shape")
    return values.astype(FEATURE_DTYPES[name]).reshape(len(local_indices), width)


def _is_native(path: Path) -> bool:
  with open(path, "rb") as handle:
    return handle.read(len(NATIVE_MAGIC)) == NATIVE_MAGIC


def _expand_paths(paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
  """Comma-separated globs, a list of globs, or directories (their manifest's shards, else all shard files)."""
  if isinstance(paths_or_glob, (str, os.PathLike)):
    patterns = [part for part in str(paths_or_glob).split(",") if part.strip()]
  else:
    patterns = [str(pattern) for pattern in paths_or_glob]
  if not patterns:
    raise UserError("no pretraining data given; pass a glob of .cbj or .tfrecord files (e.g. data/*.cbj)")
  paths: list[Path] = []
  for pattern in patterns:
    pattern = pattern.strip()
    if os.path.isdir(pattern):
      directory = Path(pattern)
      if (directory / MANIFEST_NAME).exists():
        found = [directory / shard["name"] for shard in read_manifest(directory)["shards"]]
      else:
        found = sorted(directory.glob(f"*{NATIVE_SUFFIX}")) + sorted(directory.glob(f"*{TFRECORD_SUFFIX}"))
    else:
      found = [Path(name) for name in sorted(glob.glob(pattern)) if Path(name).name != MANIFEST_NAME]
    found = [path for path in found if not path.is_dir()]
    if not found:
      raise UserError(f"pretraining data pattern {pattern!r} matches no files; check the path or glob")
    paths.extend(found)
  return paths


class PretrainingData:
  """Random access to pretraining instances across native shards and TFRecord files, in the order given.

  Global index i runs over the files' records in order (globs expand sorted). Use `open()`.
  """

  def __init__(self, shards: list[_Shard], manifest: dict[str, Any] | None):
    self.shards = shards
    self.manifest = manifest
    counts = np.array([shard.count for shard in shards], np.int64)
    self._ends = np.cumsum(counts)
    self.max_seq_length = next((s.max_seq_length for s in shards if s.max_seq_length is not None), None)
    self.max_predictions_per_seq = next(
        (s.max_predictions_per_seq for s in shards if s.max_predictions_per_seq is not None), None)
    self._vocab_size: int | None = None

  @classmethod
  def open(cls, paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike],
           verify_checksums: bool = True) -> PretrainingData:
    """Opens shards by glob(s), path(s) or directory; UserError for missing, empty, incomplete or mixed files.

    `verify_checksums` reads each native shard once to check its CRC-32 (about 1 s/GB) and checks each TFRecord
    record's CRC-32C when it is read.
    """
    paths = _expand_paths(paths_or_glob)
    shards: list[_Shard] = []
    for path in paths:
      try:
        shard = _NativeShard(path, verify_checksums) if _is_native(path) else _TFRecordShard(path, verify_checksums)
      except OSError as error:
        raise UserError(f"cannot read pretraining data file {path}: {error.strerror}") from None
      shards.append(shard)
    reference = next((shard for shard in shards if shard.max_seq_length is not None), shards[0])
    for shard in shards:
      if shard.count and (shard.max_seq_length, shard.max_predictions_per_seq) != (
          reference.max_seq_length, reference.max_predictions_per_seq):
        raise UserError(f"{shard.path} has max_seq_length={shard.max_seq_length}, max_predictions_per_seq="
                        f"{shard.max_predictions_per_seq} but {reference.path} has {reference.max_seq_length}, "
                        f"{reference.max_predictions_per_seq}; train on files generated with the same settings")
    data = cls(shards, _shared_manifest(shards))
    if len(data) == 0:
      raise UserError(f"pretraining data {', '.join(str(path) for path in paths[:3])} holds no instances; "
                      "regenerate it from a non-empty corpus")
    return data

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def get_batch(self, indices: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """Instances at global `indices`, as [n, max_seq_length] / [n, max_predictions_per_seq] / [n] arrays."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"indices must be in [0, {len(self)})")
    shard_ids = np.searchsorted(self._ends, indices, side="right")
    batch = {name: np.zeros((indices.size,) + self._feature_shape(name), FEATURE_DTYPES[name])
             for name in FEATURE_NAMES}
    for shard_id in np.unique(shard_ids).tolist():
      rows = np.flatnonzero(shard_ids == shard_id)
      local = indices[rows] - (self._ends[shard_id] - self.shards[shard_id].count)
      for name, values in self.shards[shard_id].read(local, self._vocab_size).items():
        batch[name][rows] = values
    return batch

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """One instance (unbatched arrays), for random-access data loaders."""
    return {name: values[0] for name, values in self.get_batch(np.array([index])).items()}

  def _feature_shape(self, name: str) -> tuple[int, ...]:
    if name == "next_sentence_labels":
      return ()
    return (self.max_seq_length,) if name in SEQUENCE_FEATURES else (self.max_predictions_per_seq,)

  def validate_against(self, vocab_size: int, vocab_sha256: str | None, max_seq_length: int,
                       max_predictions_per_seq: int | None) -> None:
    """Checks that the data fits the model about to train on it; UserError naming the first mismatch.

    `vocab_size` is the number of entries of the vocabulary file (`vocab_fingerprint`), not an embedding table
    padded for speed: shards record the former. Token ids are checked against `vocab_size` here for native shards
    (footer max id) and on every read for TFRecords, because an out-of-range id would be silently clamped by JAX's
    gather. Pass `max_predictions_per_seq=None` when the trainer does not use the stored predictions (dynamic masking).
    """
    manifest = self.manifest or {}
    where = f"the manifest of {self.shards[0].path.parent}"
    if vocab_sha256 is not None and manifest.get("vocab_sha256") not in (None, vocab_sha256):
      raise UserError(f"vocabulary mismatch: {where} was built with a vocab of sha256 {manifest['vocab_sha256']} "
                      f"but training uses sha256 {vocab_sha256}; pass the same --vocab_file or regenerate the data")
    if manifest.get("vocab_size") not in (None, vocab_size):
      raise UserError(f"vocab_size mismatch: {where} says {manifest['vocab_size']} but training uses {vocab_size}; "
                      "pass the same vocabulary or regenerate the data")
    for shard in self.shards:
      checks = [("max_seq_length", shard.max_seq_length, max_seq_length)]
      if max_predictions_per_seq is not None:
        checks.append(("max_predictions_per_seq", shard.max_predictions_per_seq, max_predictions_per_seq))
      for name, stored, wanted in checks:
        if shard.count and stored != wanted:
          raise UserError(f"{name} mismatch: {shard.path} has {stored} but training uses {wanted}; set "
                          f"--{name}={stored} or regenerate the data with --{name}={wanted}")
      if shard.vocab_size is not None and shard.vocab_size != vocab_size:
        raise UserError(f"vocab_size mismatch: {shard.path} was written for {shard.vocab_size} ids but training "
                        f"uses {vocab_size}; pass the same vocabulary or regenerate the data")
      if shard.max_id is not None and shard.max_id >= vocab_size:
        raise UserError(f"{shard.path} holds token id {shard.max_id}, outside the vocabulary of {vocab_size} "
                        "entries; pass the vocabulary the data was built with or regenerate it")
    self._vocab_size = vocab_size


def _shared_manifest(shards: list[_Shard]) -> dict[str, Any] | None:
  """The manifest of the directory holding all shards, after checking each shard against its entry."""
  directories = {shard.path.parent.resolve() for shard in shards}
  if len(directories) != 1:
    return None
  directory = directories.pop()
  if not (directory / MANIFEST_NAME).exists():
    return None
  manifest = read_manifest(directory)
  entries = {entry["name"]: entry for entry in manifest["shards"]}
  for shard in shards:
    entry = entries.get(shard.path.name)
    if entry is None:
      raise UserError(f"{shard.path} is not listed in {directory / MANIFEST_NAME}; it belongs to another run: "
                      "remove it or move it to its own directory")
    if int(entry["count"]) != shard.count:
      raise UserError(f"{shard.path} holds {shard.count} instances but {MANIFEST_NAME} lists {entry['count']}; "
                      "the data directory is inconsistent: regenerate it")
    if shard.checksum is not None and entry.get("checksum") not in (None, shard.checksum):
      raise UserError(f"{shard.path} has checksum {shard.checksum} but {MANIFEST_NAME} lists {entry['checksum']}; "
                      "the data directory is inconsistent: regenerate it")
    if shard.max_id is None and entry.get("max_id") is not None:
      shard.max_id = int(entry["max_id"])
  return manifest
