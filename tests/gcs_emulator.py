"""A real GCS JSON-API server for tests: `gcp-storage-emulator` (pip), in this process, on a free loopback port.

The contract under test is the one users get: with only `STORAGE_EMULATOR_HOST=http://HOST:PORT` set, every tool
talks to that endpoint with anonymous credentials (clinical_bert_jax.fileio passes it on to tensorstore and gcsfs).

Three things real GCS does are added on top of the emulator, each a few lines here:
* IAM, crudely: buckets whose name starts with `readonly-` answer every write (POST/PUT/PATCH/DELETE) with 403 and a
  GCS-style JSON error, as a bucket this machine may only read does;
* the `x-goog-generation` header on media downloads, and
* `ifGenerationMatch` preconditions on uploads (412 when the object's generation differs; 0 = must not exist).
tensorstore's OCDBT (orbax's checkpoint format) reads generations and writes its manifest under these preconditions;
without them the emulator answers with objects tensorstore cannot version ("Malformed StorageGeneration").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
from functools import partial
from http import server as http_server
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlparse

READONLY_PREFIX = "readonly-"
_BUCKET_IN_PATH = re.compile(r"/b/([^/?]+)")
_MEDIA_PATH = re.compile(r"^(?:/download)?/storage/v1/b/([^/]+)/o/([^?]+)$")
_UPLOAD_PATH = re.compile(r"^/upload/storage/v1/b/([^/]+)/o$")


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


class Emulator:
  def __init__(self, endpoint: str, storage):
    self.endpoint = endpoint
    self.storage = storage

  def create_bucket(self, name: str) -> None:
    from gcp_storage_emulator.handlers import buckets

    buckets.create_bucket(name, self.storage)

  def wipe(self) -> None:
    self.storage.wipe(keep_buckets=True)


@contextlib.contextmanager
def running_emulator(buckets: tuple[str, ...] = ("bucket",)) -> Iterator[Emulator]:
  """Starts the emulator with `buckets`, sets STORAGE_EMULATOR_HOST for this process (and its children), stops it."""
  from gcp_storage_emulator import server as emulator_server
  from gcp_storage_emulator.storage import Storage

  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # it logs every 404 as an error

  class Handler(emulator_server.RequestHandler):
    _generation: str | None = None

    def _current_generation(self, bucket: str, name: str) -> str:
      try:
        return str(self.storage.get_file_obj(bucket, name)["generation"])
      except Exception:  # the emulator's NotFound
        return "0"

    def end_headers(self):
      if self._generation is not None:
        self.send_header("x-goog-generation", self._generation)
        self._generation = None
      super().end_headers()

    def _send_json(self, status: int, message: str) -> None:
      body = json.dumps({"error": {"code": status, "message": message}}).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def _precondition_failed(self) -> bool:
      url = urlparse(self.path)
      query = parse_qs(url.query)
      match = _UPLOAD_PATH.match(url.path)
      if not match or "ifGenerationMatch" not in query or "name" not in query:
        return False
      if self._current_generation(match.group(1), query["name"][0]) == query["ifGenerationMatch"][0]:
        return False
      self._send_json(412, "Precondition Failed")
      return True

    def do_GET(self):
      url = urlparse(self.path)
      match = _MEDIA_PATH.match(url.path)
      if match and parse_qs(url.query).get("alt") == ["media"]:
        generation = self._current_generation(match.group(1), unquote(match.group(2)))
        self._generation = generation if generation != "0" else None
      super().do_GET()

    def _refuse_write(self) -> bool:
      match = _BUCKET_IN_PATH.search(self.path)
      if not (match and match.group(1).startswith(READONLY_PREFIX)):
        return False
      self._send_json(403, "Forbidden: read-only test bucket")
      return True

    def do_POST(self):
      if not self._refuse_write() and not self._precondition_failed():
        super().do_POST()

    def do_PUT(self):
      if not self._refuse_write():
        super().do_PUT()

    def do_PATCH(self):
      if not self._refuse_write():
        super().do_PATCH()

    def do_DELETE(self):
      if not self._refuse_write():
        super().do_DELETE()

  class Server(http_server.HTTPServer):  # one request at a time: the emulator's storage is not thread-safe
    def handle_error(self, request, client_address):  # clients that hang up early are not errors here
      pass

  storage = Storage(use_memory_fs=True)
  emulator = Emulator("", storage)
  for name in buckets:
    emulator.create_bucket(name)
  port = _free_port()
  httpd = Server(("127.0.0.1", port), partial(Handler, storage))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  emulator.endpoint = f"http://127.0.0.1:{port}"
  saved = {
    name: os.environ.get(name)
    for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
  }
  os.environ["STORAGE_EMULATOR_HOST"] = emulator.endpoint
  os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
  from clinical_bert_jax import fileio

  fileio.configure_storage()
  try:
    yield emulator
  finally:
    httpd.shutdown()
    httpd.server_close()
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
