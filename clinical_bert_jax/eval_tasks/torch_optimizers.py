"""The two PyTorch optimizers of the ClinicalBERT fine-tuning scripts, each as the original ran it.

* `bert_adam_pt` (`BertAdamPt`): pytorch-pretrained-bert 0.4.0 `BertAdam`, used by `run_classifier.py` (MedNLI).
  It is not `torch.optim.AdamW` (clinicalbert-paper.md §6): no bias correction, ε = 1e-6 added outside the square
  root, decoupled weight decay 0.01 added to the update (not to the gradient), each parameter's gradient clipped to
  norm 1.0 ON ITS OWN (BertAdam calls `clip_grad_norm_(p, 1.0)` per tensor, not over the whole model), and the 0.4.0
  `warmup_linear` schedule: `x / warmup` during warmup, then `1 − x` (x = step / total), so the learning rate jumps
  from ≈ lr down to lr·(1 − warmup) when warmup ends — later releases changed this to a jump-free ramp.
* `google_adamw_pt` (`GoogleAdamWPt`): Google's TensorFlow `AdamWeightDecayOptimizer` with
  `optimization.create_optimizer`'s recipe, used by `run_ner.py` (the i2b2 tasks): the same Adam arithmetic, but the
  gradients of ALL parameters clipped together to global norm 1.0, weight decay skipped for names matching
  `LayerNorm`, `layer_norm` or `bias`, and the learning rate `lr·t/W` for t < W (t = updates already made, so the
  first update has rate 0), then `lr·(1 − t/T)`.

The names end in `_pt` because the JAX pretraining optimizers (`clinical_bert_jax.optimizers`, where `google_adamw`
— earlier `bert_adam` — is Google's AdamWeightDecay in optax) are another family.
"""

from __future__ import annotations

import re
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


def _loss_of(closure) -> torch.Tensor | None:
  """`torch.optim.Optimizer.step`'s closure protocol: re-evaluate the loss with gradients on."""
  if closure is None:
    return None
  with torch.enable_grad():
    return closure()


def _adam_direction(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, group: dict) -> torch.Tensor:
  """The Adam arithmetic both originals share: the moments `m`, `v` updated in place, then m / (√v + ε) — no bias
  correction, ε outside the square root. Weight decay is the caller's (the two add it under different rules)."""
  m.mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
  v.mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])
  return m / (v.sqrt() + group["eps"])


class BertAdamPt(torch.optim.Optimizer):
  """BertAdam with the schedule built in; `step()` must be called exactly `total_steps` times."""

  def __init__(
    self,
    params: Iterable,
    lr: float,
    total_steps: int,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    max_grad_norm: float = 1.0,
  ):
    if lr <= 0 or total_steps <= 0 or not 0 <= warmup < 1:
      raise ValueError(f"BertAdam needs lr > 0, total_steps > 0, 0 <= warmup < 1 (got {lr}, {total_steps}, {warmup})")
    defaults = dict(
      lr=lr,
      total_steps=total_steps,
      warmup=warmup,
      weight_decay=weight_decay,
      b1=b1,
      b2=b2,
      eps=eps,
      max_grad_norm=max_grad_norm,
    )
    super().__init__(params, defaults)

  def scheduled_lr(self, group: dict, step: int) -> float:
    return group["lr"] * warmup_linear(step / group["total_steps"], group["warmup"])

  @torch.no_grad()
  def step(self, closure=None):
    loss = _loss_of(closure)
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
        update = _adam_direction(parameter.grad, state["next_m"], state["next_v"], group)
        if group["weight_decay"] > 0:
          update.add_(parameter, alpha=group["weight_decay"])
        parameter.add_(update, alpha=-self.scheduled_lr(group, state["step"]))
        state["step"] += 1
    return loss


BertAdam = BertAdamPt  # the earlier name

# Google's `exclude_from_weight_decay` regexes (optimization.create_optimizer), searched in parameter names.
GOOGLE_NO_DECAY_PATTERNS = ("LayerNorm", "layer_norm", "bias")


def google_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
  """Decayed and not-decayed groups by Google's regexes (the same split as `parameter_groups` on a BERT)."""
  decay, no_decay = [], []
  for name, parameter in model.named_parameters():
    if parameter.requires_grad:
      (no_decay if any(re.search(pattern, name) for pattern in GOOGLE_NO_DECAY_PATTERNS) else decay).append(parameter)
  return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def google_learning_rate(lr: float, step: int, total_steps: int, warmup_steps: int) -> float:
  """`create_optimizer`'s rate at global step `step` (updates already made): linear warmup, then linear decay to 0."""
  if warmup_steps and step < warmup_steps:
    return lr * step / warmup_steps
  return lr * (1.0 - min(step, total_steps) / total_steps)


class GoogleAdamWPt(torch.optim.Optimizer):
  """Google's AdamWeightDecay + global-norm clipping 1.0 + create_optimizer's schedule, in PyTorch.

  `warmup_steps` is a step count, as in the original (`int(num_train_steps * warmup_proportion)`).
  """

  def __init__(
    self,
    params: Iterable,
    lr: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    clip_norm: float = 1.0,
  ):
    if lr <= 0 or total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
      raise ValueError(
        f"GoogleAdamWPt needs lr > 0, total_steps > 0, 0 <= warmup_steps <= total_steps (got {lr}, "
        f"{total_steps}, {warmup_steps})"
      )
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps))
    self.total_steps, self.warmup_steps, self.clip_norm = total_steps, warmup_steps, clip_norm
    self.global_step = 0

  @torch.no_grad()
  def step(self, closure=None):
    loss = _loss_of(closure)
    parameters = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
    if self.clip_norm > 0 and parameters:
      # tf.clip_by_global_norm: g * clip / max(global_norm, clip)
      global_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
      scale = self.clip_norm / torch.clamp(global_norm, min=self.clip_norm)
    else:
      scale = None
    for group in self.param_groups:
      rate = google_learning_rate(group["lr"], self.global_step, self.total_steps, self.warmup_steps)
      for parameter in group["params"]:
        if parameter.grad is None:
          continue
        grad = parameter.grad if scale is None else parameter.grad * scale
        state = self.state[parameter]
        if not state:
          state["adam_m"] = torch.zeros_like(parameter)
          state["adam_v"] = torch.zeros_like(parameter)
        update = _adam_direction(grad, state["adam_m"], state["adam_v"], group)
        if group["weight_decay"]:
          update.add_(parameter, alpha=group["weight_decay"])
        parameter.sub_(update * rate)
    self.global_step += 1
    return loss


OPTIMIZERS = ("google_adamw_pt", "bert_adam_pt")


def make_optimizer(
  name: str, model: torch.nn.Module, lr: float, total_steps: int, warmup_proportion: float, weight_decay: float
) -> torch.optim.Optimizer:
  """The fine-tuning optimizer `name` (see the module docstring) over `model`'s parameters."""
  if name == "bert_adam_pt":
    return BertAdamPt(parameter_groups(model, weight_decay), lr=lr, total_steps=total_steps, warmup=warmup_proportion)
  if name == "google_adamw_pt":
    return GoogleAdamWPt(
      google_parameter_groups(model, weight_decay),
      lr=lr,
      total_steps=total_steps,
      warmup_steps=int(total_steps * warmup_proportion),
    )
  raise ValueError(f"unknown fine-tuning optimizer {name!r}; one of {', '.join(OPTIMIZERS)}")
