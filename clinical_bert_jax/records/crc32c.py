"""CRC-32C (Castagnoli), the checksum of TFRecord framing, computed in numpy over many messages at once.

`masked_crc32c` is the masked form TFRecord stores after each length and each record. TensorFlow is not needed.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


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
    while (
      end < len(order)
      and end - start < _CRC_CHUNK_MESSAGES
      and (end - start + 1) * lengths[order[end]] <= _CRC_CHUNK_BYTES
    ):
      end += 1
    chunk = order[start:end]
    result[chunk] = _crc32c_aligned([messages[index] for index in chunk], lengths[chunk])
    start = end
  return result


def masked_crc32c(messages: Sequence[bytes]) -> np.ndarray:
  """TFRecord's masked CRC: rotate right by 15 bits and add 0xA282EAD8."""
  crc = crc32c_many(messages)
  return ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)
