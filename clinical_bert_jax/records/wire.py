"""The protobuf wire format of `tf.train.Example`, encoded and decoded in numpy without TensorFlow.

`encode_examples` serialises [n, ...] instance arrays the way TensorFlow does (packed lists, Google's feature
order). Decoding has two paths: the general parser (`example_feature_payloads`, `decode_example`), which accepts
any valid Example and raises `_ProtoError` on malformed bytes, and the vectorised decoder of the fixed pretraining
layout (`_canonical_feature_spans`), which finds every feature's packed values for a whole batch of records at once.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from clinical_bert_jax.records.schema import FEATURE_NAMES


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
_FEATURE_KEYS = {
  name: (_length_delimited(b"\x0a", name.encode()), b"\x12" if name == "masked_lm_weights" else b"\x1a")
  for name in FEATURE_NAMES
}


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
  return [
    _length_delimited(b"\x0a", b"".join(_feature_entry(key, tag, packed[index]) for key, tag, packed in columns))
    for index in range(len(columns[0][2]))
  ]


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
      value, offset = data[offset : offset + length], offset + length
    elif wire_type in (1, 5):
      size = 8 if wire_type == 1 else 4
      if offset + size > len(data):
        raise _ProtoError("truncated field")
      value, offset = data[offset : offset + size], offset + size
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
  return {name: _decode_packed(kind, [payload])[0] for name, (kind, payload) in example_feature_payloads(data).items()}


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


def _canonical_feature_spans(
  raw: np.ndarray, starts: np.ndarray, ends: np.ndarray
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
