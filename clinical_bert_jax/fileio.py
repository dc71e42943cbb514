"""Paths, local or on object storage, and atomic outputs: the one place the project touches storage.

Every path a user passes may be a local path or a URI that `etils.epath` opens (`gs://bucket/...`, also `s3://`,
...). `as_path` returns a `pathlib.Path` for a local path (so local behaviour is exactly the standard library's) and an
`epath.Path` for a URI; both have the same `/`, `open`, `read_text`, `exists`, `iterdir`, `glob` methods.

Atomic outputs (`atomic_write`, `atomic_output_dir`): a run that is killed or fails midway must never leave anything a
later step could mistake for a complete result. Locally: write under a temporary name in the same directory, rename on
success, remove on failure. Temporary names carry the writer's process id (`.NAME.tmp-PID-XXXX`); what a SIGKILLed
writer left behind is removed by the next writer of the same NAME once that process no longer exists. A storage
failure (full disk, read-only filesystem, ...) propagates as the OSError, after the temporary file or directory is
removed; `errors.cli_main` reports it in one line. On object storage: write a temporary object next to the final one
and move it into place (a server-side copy, so the final object appears whole or not at all), delete the temporary
object on failure; directories are staged on the local disk and uploaded object by object once the block succeeded
(each object whole; small marker files such as `manifest.json` and `config.json` last, so a reader that finds them
finds the rest).

Storage endpoints (`configure_storage`, run on import): with `STORAGE_EMULATOR_HOST=http://HOST:PORT` set (a GCS API
emulator, or a private endpoint), every library we use talks to it with anonymous credentials: gcsfs (read by
`etils.epath`) natively, tensorstore (orbax's checkpoint storage) through `TENSORSTORE_GCS_HTTP_URL`. `etils.epath`
is told not to use TensorFlow's gfile (which ignores the emulator and is slow to import) unless `EPATH_USE_TF` is set.
Error messages name the URI and the reason, never credentials.
"""

from __future__ import annotations

import contextlib
import errno
import glob as glob_lib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterator, Sequence, Union

from clinical_bert_jax.errors import UserError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# Files of an output directory that readers take as the sign that the directory is complete: uploaded last.
_MARKER_FILES = ("manifest.json", "config.json", "results.json", "index.json")

AnyPath = Union[Path, Any]  # pathlib.Path or etils.epath.Path


# ---------------------------------------------------------------------------------------------- storage endpoints
def emulator_endpoint() -> str | None:
  """`http://HOST:PORT` of the GCS endpoint given by STORAGE_EMULATOR_HOST, or None for Google's."""
  host = os.environ.get(EMULATOR_ENV, "").strip()
  if not host or host == "default":
    return None
  return host if host.startswith(("http://", "https://")) else f"http://{host}"


def configure_storage() -> None:
  """Passes STORAGE_EMULATOR_HOST on to the libraries that need their own setting (idempotent; explicit settings win).

  Must run before the first `gs://` access (it runs when this module is imported; every tool imports it early).
  """
  os.environ.setdefault("EPATH_USE_TF", "false")
  endpoint = emulator_endpoint()
  if endpoint is not None:
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", endpoint)
    # gcsfs's experimental zonal/HNS support probes each bucket's type over gRPC, which an emulator does not serve:
    # the probe stalls ~60 s per bucket. An emulator bucket is a plain bucket.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  try:
    import fsspec
  except ImportError:
    return
  for protocol in ("gs", "gcs"):
    options = fsspec.config.conf.setdefault(protocol, {})
    # Several processes (hosts of a pod, a child export) share the workdir: never trust a cached listing.
    options.setdefault("use_listings_cache", False)
    if endpoint is not None:
      options.setdefault("token", "anon")


configure_storage()


# --------------------------------------------------------------------------------------------------------- paths
def is_remote(path: str | os.PathLike | None) -> bool:
  """True for a URI (`gs://...`); False for a local path."""
  if path is None:
    return False
  return bool(_URI.match(str(path)))  # str(), not os.fspath(): an epath.Path's fspath is "/gs/bucket/..."


def as_path(path: str | os.PathLike) -> AnyPath:
  """`pathlib.Path` for a local path, `etils.epath.Path` for a URI."""
  if is_remote(path):
    from etils import epath

    return epath.Path(str(path))
  return Path(path)


def display(path: str | os.PathLike) -> str:
  """The path as the user wrote it (`gs://...` for an epath.Path)."""
  return str(path)


