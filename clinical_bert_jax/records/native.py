"""Native `.cbj` shards: fixed-size little-endian records between a 64-byte header and a 24-byte footer.

Only what cannot be derived is stored (ids, number of real tokens, start of segment B, predictions, label), so the
reader `np.memmap`s the file and fancy-indexes any batch of records without parsing; masks, segment ids and weights
are rebuilt on read. The footer (record count, CRC-32 of the payload, largest id) rejects a shard from a killed run
and lets ids be checked against the vocabulary without a scan. The byte layout is in docs/data-formats.md.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.records.base import _Shard, _StreamingWriter
from clinical_bert_jax.records.schema import TOOL_VERSION

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


# ----------------------------------------------------------------------------------------------------------------
# Native shards
# ----------------------------------------------------------------------------------------------------------------


def native_record_dtype(max_seq_length: int, max_predictions_per_seq: int, id_bytes: int) -> np.dtype:
  """Packed little-endian record layout; padding slots of ids/positions are stored as zeros."""
  id_type = {2: "<u2", 4: "<u4"}[id_bytes]
  return np.dtype(
    [
      ("input_ids", id_type, (max_seq_length,)),
      ("masked_lm_ids", id_type, (max_predictions_per_seq,)),
      ("masked_lm_positions", "<u2", (max_predictions_per_seq,)),
      ("num_tokens", "<u2"),
      ("segment_b_start", "<u2"),
      ("num_predictions", "<u2"),
      ("next_sentence_label", "u1"),
    ]
  )


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
    header = _HEADER.pack(
      NATIVE_MAGIC,
      NATIVE_VERSION,
      NATIVE_HEADER_SIZE,
      max_seq_length,
      max_predictions_per_seq,
      self.id_bytes,
      self._dtype.itemsize,
      vocab_size,
    )
    self._file.write(header.ljust(NATIVE_HEADER_SIZE, b"\x00"))

  def _encode(self, batch: dict[str, np.ndarray]) -> bytes:
    records = np.zeros(len(batch["num_tokens"]), self._dtype)
    for name in (
      "input_ids",
      "masked_lm_ids",
      "masked_lm_positions",
      "num_tokens",
      "segment_b_start",
      "num_predictions",
    ):
      records[name] = batch[name]
    records["next_sentence_label"] = batch["next_sentence_labels"]
    return records.tobytes()

  def _finish(self) -> None:
    self._file.write(_FOOTER.pack(NATIVE_FOOTER_MAGIC, self.count, self._crc, self.max_id))


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
    (
      _,
      version,
      header_size,
      self.max_seq_length,
      self.max_predictions_per_seq,
      self.id_bytes,
      record_size,
      self.vocab_size,
    ) = _HEADER.unpack_from(header)
    if version != NATIVE_VERSION or header_size != NATIVE_HEADER_SIZE or self.id_bytes not in (2, 4):
      raise UserError(
        f"{path}: native shard version {version} (header {header_size} bytes) is not supported by "
        f"this tool version {TOOL_VERSION}; regenerate the data or upgrade"
      )
    self.dtype = native_record_dtype(self.max_seq_length, self.max_predictions_per_seq, self.id_bytes)
    if record_size != self.dtype.itemsize:
      raise UserError(f"{path}: header record size {record_size} does not match its layout; the file is corrupt")
    if len(footer) != NATIVE_FOOTER_SIZE or footer[:8] != NATIVE_FOOTER_MAGIC:
      raise UserError(
        f"{path}: shard has no valid footer (incomplete write or killed run); delete it and regenerate the data"
      )
    _, self.count, self.crc, self.max_id = _FOOTER.unpack(footer)
    if size != NATIVE_HEADER_SIZE + self.count * record_size + NATIVE_FOOTER_SIZE:
      raise UserError(
        f"{path}: file size {size} does not match its footer ({self.count} records of {record_size} "
        "bytes); the file is truncated or corrupt: regenerate it"
      )
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
      raise UserError(
        f"{self.path}: payload checksum crc32:{crc:08x} differs from its footer ({self.checksum}); "
        "the file is corrupt: regenerate it"
      )

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
      "segment_ids": ((positions >= records["segment_b_start"][:, None]) & (positions < num_tokens)).astype(np.int32),
      "masked_lm_positions": records["masked_lm_positions"].astype(np.int32),
      "masked_lm_ids": records["masked_lm_ids"].astype(np.int32),
      "masked_lm_weights": (np.arange(self.max_predictions_per_seq) < records["num_predictions"][:, None]).astype(
        np.float32
      ),
      "next_sentence_labels": records["next_sentence_label"].astype(np.int32),
    }
