"""One fine-tuning run and batched prediction, shared by MedNLI and NER.

Examples are dicts of Python lists (`input_ids`, `token_type_ids`, and `label` — an int for sentence tasks, a list
with -100 on ignored positions for token tasks). Batches are padded to their own longest example instead of a fixed
150: the attention mask makes the results the same up to float rounding, and short clinical sentences train several
times faster.
"""

from __future__ import annotations

import math
import random
import time
from typing import Sequence

import numpy as np
import torch
import tqdm

from clinical_bert_jax.eval_tasks import IGNORED_LABEL
from clinical_bert_jax.eval_tasks.torch_optimizers import make_optimizer
from clinical_bert_jax.eval_tasks.grid import Hyperparameters


def seed_everything(seed: int) -> None:
  """Seeds python, numpy and torch, as the original scripts did before building the model."""
  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
  """Pads a batch to its longest example; token labels are padded with the ignored label."""
  length = max(len(example["input_ids"]) for example in examples)

  def padded(key: str, fill: int) -> torch.Tensor:
    return torch.tensor([list(example[key]) + [fill] * (length - len(example[key])) for example in examples])

  batch = {
    "input_ids": padded("input_ids", pad_id),
    "token_type_ids": padded("token_type_ids", 0),
    "attention_mask": torch.tensor(
      [[1] * len(example["input_ids"]) + [0] * (length - len(example["input_ids"])) for example in examples]
    ),
  }
  if isinstance(examples[0]["label"], int):
    batch["labels"] = torch.tensor([example["label"] for example in examples])
  else:
    batch["labels"] = padded("label", IGNORED_LABEL)
  return batch


def fine_tune(
  model: torch.nn.Module,
  examples: Sequence[dict],
  hyper: Hyperparameters,
  seed: int,
  device: torch.device,
  pad_id: int,
  description: str,
  optimizer_name: str = "bert_adam_pt",
) -> dict[str, float]:
  """Trains `model` in place; returns the step count, the mean loss of the last epoch and the wall time.

  The schedule's length is the number of updates actually made (ceil(N / batch) per epoch), so the learning rate
  reaches 0 at the end; run_classifier.py computed int(N / batch) × epochs but still ran the last partial batch, and
  run_ner.py ran int(N × epochs / batch) full batches from a repeated stream. `optimizer_name` is one of
  `torch_optimizers.OPTIMIZERS` (MedNLI: bert_adam_pt, NER: google_adamw_pt, as the original scripts).
  """
  started = time.monotonic()
  steps_per_epoch = math.ceil(len(examples) / hyper.train_batch_size)
  total_steps = steps_per_epoch * hyper.num_train_epochs
  optimizer = make_optimizer(
    optimizer_name, model, hyper.learning_rate, total_steps, hyper.warmup_proportion, hyper.weight_decay
  )
  order_rng = torch.Generator().manual_seed(seed)
  model.to(device).train()
  last_epoch_loss = 0.0
  with tqdm.tqdm(total=total_steps, desc=description, unit="step", disable=None, leave=False) as progress:
    for _ in range(hyper.num_train_epochs):
      order = torch.randperm(len(examples), generator=order_rng).tolist()
      epoch_loss = 0.0
      for start in range(0, len(order), hyper.train_batch_size):
        batch = collate([examples[i] for i in order[start : start + hyper.train_batch_size]], pad_id)
        loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        epoch_loss += loss.item()
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
      last_epoch_loss = epoch_loss / steps_per_epoch
  return {"steps": total_steps, "last_epoch_mean_loss": last_epoch_loss, "seconds": time.monotonic() - started}


@torch.no_grad()
def predict(
  model: torch.nn.Module, examples: Sequence[dict], batch_size: int, device: torch.device, pad_id: int
) -> list[np.ndarray]:
  """Arg-max label ids per example: one id for sentence tasks, an array with one id per position for token tasks."""
  model.to(device).eval()
  predictions: list[np.ndarray] = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start : start + batch_size]
    batch = collate(chunk, pad_id)
    batch.pop("labels")
    logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
    best = logits.argmax(dim=-1).cpu().numpy()
    if best.ndim == 1:
      predictions.extend(best)
    else:
      predictions.extend(row[: len(example["input_ids"])] for row, example in zip(best, chunk))
  return predictions
