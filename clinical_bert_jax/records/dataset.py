"""Opening pretraining data: a writer for either format, and `PretrainingData`, one dataset over many shards.

`PretrainingData.open` expands globs, paths or directories (a directory's manifest lists its shards), opens each
file as a native shard or a TFRecord file by its magic bytes, checks that all share one shape and agree with their
manifest, and serves random-access batches across them for the training input pipeline.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clinical_bert_jax.errors import UserError
from clinical_bert_jax.records.base import _Shard
from clinical_bert_jax.records.native import NATIVE_MAGIC, NativeShardWriter, _NativeShard
from clinical_bert_jax.records.schema import (
  FEATURE_DTYPES,
  FEATURE_NAMES,
  FORMAT_NATIVE,
  FORMAT_TFRECORD,
  MANIFEST_NAME,
  NATIVE_SUFFIX,
  SEQUENCE_FEATURES,
  TFRECORD_SUFFIX,
  read_manifest,
)
from clinical_bert_jax.records.tfrecord import TFRecordWriter, _TFRecordShard


def open_writer(
  file_format: str, path: str | os.PathLike, max_seq_length: int, max_predictions_per_seq: int, vocab_size: int
) -> NativeShardWriter | TFRecordWriter:
  """A writer for `file_format` (FORMAT_NATIVE or FORMAT_TFRECORD) with the same interface either way."""
  if file_format == FORMAT_NATIVE:
    return NativeShardWriter(path, max_seq_length, max_predictions_per_seq, vocab_size)
  if file_format == FORMAT_TFRECORD:
    return TFRecordWriter(path, max_seq_length, max_predictions_per_seq, vocab_size)
  raise UserError(f"unknown output format {file_format!r}; use {FORMAT_NATIVE} or {FORMAT_TFRECORD}")


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
      (s.max_predictions_per_seq for s in shards if s.max_predictions_per_seq is not None), None
    )
    self._vocab_size: int | None = None

  @classmethod
  def open(
    cls, paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike], verify_checksums: bool = True
  ) -> PretrainingData:
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
        reference.max_seq_length,
        reference.max_predictions_per_seq,
      ):
        raise UserError(
          f"{shard.path} has max_seq_length={shard.max_seq_length}, max_predictions_per_seq="
          f"{shard.max_predictions_per_seq} but {reference.path} has {reference.max_seq_length}, "
          f"{reference.max_predictions_per_seq}; train on files generated with the same settings"
        )
    data = cls(shards, _shared_manifest(shards))
    if len(data) == 0:
      raise UserError(
        f"pretraining data {', '.join(str(path) for path in paths[:3])} holds no instances; "
        "regenerate it from a non-empty corpus"
      )
    return data

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def get_batch(self, indices: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """Instances at global `indices`, as [n, max_seq_length] / [n, max_predictions_per_seq] / [n] arrays."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"indices must be in [0, {len(self)})")
    if len(self.shards) == 1 and indices.size:  # the shard's arrays are fresh: no copy into a new batch
      return self.shards[0].read(indices, self._vocab_size)
    shard_ids = np.searchsorted(self._ends, indices, side="right")
    batch = {
      name: np.zeros((indices.size,) + self._feature_shape(name), FEATURE_DTYPES[name]) for name in FEATURE_NAMES
    }
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

  def validate_against(
    self, vocab_size: int, vocab_sha256: str | None, max_seq_length: int, max_predictions_per_seq: int | None
  ) -> None:
    """Checks that the data fits the model about to train on it; UserError naming the first mismatch.

    `vocab_size` is the number of entries of the vocabulary file (`vocab_fingerprint`), not an embedding table
    padded for speed: shards record the former. Token ids are checked against `vocab_size` here for native shards
    (footer max id) and on every read for TFRecords, because an out-of-range id would be silently clamped by JAX's
    gather. Pass `max_predictions_per_seq=None` when the trainer does not use the stored predictions (dynamic masking).
    """
    manifest = self.manifest or {}
    where = f"the manifest of {self.shards[0].path.parent}"
    if vocab_sha256 is not None and manifest.get("vocab_sha256") not in (None, vocab_sha256):
      raise UserError(
        f"vocabulary mismatch: {where} was built with a vocab of sha256 {manifest['vocab_sha256']} "
        f"but training uses sha256 {vocab_sha256}; pass the same --vocab_file or regenerate the data"
      )
    if manifest.get("vocab_size") not in (None, vocab_size):
      raise UserError(
        f"vocab_size mismatch: {where} says {manifest['vocab_size']} but training uses {vocab_size}; "
        "pass the same vocabulary or regenerate the data"
      )
    for shard in self.shards:
      checks = [("max_seq_length", shard.max_seq_length, max_seq_length)]
      if max_predictions_per_seq is not None:
        checks.append(("max_predictions_per_seq", shard.max_predictions_per_seq, max_predictions_per_seq))
      for name, stored, wanted in checks:
        if shard.count and stored != wanted:
          raise UserError(
            f"{name} mismatch: {shard.path} has {stored} but training uses {wanted}; set "
            f"--{name}={stored} or regenerate the data with --{name}={wanted}"
          )
      if shard.vocab_size is not None and shard.vocab_size != vocab_size:
        raise UserError(
          f"vocab_size mismatch: {shard.path} was written for {shard.vocab_size} ids but training "
          f"uses {vocab_size}; pass the same vocabulary or regenerate the data"
        )
      if shard.max_id is not None and shard.max_id >= vocab_size:
        raise UserError(
          f"{shard.path} holds token id {shard.max_id}, outside the vocabulary of {vocab_size} "
          "entries; pass the vocabulary the data was built with or regenerate it"
        )
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
      raise UserError(
        f"{shard.path} is not listed in {directory / MANIFEST_NAME}; it belongs to another run: "
        "remove it or move it to its own directory"
      )
    if int(entry["count"]) != shard.count:
      raise UserError(
        f"{shard.path} holds {shard.count} instances but {MANIFEST_NAME} lists {entry['count']}; "
        "the data directory is inconsistent: regenerate it"
      )
    if shard.checksum is not None and entry.get("checksum") not in (None, shard.checksum):
      raise UserError(
        f"{shard.path} has checksum {shard.checksum} but {MANIFEST_NAME} lists {entry['checksum']}; "
        "the data directory is inconsistent: regenerate it"
      )
    if shard.max_id is None and entry.get("max_id") is not None:
      shard.max_id = int(entry["max_id"])
  return manifest