def _reason(error: BaseException) -> str:
  """A short reason for a storage error, without request details (which could carry tokens)."""
  code = getattr(error, "code", None) or getattr(error, "status", None)
  text = str(error)
  if isinstance(error, FileNotFoundError) or code == 404 or text.startswith(("Not Found", "No such")):
    return "not found (check the bucket and path)"
  if isinstance(error, PermissionError) or code in (401, 403) or text.startswith(("Forbidden", "Unauthorized")):
    return "permission denied (check that this machine's credentials may use the bucket)"
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    return "no space left on device"
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  message = str(error).splitlines()[0] if str(error) else ""
  message = re.sub(r"(?i)(token|authorization|key|secret|signature)\S*", "[redacted]", message)
  return f"{type(error).__name__}: {message}"[:160]


def storage_error(
  path: str | os.PathLike, error: BaseException, flag: str | None = None, action: str = "cannot access it"
) -> UserError:
  """The one-line UserError for an I/O failure on `path` (a flag value or a file inside one)."""
  where = f"{flag}={display(path)}" if flag else display(path)
  return UserError(f"{where}: {action}: {_reason(error)}")


def glob(pattern: str) -> list[str]:
  """Sorted matches of a glob, local or remote (each remote match keeps its `gs://` prefix)."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(pattern))
  if not glob_lib.has_magic(pattern):
    return [pattern] if as_path(pattern).exists() else []
  import fsspec

  filesystem, _ = fsspec.core.url_to_fs(pattern)
  protocol = pattern.split("://", 1)[0]
  return sorted(f"{protocol}://{match}" for match in filesystem.glob(pattern))


def check_bucket(path: str | os.PathLike, flag: str) -> None:
  """UserError naming `path` when its bucket does not exist or cannot be listed (no-op for local paths)."""
  text = display(path)
  if not is_remote(text):
    return
  scheme, rest = text.split("://", 1)
  bucket = f"{scheme}://{rest.split('/', 1)[0]}"
  try:
    exists = as_path(bucket).exists()
  except Exception as error:  # gcsfs/aiohttp raise many types
    raise storage_error(path, error, flag, f"cannot read bucket {bucket}") from None
  if not exists:
    raise UserError(
      f"{flag}={text}: bucket {bucket} does not exist or cannot be read; check the name and this machine's credentials"
    )


# ------------------------------------------------------------------------------------------ local copies of inputs
_LOCAL_COPIES: dict[str, Path] = {}


def _download_root() -> Path:
  root = Path(tempfile.gettempdir()) / f"clinical_bert_jax-inputs-{os.getpid()}"
  if not root.exists():
    root.mkdir(parents=True, exist_ok=True)
    import atexit

    atexit.register(shutil.rmtree, root, True)
  return root


def local_copy(path: str | os.PathLike, flag: str | None = None) -> Path:
  """A local path with the content of `path`: the path itself when local, else a download (a file or a directory)
  into a per-process temporary folder, removed at exit. For small inputs (vocab, configs, model directories)."""
  text = display(path)
  if not is_remote(text):
    return Path(text)
  if text in _LOCAL_COPIES:
    return _LOCAL_COPIES[text]
  source = as_path(text)
  target = _download_root() / text.split("://", 1)[1]
  try:
    if source.is_dir():
      download_tree(source, target)
    elif source.exists():
      target.parent.mkdir(parents=True, exist_ok=True)
      download_file(source, target)
    else:
      check_bucket(text, flag or "path")
      raise UserError(f"{flag + '=' if flag else ''}{text} not found; check the path")
  except UserError:
    raise
  except Exception as error:
    raise storage_error(text, error, flag, "cannot download it") from None
  _LOCAL_COPIES[text] = target
  return target


def local_files(directory: str | os.PathLike, names: Sequence[str]) -> Path:
  """A local folder with copies of those of `names` that exist in (remote) `directory`."""
  target = _download_root() / uuid.uuid4().hex
  target.mkdir(parents=True)
  for name in names:
    source = as_path(directory) / name
    try:
      if source.is_file():
        download_file(source, target / name)
    except Exception as error:
      raise storage_error(source, error, action="cannot download it") from None
  return target


def local_copy_prefix(prefix: str, flag: str) -> Path:
  """Local copies of every file whose name starts with a remote `prefix` (a TF checkpoint); returns the local prefix."""
  check_bucket(prefix, flag)
  matches = glob(prefix + "*")
  if not matches:
    raise UserError(f"{flag}={prefix}: no files start with this prefix; pass e.g. gs://BUCKET/DIR/bert_model.ckpt")
  for match in matches:
    local_copy(match, flag)
  return _download_root() / prefix.split("://", 1)[1]


def local_inputs(patterns: str | Sequence[str], flag: str) -> str | list[str]:
  """Comma-separated globs (or a list of them) with each remote one replaced by local copies of its matches.

  Matches keep their order and base names. A remote glob that matches nothing is kept as given, so the tool's own
  "matches no files" error names it exactly as it would a local one; a missing bucket is reported here.
  """
  given = patterns.split(",") if isinstance(patterns, str) else [str(pattern) for pattern in patterns]
  result: list[str] = []
  for pattern in given:
    pattern = pattern.strip()
    if not is_remote(pattern):
      result.append(pattern)
      continue
    check_bucket(pattern, flag)
    try:
      matches = [match for match in glob(pattern) if not as_path(match).is_dir()]
    except Exception as error:
      raise storage_error(pattern, error, flag, "cannot list it") from None
    result.extend(str(local_copy(match, flag)) for match in matches) if matches else result.append(pattern)
  return ",".join(result) if isinstance(patterns, str) else result


def download_file(source: AnyPath, target: Path, chunk_bytes: int = 8 << 20) -> int:
  """Copies one (remote) file to a local path through a temporary name; returns its size."""
  size = 0
  with atomic_write(target, mode="wb") as out, as_path(source).open("rb") as handle:
    while chunk := handle.read(chunk_bytes):
      out.write(chunk)
      size += len(chunk)
  return size


def download_tree(source: AnyPath, target: Path) -> None:
  """Copies a (remote) directory tree to a local directory."""
  source = as_path(source)
  target.mkdir(parents=True, exist_ok=True)
  for child in source.iterdir():
    if child.is_dir():
      download_tree(child, target / child.name)
    else:
      download_file(child, target / child.name)


def upload_tree(source: Path, target: AnyPath) -> None:
  """Copies a local directory tree under `target` (a URI), each object atomically, marker files last."""
  target = as_path(target)
  files = sorted(
    (path for path in Path(source).rglob("*") if path.is_file()),
    key=lambda path: (path.name in _MARKER_FILES, -path.stat().st_size, str(path)),
  )
  for path in files:
    with atomic_write(target / path.relative_to(source).as_posix(), mode="wb") as out, open(path, "rb") as handle:
      shutil.copyfileobj(handle, out, 8 << 20)


@contextlib.contextmanager
def mirrored_dir(path: str | os.PathLike, flag: str) -> Iterator[Path]:
  """A local copy of (remote) directory `path` for a tool that updates files in it; what the block leaves there is
  uploaded when it succeeds (each object atomically), nothing when it fails."""
  check_writable(path, flag)
  with tempfile.TemporaryDirectory(prefix="clinical_bert_jax-mirror-") as local:
    local_root = Path(local) / "root"
    if as_path(path).is_dir():
      download_tree(path, local_root)
    local_root.mkdir(exist_ok=True)
    yield local_root
    try:
      upload_tree(local_root, path)
    except Exception as error:
      raise storage_error(path, error, flag, "cannot upload the result") from None


def move_tree(source: AnyPath, target: AnyPath) -> None:
  """Moves a (remote) directory: server-side copies, then deletes (object storage has no directory rename; not
  gcsfs's mv, which first tries the objects.move API that emulators lack)."""
  import fsspec

  filesystem, source_key = fsspec.core.url_to_fs(str(source))
  _, target_key = fsspec.core.url_to_fs(str(target))
  for key in filesystem.find(source_key):
    filesystem.copy(key, target_key + key[len(source_key) :])
  filesystem.rm(source_key, recursive=True)


def remove_tree(path: AnyPath) -> None:
  path = as_path(path)
  if is_remote(path):
    if path.exists():
      path.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ atomic outputs
def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. EPERM: it exists, owned by someone else
    return True
  return True


def _remove_stale_temporaries(final: Path) -> None:
  """Removes `.NAME.tmp-PID-*` / `.NAME.old-PID-*` siblings of `final` whose writer process is gone (SIGKILLed)."""
  with contextlib.suppress(OSError):
    for path in final.parent.glob(f".{final.name}.*-*"):
      kind, _, rest = path.name[len(final.name) + 2 :].partition("-")
      pid = rest.split("-", 1)[0]
      if kind in ("tmp", "old") and pid.isdigit() and not _process_exists(int(pid)):
        if path.is_dir() and not path.is_symlink():
          shutil.rmtree(path, ignore_errors=True)
        else:
          with contextlib.suppress(OSError):
            path.unlink()


def _is_nonempty_dir(path: AnyPath) -> bool:
  return path.is_dir() and any(True for _ in path.iterdir())


def check_output_dir(path: str | os.PathLike, overwrite: bool, flag: str = "--output_dir") -> AnyPath:
  """Refuses a non-empty output directory unless `overwrite`; returns the path."""
  path = as_path(path)
  check_bucket(path, flag)
  try:
    if path.exists() and not path.is_dir():
      raise UserError(f"{flag}={path} exists and is not a directory; choose another path")
    if _is_nonempty_dir(path) and not overwrite:
      raise UserError(f"{flag}={path} is not empty; choose an empty directory or pass --overwrite")
  except UserError:
    raise
  except Exception as error:
    raise storage_error(path, error, flag) from None
  return path


def check_writable(path: str | os.PathLike, flag: str) -> None:
  """Proves that a (remote) directory accepts new objects by writing and deleting a private probe object."""
  path = as_path(path)
  if not is_remote(path):
    return
  check_bucket(path, flag)
  probe = path / f".write-probe-{uuid.uuid4().hex}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except Exception as error:
    raise storage_error(path, error, flag, "cannot write there") from None


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "--output_dir") -> Iterator[Path]:
  """Yields a temporary local directory that replaces `path` only when the block succeeds.

  On any exception (or SIGKILL) the final `path` is untouched: either the previous content or nothing. For a remote
  `path` the staging directory is local and uploaded on success (see the module docstring).
  """
  final = check_output_dir(path, overwrite, flag)
  if is_remote(final):
    check_writable(final, flag)
    with tempfile.TemporaryDirectory(prefix="clinical_bert_jax-out-") as staging:
      yield Path(staging)
      try:
        if final.exists():
          final.rmtree()
        upload_tree(Path(staging), final)
      except Exception as error:
        raise storage_error(final, error, flag, "cannot upload the result") from None
    return
  parent = final.resolve().parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent / final.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any directory we make
  except OSError as error:
    raise UserError(f"{flag}={final}: cannot create it ({error.strerror}); check the path and permissions") from None
  try:
    yield staging
    if final.exists():  # --overwrite: move the old result aside first, so the swap itself is one rename
      old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=parent))
      os.replace(final, old / final.name)
      os.replace(staging, final)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(staging, final)
  except OSError as error:
    shutil.rmtree(staging, ignore_errors=True)
    if error.filename is None or str(staging) in str(error.filename):  # name what the user asked for, not a temp
      raise OSError(error.errno, error.strerror, str(final)) from None
    raise
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
  """Opens a temporary file next to `path`; renames it to `path` when the block succeeds, deletes it otherwise."""
  if is_remote(path):
    with _atomic_write_remote(as_path(path), mode, encoding) as handle:
      yield handle
    return
  final = Path(path)
  final.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_temporaries(final)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
  os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600
  binary = "b" in mode
  try:
    with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
      yield handle
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp_name, final)
  except BaseException as error:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp_name)
    if isinstance(error, OSError) and (error.filename is None or error.filename == tmp_name):
      raise OSError(error.errno, error.strerror, str(final)) from None
    raise


