"""The worker pool of the data tools: an ordered, bounded, parallel map over spawned processes.

`format_mimic` (notes -> sentences) and `create_pretraining_data` (sentences -> instances) both run here, so both
have the same semantics:

* Results come back in the order of the inputs, whatever order the workers finish in.
* Memory is bounded: at most `max_in_flight` inputs are sent ahead of the oldest unfinished one (inputs are read
  lazily from the iterable), so a slow worker never makes the parent read a whole file ahead.
* Each worker builds its state once (`make_worker(report)` returns the function applied to every input), e.g. a
  tokenizer with its caches; `report(payload)` sends progress to the parent's `on_progress` mid-task.
* A `UserError` in a worker reaches the caller as itself, and so does a storage `OSError` (full disk, I/O error:
  `errors.is_storage_error`); any other exception as a RuntimeError carrying the worker's
  traceback (code and counts, never input text). A worker that dies (killed for lack of memory, a crash) is one
  line: `UserError("a worker process died (exit status -9: killed, ...); <hint>")`, never a hang.
* On any error, or when the caller stops iterating, every worker is terminated before the error propagates, so
  nothing keeps writing into a directory the caller is about to remove.
* `spawn`, not `fork`: workers never inherit the parent's threads, locks or open files, the same on every platform.
  A module that defines absl flags must define them under `__main__` only, since workers re-import it.

With `num_workers == 1` everything runs in the calling process (same results, same errors, no processes).
"""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, TypeVar

from clinical_bert_jax.errors import UserError, is_storage_error

In = TypeVar("In")
Out = TypeVar("Out")
Report = Callable[[Any], None]

_POLL_S = 0.5  # how often the parent checks that its workers are alive while it waits


def ordered_map(
  make_worker: Callable[[Report], Callable[[In], Out]],
  items: Iterable[In],
  *,
  num_workers: int,
  max_in_flight: int | None = None,
  on_progress: Report | None = None,
  died_hint: str = "lower --num_workers",
) -> Iterator[Out]:
  """Yields `worker(item)` for each item in input order, computed in `num_workers` spawned processes.

  Args:
    make_worker: picklable (a module-level function or class, or a `functools.partial` of one); called once per
      worker process with the `report` function, it returns the function applied to each item.
    items: picklable inputs, read lazily.
    num_workers: processes; 1 runs everything in this process.
    max_in_flight: inputs sent but not yet yielded, at most (default `2 * num_workers`).
    on_progress: called in this process with each payload a worker passes to `report`.
    died_hint: what the user can do when a worker dies, appended to the one-line error.
  """
  report = on_progress or (lambda payload: None)
  if num_workers <= 1:
    worker = make_worker(report)
    for item in items:
      yield worker(item)
    return
  yield from _Pool(make_worker, num_workers, report, died_hint).map(items, max(1, max_in_flight or 2 * num_workers))


def _worker_main(
  make_worker: Callable[[Report], Callable[[Any], Any]], tasks: multiprocessing.Queue, results: multiprocessing.Queue
) -> None:
  """A worker process: builds its state, then takes (index, item) until None; everything goes back on `results`."""
  try:
    worker = make_worker(lambda payload: results.put(("progress", payload)))
    for index, item in iter(tasks.get, None):
      results.put(("done", (index, worker(item))))
  except UserError as error:
    results.put(("error", error))
  except OSError as error:
    if is_storage_error(error):  # a full disk or I/O error: re-raised in the caller, which cleans up and says one line
      results.put(("error", OSError(error.errno, error.strerror, error.filename)))
    else:
      results.put(("error", RuntimeError(f"worker process failed:\n{traceback.format_exc()}")))
  except BaseException:  # a bug: hand the parent the traceback, which names code and counts, never input text
    results.put(("error", RuntimeError(f"worker process failed:\n{traceback.format_exc()}")))


class _Pool:
  """Spawned processes fed through one task queue; results in one queue, put back in order by the parent.

  Plain processes and queues rather than `multiprocessing.Pool` or `ProcessPoolExecutor`: the first never reports a
  worker that died and would wait forever, and neither can stop its running workers on an error.
  """

  def __init__(self, make_worker, num_workers: int, report: Report, died_hint: str):
    context = multiprocessing.get_context("spawn")
    self._tasks, self._results = context.Queue(), context.Queue()
    self._report, self._died_hint = report, died_hint
    self._done: dict[int, Any] = {}  # results received ahead of their turn
    self._processes = [
      context.Process(target=_worker_main, args=(make_worker, self._tasks, self._results), daemon=True)
      for _ in range(num_workers)
    ]

  def map(self, items: Iterable[Any], max_in_flight: int) -> Iterator[Any]:
    for process in self._processes:
      process.start()
    finished = False
    try:
      items = iter(items)
      sent = next_out = 0
      exhausted = False
      last_check = time.monotonic()
      while True:
        while not exhausted and sent - next_out < max_in_flight:
          item = next(items, _END)
          if item is _END:
            exhausted = True
          else:
            self._tasks.put((sent, item))
            sent += 1
        if exhausted and next_out == sent:
          break
        while next_out not in self._done:
          received = self._receive(timeout=_POLL_S)
          if not received or time.monotonic() - last_check >= _POLL_S:
            self._check_alive(quiet=not received)
            last_check = time.monotonic()
        while next_out in self._done:
          result = self._done.pop(next_out)
          next_out += 1
          yield result
      # A worker killed before it took any input leaves nothing missing, but it died all the same (the OOM killer,
      # an operator): report it rather than finish as if all were well.
      self._check_alive(quiet=False)
      finished = True
    finally:
      self._close(finished)

  def _receive(self, timeout: float) -> bool:
    """Handles one message from the workers (a result is kept, progress reported, an error raised); False if none
    came within `timeout` seconds."""
    try:
      kind, payload = self._results.get(timeout=timeout)
    except queue.Empty:
      return False
    if kind == "done":
      self._done[payload[0]] = payload[1]
    elif kind == "progress":
      self._report(payload)
    else:
      raise payload
    return True

  def _check_alive(self, quiet: bool) -> None:
    """UserError when a worker has died. A worker also ends (status 0) after sending its error: when the queue was
    `quiet`, what it sent is read first, so its error wins over the report of its end."""
    ended = [
      process.exitcode
      for process in self._processes
      if process.exitcode is not None and (quiet or process.exitcode != 0)
    ]
    if not ended:
      return
    while self._receive(timeout=_POLL_S):  # raises the error a worker sent before it ended
      pass
    status = f"{ended[0]}: killed, usually for lack of memory" if ended[0] == -9 else str(ended[0])
    raise UserError(f"a worker process died (exit status {status}); {self._died_hint}")

  def _close(self, finished: bool) -> None:
    if finished:
      for _ in self._processes:
        self._tasks.put(None)
    else:
      for process in self._processes:
        process.terminate()  # before the caller cleans up what they write into
      # Inputs still buffered for the dead workers are dropped: otherwise the queue's feeder thread blocks on the
      # full pipe that nobody reads any more, and the interpreter waits for it at exit (a hang after the one-line
      # error when a worker was killed early, before it had taken its inputs).
      self._tasks.cancel_join_thread()
    for process in self._processes:
      process.join()
    self._tasks.close()
    self._results.close()


_END = object()
