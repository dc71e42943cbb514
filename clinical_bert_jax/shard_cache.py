"""Training shards on object storage: a local cache filled on first use and verified by the shards' checksums.

`np.memmap` (how `records` reads native shards, at any random batch of indices) needs a local file, so shards given
as `gs://` globs or directories are downloaded once into `--data_cache_dir` (default `~/.cache/clinical_bert_jax/
shards`) under `CACHE/<bucket>/<path>`, next to their `manifest.json`. After each download the payload CRC-32 is
checked against the manifest's entry and the native shard's own footer (TFRecord: the whole-file CRC-32 against the
manifest); a shard that fails is deleted from the cache and the run stops with one line naming its URI. A shard
already in the cache is reused when its size and recorded checksum match the bucket's. Downloads go to a temporary
name and are renamed when verified, so a killed download never looks cached.

The cache is bounded by its disk: before downloading, the missing bytes are compared with the free space (plus a
1 GiB margin) and the run refuses to start, naming `--data_cache_dir`, when they do not fit; a disk that fills
during the download anyway (another writer) gives the same one line. Remove the folder to reclaim the space.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

from clinical_bert_jax import fileio, records
from clinical_bert_jax.errors import UserError

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clinical_bert_jax" / "shards"
FREE_SPACE_MARGIN = 1 << 30
_SIDE_SUFFIX = ".verified.json"
_BLOCK = 16 << 20


def localize(input_glob: str, cache_dir: str | os.PathLike | None, flag: str) -> str:
  """`input_glob` (comma-separated globs, files or data directories) with each remote part replaced by cached local
  copies; local parts and remote globs that match nothing (so `records` reports them as it would a local one) stay."""
  parts = [part.strip() for part in input_glob.split(",") if part.strip()]
  if not any(fileio.is_remote(part) for part in parts):
    return input_glob
  cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
  plans = [_plan(part, flag) if fileio.is_remote(part) else part for part in parts]
  wanted = [item for plan in plans if not isinstance(plan, str) for item in plan[1]]
  _check_space(cache, wanted, flag)
  local_parts = []
  for part, plan in zip(parts, plans):
    if isinstance(plan, str):
      local_parts.append(plan)
      continue
    manifest, shards = plan
    if not shards:
      local_parts.append(part)
      continue
    if manifest is not None:
      _fetch(manifest[0], _cache_path(cache, manifest[0]), cache, flag)
    expected = manifest[1] if manifest is not None else {}
    for uri, size in shards:
      local = _cache_path(cache, uri)
      _fetch_shard(uri, size, local, expected.get(uri.rsplit("/", 1)[-1]), cache, flag)
      local_parts.append(str(local))
  return ",".join(local_parts)


def _cache_path(cache: Path, uri: str) -> Path:
  return cache / uri.split("://", 1)[1]


def _plan(part: str, flag: str) -> tuple[tuple[str, dict[str, str]] | None, list[tuple[str, int]]]:
  """(the manifest's URI and its checksums by shard name, or None; [(shard URI, size)]) of one remote part."""
  import fsspec

  fileio.check_bucket(part, flag)
  try:
    filesystem, _ = fsspec.core.url_to_fs(part)
    path = fileio.as_path(part)
    if path.is_dir():
      manifest_uri = f"{part.rstrip('/')}/{records.MANIFEST_NAME}"
      if fileio.as_path(manifest_uri).exists():
        manifest = json.loads(fileio.as_path(manifest_uri).read_text())
        records.check_shard_names(manifest, manifest_uri)
        uris = [f"{part.rstrip('/')}/{shard['name']}" for shard in manifest["shards"]]
      else:
        uris = fileio.glob(f"{part.rstrip('/')}/*{records.NATIVE_SUFFIX}") + fileio.glob(
          f"{part.rstrip('/')}/*{records.TFRECORD_SUFFIX}"
        )
    else:
      uris = [uri for uri in fileio.glob(part) if not uri.endswith("/" + records.MANIFEST_NAME)]
    shards = [(uri, int(filesystem.info(uri)["size"])) for uri in uris]
    directories = {uri.rsplit("/", 1)[0] for uri in uris}
    manifest_entry = None
    if len(directories) == 1:
      manifest_uri = f"{directories.pop()}/{records.MANIFEST_NAME}"
      if fileio.as_path(manifest_uri).exists():
        manifest = json.loads(fileio.as_path(manifest_uri).read_text())
        records.check_shard_names(manifest, manifest_uri)
        manifest_entry = (manifest_uri, {shard["name"]: shard.get("checksum") for shard in manifest["shards"]})
  except UserError:
    raise
  except (json.JSONDecodeError, KeyError, TypeError):
    raise UserError(
      f"{flag}={part}: its {records.MANIFEST_NAME} is not a valid manifest; regenerate the data"
    ) from None
  except Exception as error:
    raise fileio.storage_error(part, error, flag, "cannot list it") from None
  return manifest_entry, shards


def _check_space(cache: Path, wanted: list[tuple[str, int]], flag: str) -> None:
  missing = sum(size for uri, size in wanted if not _is_cached(_cache_path(cache, uri), size))
  if not missing:
    return
  try:
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
  except OSError as error:
    raise UserError(f"--data_cache_dir={cache}: cannot create it ({error.strerror}); pass a writable folder") from None
  if missing + FREE_SPACE_MARGIN > free:
    raise UserError(
      f"--data_cache_dir={cache} has {free / 2**30:.1f} GiB free but the {flag} shards need "
      f"{missing / 2**30:.1f} GiB more (plus a 1 GiB margin); point it at a larger disk or free space"
    )


def _is_cached(local: Path, size: int) -> bool:
  side = local.with_name(local.name + _SIDE_SUFFIX)
  try:
    return local.stat().st_size == size and json.loads(side.read_text()).get("size") == size
  except (OSError, ValueError):
    return False


def _fetch(uri: str, local: Path, cache: Path, flag: str) -> None:
  try:
    fileio.download_file(uri, local)
  except OSError as error:
    if isinstance(error, OSError) and error.errno is not None and local.parent.is_relative_to(cache):
      raise UserError(
        f"--data_cache_dir={cache}: cannot store {uri} ({fileio._reason(error)}); free space or pass another folder"
      ) from None
    raise fileio.storage_error(uri, error, flag, "cannot download it") from None
  except Exception as error:
    raise fileio.storage_error(uri, error, flag, "cannot download it") from None


def _fetch_shard(uri: str, size: int, local: Path, expected: str | None, cache: Path, flag: str) -> None:
  if _is_cached(local, size):
    recorded = json.loads(local.with_name(local.name + _SIDE_SUFFIX).read_text()).get("checksum")
    if expected is None or recorded == expected:
      return
  _fetch(uri, local, cache, flag)
  try:
    checksum, footer = payload_checksum(local)
  except (OSError, ValueError) as error:
    local.unlink(missing_ok=True)
    raise UserError(f"{flag}: {uri} is not a complete shard after download ({error}); regenerate the data") from None
  reference = expected or footer
  if reference is not None and checksum != reference or footer is not None and checksum != footer:
    local.unlink(missing_ok=True)
    raise UserError(
      f"{flag}: {uri} has checksum {checksum} after download but "
      f"{'its manifest lists ' + expected if expected else 'its footer says ' + str(footer)}; the object "
      "is corrupt or changed while downloading: rerun, or regenerate the data"
    )
  side = local.with_name(local.name + _SIDE_SUFFIX)
  with fileio.atomic_write(side) as handle:
    json.dump({"uri": uri, "size": size, "checksum": checksum}, handle)


def payload_checksum(path: Path) -> tuple[str, str | None]:
  """("crc32:<hex>" as `records` computes it for the manifest, the native footer's own checksum or None)."""
  size = path.stat().st_size
  with open(path, "rb") as handle:
    native = handle.read(len(records.NATIVE_MAGIC)) == records.NATIVE_MAGIC
    if native:
      if size < records.NATIVE_HEADER_SIZE + records.NATIVE_FOOTER_SIZE:
        raise ValueError("shorter than a header and footer")
      handle.seek(size - records.NATIVE_FOOTER_SIZE)
      magic, _, footer_crc, _ = struct.unpack("<8sQII", handle.read(records.NATIVE_FOOTER_SIZE))
      if magic != records.NATIVE_FOOTER_MAGIC:
        raise ValueError("no footer")
      start, end = records.NATIVE_HEADER_SIZE, size - records.NATIVE_FOOTER_SIZE
    else:
      start, end, footer_crc = 0, size, None
    handle.seek(start)
    crc, remaining = 0, end - start
    while remaining > 0:
      block = handle.read(min(_BLOCK, remaining))
      if not block:
        raise ValueError("truncated")
      crc = zlib.crc32(block, crc)
      remaining -= len(block)
  return f"crc32:{crc:08x}", (f"crc32:{footer_crc:08x}" if footer_crc is not None else None)