@contextlib.contextmanager
def _atomic_write_remote(final: AnyPath, mode: str, encoding: str | None) -> Iterator[IO]:
  """A temporary object next to `final`, moved into place on success (copy + delete), deleted on failure."""
  import fsspec

  filesystem, final_key = fsspec.core.url_to_fs(str(final))
  temporary = f"{final_key.rsplit('/', 1)[0]}/.{final.name}.tmp-{uuid.uuid4().hex}"
  binary = "b" in mode
  raw = filesystem.open(temporary, "wb")
  handle = raw if binary else _TextWriter(raw, encoding or "utf-8")
  try:
    yield handle
    raw.close()
    # Server-side copy, then delete (not gcsfs's mv: it first tries the objects.move API, which emulators lack).
    filesystem.copy(temporary, final_key)
    filesystem.rm(temporary)
  except BaseException:
    with contextlib.suppress(Exception):
      discard = getattr(raw, "discard", None)
      discard() if discard is not None else raw.close()  # gcsfs: abort the upload instead of committing it
    with contextlib.suppress(Exception):
      filesystem.rm(temporary)
    raise


class _TextWriter:
  """Text writes encoded onto a binary object-storage handle (no TextIOWrapper: it would close the handle)."""

  def __init__(self, raw: IO[bytes], encoding: str):
    self._raw, self._encoding = raw, encoding

  def write(self, text: str) -> int:
    self._raw.write(text.encode(self._encoding))
    return len(text)

  def writelines(self, lines) -> None:
    for line in lines:
      self.write(line)

  def flush(self) -> None:
    pass
