"""Hyperparameter grid × seeds, model selection on dev, test reported as mean ± std over seeds.

The paper fine-tunes every grid point once and reports the test score of the point that is best on dev
(clinicalbert-paper.md §5-6). With several seeds we select on the MEAN dev score of a point and report the mean and
sample standard deviation of its test scores, so a lucky seed neither picks the configuration nor inflates the number.
Ties on dev go to the earlier grid point.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from typing import Any, Callable, Sequence

from absl import logging


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
  """One grid point; warmup and weight decay are fixed by the paper's protocol but kept explicit in the results."""

  learning_rate: float
  train_batch_size: int
  num_train_epochs: int
  warmup_proportion: float = 0.1
  weight_decay: float = 0.01


@dataclasses.dataclass
class RunOutcome:
  """What one (grid point, seed) run produced; `test_predictions` stays in memory only for the selected point."""

  dev: dict[str, float]
  test: dict[str, float]
  train: dict[str, float]
  test_predictions: Any


def grid_points(
  learning_rates: Sequence[float], batch_sizes: Sequence[int], epochs: Sequence[int], warmup_proportion: float
) -> list[Hyperparameters]:
  return [
    Hyperparameters(lr, batch, epoch, warmup_proportion)
    for lr, batch, epoch in itertools.product(learning_rates, batch_sizes, epochs)
  ]


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single seed)."""
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_grid(
  points: Sequence[Hyperparameters],
  seeds: Sequence[int],
  metric: str,
  run_one: Callable[[Hyperparameters, int], RunOutcome],
) -> tuple[dict[str, Any], Any]:
  """Runs every point with every seed; returns (the JSON-ready summary, the selected point's first-seed predictions)."""
  summaries = []
  best_index, best_dev, best_predictions = -1, float("-inf"), None
  for index, point in enumerate(points):
    outcomes = [run_one(point, seed) for seed in seeds]
    dev_mean, dev_std = mean_and_std([outcome.dev[metric] for outcome in outcomes])
    test_mean, test_std = mean_and_std([outcome.test[metric] for outcome in outcomes])
    summaries.append(
      {
        "learning_rate": point.learning_rate,
        "train_batch_size": point.train_batch_size,
        "num_train_epochs": point.num_train_epochs,
        "warmup_proportion": point.warmup_proportion,
        "dev_mean": dev_mean,
        "dev_std": dev_std,
        "test_mean": test_mean,
        "test_std": test_std,
        "runs": [
          {"seed": seed, "dev": outcome.dev, "test": outcome.test, "train": outcome.train}
          for seed, outcome in zip(seeds, outcomes)
        ],
      }
    )
    logging.info(
      "grid point %d/%d lr=%g batch=%d epochs=%d: dev %s %.4f ± %.4f, test %.4f ± %.4f",
      index + 1,
      len(points),
      point.learning_rate,
      point.train_batch_size,
      point.num_train_epochs,
      metric,
      dev_mean,
      dev_std,
      test_mean,
      test_std,
    )
    if dev_mean > best_dev:
      best_index, best_dev, best_predictions = index, dev_mean, outcomes[0].test_predictions
  best = summaries[best_index]
  selected = {
    key: best[key]
    for key in (
      "learning_rate",
      "train_batch_size",
      "num_train_epochs",
      "warmup_proportion",
      "dev_mean",
      "dev_std",
      "test_mean",
      "test_std",
    )
  }
  selected.update(grid_index=best_index, seeds=list(seeds), test_predictions_seed=seeds[0])
  return {"metric": metric, "grid": summaries, "selected": selected}, best_predictions
