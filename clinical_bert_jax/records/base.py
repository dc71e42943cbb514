"""What the two shard formats share: instance checks, the streaming writer base class and the reader base class.

Both writers validate instances the same way (`_check_batch`: shapes, padding, masks that are prefixes of ones, ids
inside the vocabulary) and stream encoded chunks to a temporary name that is renamed on `close()`
(`_StreamingWriter`); the format modules only encode. `_Shard` is the lazily mapped file both readers build on.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from clinical_bert_jax.fileio import atomic_write
from clinical_bert_jax.records.schema import FEATURE_NAMES, SEQUENCE_FEATURES, ShardInfo

_WRITE_CHUNK = 1024  # instances encoded per vectorised batch


# ----------------------------------------------------------------------------------------------------------------
# Instance validation (shared by both writers)
# ----------------------------------------------------------------------------------------------------------------


def _feature_shape(name: str, max_seq_length: int, max_predictions: int) -> tuple[int, ...]:
  if name == "next_sentence_labels":
    return ()
  return (max_seq_length,) if name in SEQUENCE_FEATURES else (max_predictions,)


def _stack_instances(
  instances: Sequence[Mapping[str, np.ndarray]], max_seq_length: int, max_predictions: int, first_index: int, path: Path
) -> dict[str, np.ndarray]:
  """Stacks single instances into [n, ...] arrays, naming the first instance whose feature has the wrong shape."""
  batch = {}
  for name in FEATURE_NAMES:
    expected_shape = _feature_shape(name, max_seq_length, max_predictions)
    allowed_shapes = {expected_shape, (1,)} if name == "next_sentence_labels" else {expected_shape}
    bad = [index for index, instance in enumerate(instances) if instance[name].shape not in allowed_shapes]
    if bad:
      raise ValueError(
        f"instance {first_index + bad[0]} written to {path}: {name} does not have the shape {expected_shape}"
      )
    batch[name] = np.stack([instance[name].reshape(expected_shape) for instance in instances])
  return batch


def _check_batch(
  arrays: Mapping[str, np.ndarray],
  max_seq_length: int,
  max_predictions: int,
  vocab_size: int | None,
  first_index: int,
  path: Path,
) -> dict[str, np.ndarray]:
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
      raise ValueError(
        f"instances {first_index}.. written to {path}: {name} has the shape {array.shape}, expected {expected_shape}"
      )
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
  check(
    (batch["input_mask"] == (positions < num_tokens[:, None])).all(axis=1),
    "input_mask must be 1 on a prefix of real tokens and 0 after it",
  )
  segment_b_start = num_tokens - batch["segment_ids"].sum(axis=1)
  expected_segments = (positions >= segment_b_start[:, None]) & (positions < num_tokens[:, None])
  check(
    (batch["segment_ids"] == expected_segments).all(axis=1),
    "segment_ids must be 0 on segment A, 1 on segment B and 0 on padding",
  )
  check(
    ~np.any((batch["input_ids"] != 0) & (positions >= num_tokens[:, None]), axis=1),
    "input_ids must be 0 where input_mask is 0",
  )

  num_predictions = (batch["masked_lm_weights"] > 0).sum(axis=1)
  real = np.arange(max_predictions) < num_predictions[:, None]
  check(
    (batch["masked_lm_weights"] == real).all(axis=1),
    "masked_lm_weights must be 1.0 on a prefix of slots and 0.0 after it",
  )
  check(
    ~np.any(~real & ((batch["masked_lm_positions"] != 0) | (batch["masked_lm_ids"] != 0)), axis=1),
    "masked_lm_positions/ids must be 0 in unused slots",
  )
  check(
    ~np.any(real & (batch["masked_lm_positions"] >= num_tokens[:, None]), axis=1),
    "a masked_lm_position points past the real tokens",
  )
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

  def __init__(
    self,
    path: str | os.PathLike,
    max_seq_length: int | None,
    max_predictions_per_seq: int | None,
    vocab_size: int | None,
  ):
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
      raise ValueError(
        f"instance {self.count + len(self._pending)} written to {self.path} lacks the feature "
        f"{error}; expected {list(FEATURE_NAMES)}"
      ) from None
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
      raise ValueError(
        f"batch written to {self.path} at instance {self.count} lacks the feature {error}; expected "
        f"{list(FEATURE_NAMES)}"
      ) from None
    for name in ("input_ids", "masked_lm_ids"):
      if arrays[name].ndim != 2:
        raise ValueError(
          f"batch written to {self.path} at instance {self.count}: {name} has the shape "
          f"{arrays[name].shape}, not [n, width]; use write() for a single instance"
        )
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
    self._write_checked(
      _stack_instances(instances, self.max_seq_length, self.max_predictions_per_seq, self.count, self.path)
    )

  def _write_checked(self, arrays: Mapping[str, np.ndarray]) -> None:
    """Checks, encodes and appends [n, ...] arrays of instances."""
    batch = _check_batch(
      arrays, self.max_seq_length, self.max_predictions_per_seq, self.vocab_size, self.count, self.path
    )
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
