"""The optimizer the ClinicalBERT fine-tuning scripts used: pytorch-pretrained-bert 0.4.0 `BertAdam`.

It is not `torch.optim.AdamW` (clinicalbert-paper.md §6): no bias correction, ε = 1e-6 added outside the square root,
decoupled weight decay 0.01 added to the update (not to the gradient), each parameter's gradient clipped to norm 1.0
ON ITS OWN (BertAdam calls `clip_grad_norm_(p, 1.0)` per tensor, not over the whole model), and the 0.4.0
`warmup_linear` schedule: `x / warmup` during warmup, then `1 − x` (x = step / total), so the learning rate jumps
from ≈ lr down to lr·(1 − warmup) when warmup ends — later releases changed this to a jump-free ramp.
"""

from __future__ import annotations

from typing import Iterable

import torch

# Parameter names whose tensors get no weight decay (the original `no_decay` list).
NO_DECAY_NAME_PARTS = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def warmup_linear(progress: float, warmup: float) -> float:
  """The learning-rate multiplier of pytorch-pretrained-bert 0.4.0 at `progress` = step / total_steps."""
  if progress < warmup:
    return progress / warmup
  return 1.0 - progress


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
  """Two groups as in the original scripts: decayed weights, and biases/LayerNorm without decay."""
  decay, no_decay = [], []
  for name, parameter in model.named_parameters():
    if not parameter.requires_grad:
      continue
    (no_decay if any(part in name for part in NO_DECAY_NAME_PARTS) else decay).append(parameter)
  return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class BertAdam(torch.optim.Optimizer):
  """BertAdam with the schedule built in; `step()` must be called exactly `total_steps` times."""

  def __init__(self, params: Iterable, lr: float, total_steps: int, warmup: float = 0.1, weight_decay: float = 0.01,
               b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, max_grad_norm: float = 1.0):
    if lr <= 0 or total_steps <= 0 or not 0 <= warmup < 1:
      raise ValueError(f"BertAdam needs lr > 0, total_steps > 0, 0 <= warmup < 1 (got {lr}, {total_steps}, {warmup})")
    defaults = dict(lr=lr, total_steps=total_steps, warmup=warmup, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
                    max_grad_norm=max_grad_norm)
    super().__init__(params, defaults)

  def scheduled_lr(self, group: dict, step: int) -> float:
    return group["lr"] * warmup_linear(step / group["total_steps"], group["warmup"])

  @torch.no_grad()
  def step(self, closure=None):
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    for group in self.param_groups:
      for parameter in group["params"]:
        if parameter.grad is None:
          continue
        state = self.state[parameter]
        if not state:
          state["step"] = 0
          state["next_m"] = torch.zeros_like(parameter)
          state["next_v"] = torch.zeros_like(parameter)
        if group["max_grad_norm"] > 0:
          torch.nn.utils.clip_grad_norm_(parameter, group["max_grad_norm"])
        grad = parameter.grad
        next_m, next_v = state["next_m"], state["next_v"]
        next_m.mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
        next_v.mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])
        update = next_m / (next_v.sqrt() + group["eps"])
        if group["weight_decay"] > 0:
          update.add_(parameter, alpha=group["weight_decay"])
        parameter.add_(update, alpha=-self.scheduled_lr(group, state["step"]))
        state["step"] += 1
    return loss
