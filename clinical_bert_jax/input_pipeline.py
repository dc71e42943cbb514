"""Training and evaluation input: deterministic global shuffling, per-host batch slices, resumable position, prefetch.

Design (bert-pretraining.md §10, rows 1-3):

* The order of an epoch is a numpy permutation of all instance indices, drawn on the HOST from PCG64 seeded with
  `(seed, epoch)`. A device-side `jax.random.permutation` over tens of millions of indices is what ran TPUs out of
  memory in HF's Flax examples (transformers#15411); a host permutation costs 4 bytes per instance, once per epoch.
* Global batch k of an epoch is the consecutive slice `order[k*G:(k+1)*G]`. Process p of P takes rows
  `[p*G/P, (p+1)*G/P)` of it and reads only those records, so no host ever loads the whole global batch and the
  union of the hosts' slices is exactly the single-process batch, in process order.
* The position is `(epoch, index into the epoch's order)`: two integers that do not depend on the batch size or the
  number of processes. It goes into the checkpoint (`data_state`) and a resumed run continues with the very next
  instance, also on a different number of hosts.
* A background thread (`Prefetcher`) keeps a few host batches ready and `prefetch_to_device` keeps a few already on
  the accelerators, so reading and host-to-device copies overlap the train step. Both report the position of the last
  batch handed to the caller, not of what they read ahead, so a checkpoint never skips prefetched batches.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, Sharding

from clinical_bert_jax import shard_cache
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.records import PretrainingData
from clinical_bert_jax.sharding import host_local_to_global

Batch = dict[str, np.ndarray]
STATE_VERSION = 1
# Instances checked by `needs_dynamic_masking` when no manifest says how the data was masked.
_MASKING_PROBE_SIZE = 64


def open_pretraining_data(
  input_glob: str,
  *,
  vocab_size: int,
  vocab_sha256: str | None,
  max_seq_length: int,
  max_predictions_per_seq: int | None,
  flag: str = "--input_file",
  cache_dir: str | None = None,
) -> PretrainingData:
  """Opens pretraining shards for training and checks they fit the model; one-line UserError naming `flag` if not.

  `input_glob` is a comma-separated list of globs, files or data directories. `max_predictions_per_seq` is checked
  against the stored prediction slots unless the data is unmasked (`needs_dynamic_masking`): then the trainer makes
  its own predictions and the stored width does not matter. Pass None to skip that check explicitly.
  Remote (`gs://`) parts are read through the local shard cache `cache_dir` (`shard_cache`).
  """
  if not input_glob or not input_glob.strip():
    raise UserError(f"{flag} is empty; pass a glob of .cbj or .tfrecord files written by create_pretraining_data")
  local_glob = shard_cache.localize(input_glob, cache_dir, flag)
  try:
    data = PretrainingData.open(local_glob)
    if needs_dynamic_masking(data):
      max_predictions_per_seq = None
    data.validate_against(vocab_size, vocab_sha256, max_seq_length, max_predictions_per_seq)
  except UserError as error:
    raise UserError(f"{flag}={input_glob}: {error}") from None
  return data


def needs_dynamic_masking(data: PretrainingData) -> bool:
  """True when the instances carry no masked-LM predictions, so the train step must mask them (masking.py).

  The manifest's `masking` field decides when there is one. TFRecords from elsewhere have no manifest: Google's
  generator always writes at least one prediction per instance, so all-zero weights in the first instances (or no
  prediction slots at all) mean the data was written unmasked.
  """
  if data.manifest is not None:
    return data.manifest.get("masking") == "none"
  if not data.max_predictions_per_seq:
    return True
  probe = data.get_batch(np.arange(min(len(data), _MASKING_PROBE_SIZE)))
  return not probe["masked_lm_weights"].any()


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_count = jax.process_count() if process_count is None else process_count
  process_index = jax.process_index() if process_index is None else process_index
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  return process_index, process_count


def _host_batch_size(global_batch_size: int, process_count: int, flag: str) -> int:
  if global_batch_size <= 0:
    raise UserError(f"{flag}={global_batch_size} must be a positive number of instances")
  if global_batch_size % process_count:
    raise UserError(
      f"{flag}={global_batch_size} is not divisible by the {process_count} processes of this run; "
      f"use a multiple of {process_count}"
    )
  return global_batch_size // process_count


class PretrainingInput:
  """Endless iterator over this host's slices of shuffled global training batches, with a resumable position.

  Each epoch visits every instance once in the order `epoch_order(epoch)`. With `drop_remainder=True` (the default,
  like Google's `drop_remainder`) the `len(data) % G` instances left at the end of an epoch are skipped; as the order
  changes every epoch, a different few each time. With `drop_remainder=False` nothing is skipped: the last batch of an
  epoch is completed with the first instances of the next epoch, like Google's repeat-then-batch input, so every batch
  still has the static shape [G / process_count, ...].
  """

  def __init__(
    self,
    data: PretrainingData,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    shuffle: bool = True,
    flag: str = "--train_batch_size",
  ):
    self.data = data
    self.num_instances = len(data)
    self.global_batch_size = global_batch_size
    self.process_index, self.process_count = _process_layout(process_index, process_count)
    self.host_batch_size = _host_batch_size(global_batch_size, self.process_count, flag)
    if drop_remainder and global_batch_size > self.num_instances:
      raise UserError(
        f"{flag}={global_batch_size} is larger than the {self.num_instances} training instances; lower "
        "it or generate more data"
      )
    if seed < 0:
      raise UserError(f"the input seed must be a non-negative integer, got {seed}")
    self.seed = seed
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self._epoch = 0
    self._index = 0
    self._order: np.ndarray | None = None
    self._order_epoch: int | None = None

  @property
  def batches_per_epoch(self) -> float:
    """Global batches per epoch: whole with `drop_remainder`, fractional otherwise."""
    if self.drop_remainder:
      return self.num_instances // self.global_batch_size
    return self.num_instances / self.global_batch_size

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The instance indices of `epoch` in visiting order (int32 while the data has fewer than 2**31 instances).

    Only the latest epoch's order is kept: one permutation in memory, even for 100M instances (400 MB).
    """
    if self._order_epoch != epoch:
      dtype = np.int32 if self.num_instances < 2**31 else np.int64
      self._order = None  # free the previous order before building the next
      order = np.arange(self.num_instances, dtype=dtype)
      if self.shuffle:
        np.random.Generator(np.random.PCG64([self.seed, epoch])).shuffle(order)
      self._order, self._order_epoch = order, epoch
    return self._order

  def _next_global_indices(self) -> tuple[np.ndarray, int, int]:
    """Indices of the next global batch and the position after it (not yet committed)."""
    epoch, index, wanted = self._epoch, self._index, self.global_batch_size
    if self.drop_remainder and index + wanted > self.num_instances:
      epoch, index = epoch + 1, 0
    parts = []
    while wanted:
      taken = min(wanted, self.num_instances - index)
      parts.append(self.epoch_order(epoch)[index : index + taken].copy())
      index, wanted = index + taken, wanted - taken
      if index == self.num_instances:
        epoch, index = epoch + 1, 0
    if self.drop_remainder and index + self.global_batch_size > self.num_instances:
      epoch, index = epoch + 1, 0
    return np.concatenate(parts), epoch, index

  def __iter__(self) -> "PretrainingInput":
    return self

  def __next__(self) -> Batch:
    """This host's slice of the next global batch, as numpy arrays with Google's feature names."""
    indices, epoch, index = self._next_global_indices()
    start = self.process_index * self.host_batch_size
    batch = self.data.get_batch(indices[start : start + self.host_batch_size])
    self._epoch, self._index = epoch, index  # a failed read does not advance the position
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: the next batch starts at instance `index` of epoch `epoch`'s order."""
    return {
      "version": STATE_VERSION,
      "epoch": self._epoch,
      "index": self._index,
      "num_instances": self.num_instances,
      "seed": self.seed,
      "shuffle": self.shuffle,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state()` position; UserError if it was saved for other data or another seed."""
    try:
      epoch, index, version = int(state["epoch"]), int(state["index"]), int(state["version"])
      saved = {key: state[key] for key in ("num_instances", "seed", "shuffle")}
    except (KeyError, TypeError, ValueError):
      raise UserError(
        "the checkpoint's input position (data_state) is malformed; it was not written by this tool: "
        "start from a fresh --output_dir"
      ) from None
    if version != STATE_VERSION:
      raise UserError(
        f"the checkpoint's input position has format version {version}, this tool reads "
        f"{STATE_VERSION}; resume with the tool version that wrote it"
      )
    current = {"num_instances": self.num_instances, "seed": self.seed, "shuffle": self.shuffle}
    for key, value in current.items():
      if saved[key] != value:
        raise UserError(
          f"the checkpoint's input position was saved with {key}={saved[key]} but this run has "
          f"{key}={value}; resume with the same training data and seed, or start a new --output_dir"
        )
    if epoch < 0 or not 0 <= index <= self.num_instances:
      raise UserError(
        f"the checkpoint's input position (epoch {epoch}, index {index}) is outside the "
        f"{self.num_instances} training instances; the checkpoint is corrupt"
      )
    self._epoch, self._index = epoch, index


class EvalInput:
  """This host's slices of the first `num_batches` global batches of held-out data, in file order, unshuffled.

  Like Google's eval input: the same instances every evaluation, whole batches only (so shapes are static), at most
  `max_batches` of them. Iterating again starts over.
  """

  def __init__(
    self,
    data: PretrainingData,
    global_batch_size: int,
    max_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    flag: str = "--eval_batch_size",
  ):
    self.data = data
    self.global_batch_size = global_batch_size
    self.process_index, self.process_count = _process_layout(process_index, process_count)
    self.host_batch_size = _host_batch_size(global_batch_size, self.process_count, flag)
    available = len(data) // global_batch_size
    if available == 0:
      raise UserError(
        f"{flag}={global_batch_size} is larger than the {len(data)} evaluation instances; lower it or "
        "hold out more data"
      )
    self.num_batches = available if max_batches is None else min(max_batches, available)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Batch]:
    for batch in range(self.num_batches):
      start = batch * self.global_batch_size + self.process_index * self.host_batch_size
      yield self.data.get_batch(np.arange(start, start + self.host_batch_size))


def _state_of(source: Any) -> dict[str, Any] | None:
  get_state = getattr(source, "get_state", None)
  return get_state() if get_state is not None else None


class _Failure:
  """An exception raised by the producer thread, re-raised in the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()


class Prefetcher:
  """Reads `source` in a background thread, keeping up to `buffer_size` items ready.

  `get_state()` is the source's state after the last item returned by `next()`, so it is safe to checkpoint while
  the thread has read ahead. An exception in the thread (e.g. a corrupt record) is raised by the next `next()`.
  Call `close()` (or use it as a context manager) to stop the thread.
  """

  def __init__(self, source: Any, buffer_size: int = 2):
    if buffer_size < 1:
      raise ValueError(f"buffer_size={buffer_size} must be at least 1")
    self._source = source
    self._state = _state_of(source)
    self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._finished: Any = None  # _END or a _Failure once the producer is done
    self._thread = threading.Thread(target=self._produce, name="input-prefetch", daemon=True)
    self._thread.start()

  def _produce(self) -> None:
    try:
      for item in self._source:
        if not self._put((item, _state_of(self._source))):
          return
      self._put(_END)
    except BaseException as error:  # handed to the consumer, which owns error reporting
      self._put(_Failure(error))

  def _put(self, entry: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self) -> "Prefetcher":
    return self

  def __next__(self) -> Any:
    if self._finished is None:
      if self._stop.is_set():
        raise ValueError("the prefetcher is closed")
      entry = self._queue.get()
      if entry is _END or isinstance(entry, _Failure):
        self._finished = entry
      else:
        item, self._state = entry
        return item
    if isinstance(self._finished, _Failure):
      raise self._finished.error
    raise StopIteration

  def get_state(self) -> dict[str, Any] | None:
    return self._state

  def close(self) -> None:
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join()

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class DevicePrefetcher:
  """Keeps `size` batches already transferred to the devices; created by `prefetch_to_device`."""

  def __init__(self, source: Any, size: int, put: Callable[[Batch], dict[str, jax.Array]]):
    if size < 1:
      raise ValueError(f"size={size} must be at least 1")
    self._source = source
    self._iterator = iter(source)
    self._size = size
    self._put = put
    self._state = _state_of(source)
    self._buffer: collections.deque = collections.deque()

  def __iter__(self) -> "DevicePrefetcher":
    return self

  def __next__(self) -> dict[str, jax.Array]:
    while len(self._buffer) < self._size:
      try:
        batch = next(self._iterator)
      except StopIteration:
        break
      self._buffer.append((self._put(batch), _state_of(self._source)))
    if not self._buffer:
      raise StopIteration
    batch, self._state = self._buffer.popleft()
    return batch

  def get_state(self) -> dict[str, Any] | None:
    """The input position after the last batch returned (read-ahead batches not counted)."""
    return self._state

  def close(self) -> None:
    self._buffer.clear()
    if hasattr(self._source, "close"):
      self._source.close()


def prefetch_to_device(iterator: Any, size: int, sharding: Sharding | Mesh) -> DevicePrefetcher:
  """Turns host-local numpy batches into global jax.Arrays `size` batches ahead of their use.

  `sharding` is a `Mesh` (batch rows split as `sharding.batch_sharding(mesh)`, with its divisibility check) or any
  `jax.sharding.Sharding` applied to every feature. Each process passes only its rows; with several processes
  `jax.make_array_from_process_local_data` assembles the global batch, so the global row order follows the mesh's
  device order rather than process order (irrelevant for a loss summed over rows).
  """
  if isinstance(sharding, Mesh):
    mesh = sharding

    def put(batch: Batch) -> dict[str, jax.Array]:
      return host_local_to_global(batch, mesh)
  else:

    def put(batch: Batch) -> dict[str, jax.Array]:
      return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(values)) for name, values in batch.items()
      }

  return DevicePrefetcher(iterator, size, put)
