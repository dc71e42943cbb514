"""The instance schema, the two on-disk formats' names and the `manifest.json` that describes a data directory.

An instance is a dict of numpy arrays with exactly Google's TFRecord feature names and dtypes (`FEATURE_NAMES`,
`FEATURE_DTYPES`; see the package docstring). A writer reports a `ShardInfo` on close; `write_manifest` records the
shards of one run with the vocabulary and settings they were built with, and `read_manifest` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from clinical_bert_jax import __version__
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.fileio import atomic_write

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


_REQUIRED_MANIFEST_KEYS = (
  "format",
  "vocab_sha256",
  "vocab_size",
  "do_lower_case",
  "max_seq_length",
  "max_predictions_per_seq",
  "masking",
  "shards",
)


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
  """Writes `directory/manifest.json` atomically and returns its path.

  `manifest["shards"]` may hold `ShardInfo`s or dicts; `total_instances` and `tool_version` are filled in when
  absent (a given `total_instances` must match the shards). Other keys (dupe_factor, seed, flags, ...) are kept.
  """
  missing = [key for key in _REQUIRED_MANIFEST_KEYS if key not in manifest]
  if missing:
    raise ValueError(f"manifest lacks required keys {missing}")
  content = dict(manifest)
  content["shards"] = [shard.to_json() if isinstance(shard, ShardInfo) else dict(shard) for shard in manifest["shards"]]
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
    raise UserError(
      f"cannot read manifest {path}: {error.strerror}; point to a directory written by create_pretraining_data"
    ) from None
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"manifest {path} is not valid JSON ({error}); regenerate the data") from None
  missing = [key for key in _REQUIRED_MANIFEST_KEYS if key not in content] if isinstance(content, dict) else ["all"]
  if missing:
    raise UserError(f"manifest {path} lacks the keys {missing}; regenerate the data with create_pretraining_data")
  check_shard_names(content, path)
  return content


def is_confined_name(name: Any) -> bool:
  """Whether `name` (a manifest's file entry) stays inside the manifest's directory: a relative path with no `..`,
  no absolute or drive path, no URI, no backslash."""
  if not isinstance(name, str) or not name or "\\" in name or "://" in name or ":" in name.split("/", 1)[0]:
    return False
  parts = name.split("/")
  return not name.startswith("/") and all(part not in ("", ".", "..") for part in parts)


def check_shard_names(content: Mapping[str, Any], path: str | os.PathLike) -> None:
  """UserError when an entry of `content["shards"]` names a file outside the manifest's directory. The entry is
  named by its index, never quoted: a hostile manifest's text does not reach the terminal or the logs."""
  shards = content.get("shards") if isinstance(content, Mapping) else None
  if not isinstance(shards, list):
    raise UserError(f"manifest {path}: 'shards' is not a list; regenerate the data with create_pretraining_data")
  for index, entry in enumerate(shards):
    if not isinstance(entry, Mapping) or not is_confined_name(entry.get("name")):
      raise UserError(
        f"manifest {path}: shards[{index}] does not name a file inside the manifest's directory (a "
        "relative name without '..', absolute paths or URIs is required); regenerate the data"
      )
