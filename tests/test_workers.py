"""The data tools' worker pool: ordered results, bounded reading ahead, progress, and one-line worker deaths."""

import functools
import os
import signal
import time

import pytest

from clinical_bert_jax.errors import UserError
from data_prep import workers

# Workers are spawned processes: they unpickle these by reference, so they live at module level.


def _make_square(report):
  def square(item):
    report(("seen", item))
    time.sleep(0.02 * (item % 3))  # finish out of order
    return item * item

  return square


def _make_failing(kind, report):
  def work(item):
    if item == 3:
      if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
      if kind == "user":
        raise UserError("row 3 is bad; fix it")
      raise ZeroDivisionError("a bug")
    return item

  return work


@pytest.mark.parametrize("num_workers", [1, 3])
def test_results_come_in_input_order_with_progress(num_workers):
  read = []

  def items():
    for item in range(20):
      read.append(item)
      yield item

  progress = []
  results = workers.ordered_map(
    _make_square, items(), num_workers=num_workers, max_in_flight=4, on_progress=progress.append
  )
  assert next(results) == 0
  assert len(read) <= 5  # bounded: not the whole input read ahead of the first result
  assert [0] + list(results) == [item * item for item in range(20)]
  assert sorted(item for _, item in progress) == list(range(20))


@pytest.mark.parametrize("num_workers", [1, 2])
def test_a_user_error_in_a_worker_reaches_the_caller_as_itself(num_workers):
  with pytest.raises(UserError, match="row 3 is bad"):
    list(workers.ordered_map(functools.partial(_make_failing, "user"), range(8), num_workers=num_workers))
  with pytest.raises((RuntimeError, ZeroDivisionError), match="a bug"):
    list(workers.ordered_map(functools.partial(_make_failing, "bug"), range(8), num_workers=num_workers))


def test_a_killed_worker_is_one_line_not_a_hang():
  started = time.monotonic()
  with pytest.raises(UserError) as caught:
    list(
      workers.ordered_map(
        functools.partial(_make_failing, "kill"), range(8), num_workers=2, died_hint="lower --num_workers"
      )
    )
  message = str(caught.value)
  assert "worker process died (exit status -9: killed" in message and "lower --num_workers" in message
  assert "\n" not in message and time.monotonic() - started < 60
