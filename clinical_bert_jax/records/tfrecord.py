"""TFRecord files of `tf.train.Example`s with Google's feature names and types: writer and reader, no TensorFlow.

Framing: each record is its length (uint64), the masked CRC-32C of the length, the serialised Example and its masked
CRC-32C (`crc32c`); the Example bytes come from `wire`. The files are readable by TensorFlow and by Google's
`run_pretraining.py`. The reader indexes the framing once, then decodes batches with the vectorised decoder and falls
back to the general parser for records in another layout (which also names a bad record).
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.records.base import _Shard, _StreamingWriter
from clinical_bert_jax.records.crc32c import masked_crc32c
from clinical_bert_jax.records.schema import FEATURE_DTYPES, FEATURE_NAMES, SEQUENCE_FEATURES
from clinical_bert_jax.records.wire import (
  _FLOAT_LIST,
  _INT64_LIST,
  _canonical_feature_spans,
  _decode_packed,
  _ProtoError,
  encode_examples,
  example_feature_payloads,
)

_MAX_TFRECORD_BYTES = 1 << 24  # an instance of 65,535 tokens is under 1 MB; anything far larger is not one
_WEIGHTS = FEATURE_NAMES.index("masked_lm_weights")
_INTEGERS = [index for index, name in enumerate(FEATURE_NAMES) if name != "masked_lm_weights"]


def _joined_spans(
  raw: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """raw[starts[i] : starts[i] + lengths[i]] for all i joined (one gather), where each span begins in it, and the
  positions of its varint-terminal bytes (< 0x80)."""
  offsets = np.cumsum(lengths) - lengths
  total = int(offsets[-1] + lengths[-1]) if lengths.size else 0
  packed = raw[np.repeat(starts - offsets, lengths) + np.arange(total)]
  return packed, offsets, np.flatnonzero(packed < 0x80)


def _decode_terminated_varints(packed: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """The varints of `packed` (every byte belongs to one; `ends` are their last bytes) as int64, all at once: from
  each varint's last (most significant) byte backwards, one masked step per byte of the longest."""
  values = packed[ends].astype(np.int64)
  sizes = np.diff(ends, prepend=-1)
  for k in range(1, int(sizes.max(initial=1))):
    longer = np.flatnonzero(sizes > k)
    values[longer] = (values[longer] << 7) | (packed[ends[longer] - k] & 0x7F)
  return values


class TFRecordWriter(_StreamingWriter):
  """Writes Google-compatible pretraining TFRecords (readable by `run_pretraining.py`) without TensorFlow.

  Shapes and the vocabulary size are checked when given; otherwise the first instance fixes the shapes.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    max_seq_length: int | None = None,
    max_predictions_per_seq: int | None = None,
    vocab_size: int | None = None,
  ):
    super().__init__(path, max_seq_length, max_predictions_per_seq, vocab_size)

  def _encode(self, batch: dict[str, np.ndarray]) -> bytes:
    examples = encode_examples(batch)
    headers = [struct.pack("<Q", len(example)) for example in examples]
    header_crcs = masked_crc32c(headers).astype("<u4")
    data_crcs = masked_crc32c(examples).astype("<u4")
    return b"".join(
      header + header_crc.tobytes() + example + data_crc.tobytes()
      for header, header_crc, example, data_crc in zip(headers, header_crcs, examples, data_crcs)
    )


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
    self._fits: np.ndarray | None = None
    self._all_canonical = False  # every block parsed and canonical: batches skip the per-block check
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
        raise UserError(
          f"{self.path}: truncated TFRecord header at byte {offset} (record {len(offsets)}); the file "
          "is incomplete: regenerate it"
        )
      (length,) = struct.unpack_from("<Q", data, offset)
      if length > _MAX_TFRECORD_BYTES:
        raise UserError(
          f"{self.path}: record {len(offsets)} claims {length} bytes, far more than a pretraining "
          "instance; the file is corrupt or not BERT pretraining data"
        )
      if offset + 16 + length > size:
        raise UserError(
          f"{self.path}: record {len(offsets)} at byte {offset} runs past the end of the file; the "
          "file is incomplete or not a TFRecord file: regenerate it"
        )
      headers.append(data[offset : offset + 12])
      offsets.append(offset + 12)
      lengths.append(length)
      offset += 16 + length
    expected = masked_crc32c([header[:8] for header in headers])
    stored = np.frombuffer(b"".join(header[8:] for header in headers), "<u4")
    bad = np.flatnonzero(expected != stored)
    if bad.size:
      raise UserError(
        f"{self.path}: record {bad[0]} has a bad length checksum; the file is corrupt or not a TFRecord file"
      )
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)

  def _examples(self, local_indices: np.ndarray) -> list[dict[str, tuple[int, bytes]]]:
    """Feature payloads of the given records, after checking their CRCs and that all features are present."""
    data = self.data()
    spans = list(zip(self.offsets[local_indices].tolist(), self.lengths[local_indices].tolist()))
    payloads = [data[offset : offset + length] for offset, length in spans]
    if self.verify:
      stored = np.frombuffer(b"".join(data[offset + length : offset + length + 4] for offset, length in spans), "<u4")
      bad = np.flatnonzero(masked_crc32c(payloads) != stored)
      if bad.size:
        raise UserError(
          f"{self.path}: record {local_indices[bad[0]]} has a bad data checksum; the file is corrupt: regenerate it"
        )
    examples = []
    for index, payload in zip(local_indices.tolist(), payloads):
      try:
        example = example_feature_payloads(payload)
      except _ProtoError as error:
        raise UserError(
          f"{self.path}: record {index} is not a valid tf.train.Example ({error}); regenerate the file"
        ) from None
      missing = [name for name in FEATURE_NAMES if name not in example]
      if missing:
        raise UserError(
          f"{self.path}: record {index} lacks the features {missing}; it is not BERT pretraining data "
          "in Google's format"
        )
      examples.append(example)
    return examples

  _BLOCK = 4096  # records parsed (and checksummed) together by the vectorised reader

  def _canonical_block(self, block: int) -> bool:
    """Parses records [block·B, (block+1)·B) once: verifies their data CRCs, stores every feature's packed-values
    span (offset within the record, length) in `self._spans` [records, 7, 2] and whether the record's values have
    the shape of record 0 in `self._fits`. False: the block needs the general parser (some record is not in the
    canonical layout)."""
    if self._block_ok is None:
      blocks = -(-self.count // self._BLOCK)
      self._block_ok = np.zeros(blocks, np.int8)  # 0 unparsed, 1 canonical, -1 general
      self._bad_crc = np.zeros(self.count, bool)  # records whose data CRC failed (an error only when read)
      self._fits = np.zeros(self.count, bool)  # canonical records whose value counts match record 0's
      self._spans = np.zeros(
        (self.count, len(FEATURE_NAMES), 2), np.uint16 if self.lengths.max(initial=0) < 2**16 else np.uint32
      )
    if self._block_ok[block] == 0:
      data = self.data()
      rows = np.arange(block * self._BLOCK, min((block + 1) * self._BLOCK, self.count))
      starts, lengths = self.offsets[rows], self.lengths[rows]
      spans = None
      if isinstance(data, mmap.mmap):
        raw = np.frombuffer(data, np.uint8)
        if self.verify:
          stored = raw[(starts + lengths)[:, None] + np.arange(4)].copy().view("<u4")[:, 0]
          self._bad_crc[rows] = (
            masked_crc32c([data[start : start + length] for start, length in zip(starts.tolist(), lengths.tolist())])
            != stored
          )
        spans = _canonical_feature_spans(raw, starts, starts + lengths)
      if spans is None:
        self._block_ok[block] = -1
      else:
        for index, name in enumerate(FEATURE_NAMES):
          self._spans[rows, index, 0] = spans[name][0] - starts
          self._spans[rows, index, 1] = spans[name][1]
        self._fits[rows] = self._values_fit(raw, rows)
        self._block_ok[block] = 1
        self._all_canonical = bool(np.all(self._block_ok == 1))
    return self._block_ok[block] == 1

  def _widths(self) -> np.ndarray:
    """Values per record of each feature (FEATURE_NAMES order), as record 0 has them."""
    return np.asarray(
      [
        1
        if name == "next_sentence_labels"
        else self.max_seq_length
        if name in SEQUENCE_FEATURES
        else self.max_predictions_per_seq
        for name in FEATURE_NAMES
      ],
      np.int64,
    )

  def _values_fit(self, raw: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per record of `rows` (parsed spans): every int64 feature holds exactly record 0's number of varints of at most
    9 bytes (10-byte ones are negative values) and the weights record 0's number of floats. A batch of such records
    is decoded without further checks."""
    widths = self._widths()
    spans = self._spans[rows].astype(np.int64)
    fits = spans[:, _WEIGHTS, 1] == 4 * widths[_WEIGHTS]
    starts = (self.offsets[rows][:, None] + spans[:, _INTEGERS, 0]).reshape(-1)  # record-major
    lengths = spans[:, _INTEGERS, 1].reshape(-1)
    packed, offsets, ends = _joined_spans(raw, starts, lengths)
    terminal = np.r_[0, np.cumsum(packed < 0x80)]
    counts = (terminal[offsets + lengths] - terminal[offsets]).reshape(len(rows), len(_INTEGERS))
    last_byte = packed[np.maximum(offsets + lengths - 1, 0)] if packed.size else np.zeros(0, np.uint8)
    closed = ((lengths == 0) | (last_byte < 0x80)).reshape(len(rows), len(_INTEGERS))
    fits &= np.all(counts == widths[_INTEGERS], axis=1) & np.all(closed, axis=1)
    sizes = np.diff(np.r_[-1, ends])
    long_varints = np.searchsorted(offsets + lengths, ends[sizes > 9], side="right") // len(_INTEGERS)
    fits[long_varints] = False
    return fits

  def _read_canonical(self, local_indices: np.ndarray) -> dict[str, np.ndarray] | None:
    """The batch from the parsed blocks' spans: one gather of the weights' bytes and one gather plus one vectorised
    varint decode of all int64 features' packed values (None: some record needs the general parser, or has another
    shape than record 0)."""
    if not self._all_canonical and not all(
      [self._canonical_block(block) for block in np.unique(local_indices // self._BLOCK).tolist()]
    ):
      return None
    if not np.all(self._fits[local_indices]):
      return None
    bad = np.flatnonzero(self._bad_crc[local_indices])
    if bad.size:
      raise UserError(
        f"{self.path}: record {local_indices[bad[0]]} has a bad data checksum; the file is corrupt: regenerate it"
      )
    count = len(local_indices)
    widths = self._widths()
    raw = np.frombuffer(self.data(), np.uint8)
    spans = self._spans[local_indices].astype(np.int64)  # [n, 7, 2]
    record_starts = self.offsets[local_indices]
    # The weights (4-byte floats) and the int64 features whose every value is one byte in this batch (masks,
    # segments, small positions: span length = width) come from one gather of fixed-width byte columns; the others'
    # packed spans are joined (feature-major) and decoded at once. Each record's span holds exactly `width` varints
    # (_fits).
    single_byte = np.all(spans[:, :, 1] == widths, axis=0)
    varint_features = [index for index in _INTEGERS if not single_byte[index]]
    fixed = [_WEIGHTS] + [index for index in _INTEGERS if single_byte[index]]
    fixed_bytes = [4 * int(widths[index]) if index == _WEIGHTS else int(widths[index]) for index in fixed]
    columns = raw[
      (record_starts[:, None] + np.repeat(spans[:, fixed, 0], fixed_bytes, axis=1))
      + np.concatenate([np.arange(size) for size in fixed_bytes])
    ]  # [n, Σ fixed_bytes]
    batch = {}
    column = 0
    for index, size in zip(fixed, fixed_bytes):
      name = FEATURE_NAMES[index]
      values = columns[:, column : column + size]
      if index == _WEIGHTS:
        values = np.ascontiguousarray(values).view("<f4")
      batch[name] = values.astype(FEATURE_DTYPES[name])
      column += size
    if varint_features:
      starts = (record_starts[None, :] + spans[:, varint_features, 0].T).reshape(-1)
      packed, _, ends = _joined_spans(raw, starts, spans[:, varint_features, 1].T.reshape(-1))
      decoded = _decode_terminated_varints(packed, ends)
      offset = 0
      for index in varint_features:
        name, size = FEATURE_NAMES[index], count * int(widths[index])
        batch[name] = decoded[offset : offset + size].astype(FEATURE_DTYPES[name]).reshape(count, widths[index])
        offset += size
    return batch

  def read(self, local_indices: np.ndarray, vocab_size: int | None) -> dict[str, np.ndarray]:
    batch = self._read_canonical(np.asarray(local_indices, np.int64))
    if batch is None:  # the general parser: any valid Example, and one-line errors naming the bad record
      examples = self._examples(local_indices)
      batch = {
        name: self._decode_feature(name, [example[name] for example in examples], local_indices)
        for name in FEATURE_NAMES
      }
    batch["next_sentence_labels"] = batch["next_sentence_labels"][:, 0]
    if vocab_size is not None:
      largest = max(batch["input_ids"].max(initial=0), batch["masked_lm_ids"].max(initial=0))
      if largest >= vocab_size or min(batch["input_ids"].min(initial=0), batch["masked_lm_ids"].min(initial=0)) < 0:
        raise UserError(
          f"{self.path}: token id {largest} is outside the vocabulary of {vocab_size} entries; the "
          "data was built with another vocabulary: regenerate it or pass the right vocabulary"
        )
    return batch

  def _decode_feature(
    self, name: str, kinds_and_payloads: list[tuple[int, bytes]], local_indices: np.ndarray
  ) -> np.ndarray:
    """[n, width] values of one feature across records; UserError naming the first record that does not fit."""
    expected_kind = _FLOAT_LIST if name == "masked_lm_weights" else _INT64_LIST
    wrong_kind = [i for i, (kind, _) in enumerate(kinds_and_payloads) if kind != expected_kind]
    if wrong_kind:
      raise UserError(
        f"{self.path}: record {local_indices[wrong_kind[0]]} stores {name} as the wrong type; "
        "expected Google's format (int64 lists, float list for masked_lm_weights)"
      )
    try:
      values, counts = _decode_packed(expected_kind, [payload for _, payload in kinds_and_payloads])
    except _ProtoError as error:
      raise UserError(
        f"{self.path}: a record among {local_indices.tolist()[:5]}... has a malformed {name} "
        f"({error}); the file is corrupt"
      ) from None
    width = (
      1
      if name == "next_sentence_labels"
      else (self.max_seq_length if name in SEQUENCE_FEATURES else self.max_predictions_per_seq)
    )
    wrong = np.flatnonzero(counts != width)
    if wrong.size:
      raise UserError(
        f"{self.path}: record {local_indices[wrong[0]]} has {counts[wrong[0]]} {name} values, "
        f"expected {width} like record 0; all records must share one shape"
      )
    return values.astype(FEATURE_DTYPES[name]).reshape(len(local_indices), width)
