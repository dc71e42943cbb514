"""Optimizers and learning-rate schedules for BERT pretraining.

Three optimizers, all built the same way (fp32 gradients → optional global-norm clip → update rule with the BERT
weight-decay mask → learning-rate schedule), optionally wrapped for gradient accumulation:

* `google_adamw` (earlier name `bert_adam`, still accepted): Google's `AdamWeightDecayOptimizer` from
  `optimization.py`, the optimizer ClinicalBERT was trained with. Adam moments WITHOUT bias correction, epsilon added
  outside the square root, decoupled weight decay added to the update before the learning rate is applied. optax's
  `adam`/`adamw` always bias-correct, so the update rule is written out here.
* `adamw`: `optax.adamw` (bias-corrected), for runs that do not need parity with the original.
* `lamb`: optax's LAMB (`optax.lamb`'s chain, layer-wise trust ratio) for large-batch runs on pods.

The parameter paths are the flattened Flax paths of docs/ARCHITECTURE.md (`bert/encoder/layer/0/attention/...`), or
with `--scan_layers` the stacked layout (`bert/encoder/layer/stacked/block/attention/...`, a leading [L] axis): the
weight-decay rule matches the same leaves in both, and LAMB's trust ratio is taken per layer of a stacked leaf, so
both layouts train the same model.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clinical_bert_jax import model
from clinical_bert_jax.errors import UserError

OPTIMIZER_NAMES = ("google_adamw", "adamw", "lamb")
# Earlier names, still accepted (flagfiles and the flags.txt of earlier runs). `bert_adam` was ambiguous: the PyTorch
# fine-tuning optimizer `bert_adam_pt` (eval_tasks/torch_optimizers.py) is pytorch-pretrained-bert's BertAdam.
OPTIMIZER_ALIASES = {"bert_adam": "google_adamw"}
OPTIMIZER_CHOICES = OPTIMIZER_NAMES + tuple(OPTIMIZER_ALIASES)  # what --optimizer accepts
SCHEDULE_NAMES = ("bert", "warmup_linear")
# The schedule each optimizer gets unless told otherwise: Google's for Google's optimizer, the conventional
# warmup-then-decay (HF, PyTorch `BertAdam`, NVIDIA LAMB) for the others.
DEFAULT_SCHEDULE = {"google_adamw": "bert", "adamw": "warmup_linear", "lamb": "warmup_linear"}

# Google's `exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`, applied with `re.search` to the variable
# name. Our Flax paths keep the same module names (`LayerNorm/scale`, `.../bias`, `cls/predictions/bias`), so the same
# search over the flattened path selects exactly the leaves Google's regex selects on the TF names.
NO_DECAY_PATTERN = re.compile("LayerNorm|layer_norm|bias")


def flat_param_path(key_path: tuple[Any, ...]) -> str:
  """`bert/encoder/layer/0/...`: a pytree key path joined with `/`, as in docs/ARCHITECTURE.md."""
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def decays_weight(path: str) -> bool:
  """Whether weight decay applies to the parameter at flattened `path` (Google's exclusion rule)."""
  return NO_DECAY_PATTERN.search(path) is None


def weight_decay_mask(params: Any) -> Any:
  """A pytree of bools shaped like `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda key_path, _: decays_weight(flat_param_path(key_path)), params)


def is_stacked_layer_param(path: str) -> bool:
  """Whether the parameter at flattened `path` is a `scan_layers` stack of per-layer tensors (leading axis: layer)."""
  return f"/layer/{model.SCANNED}/" in f"/{path}"


def scale_by_layerwise_trust_ratio() -> optax.GradientTransformation:
  """LAMB's trust ratio ‖param‖ / ‖update‖ (1 where either is 0), per parameter tensor as in
  `optax.scale_by_trust_ratio`, except that a stacked `scan_layers` leaf [L, ...] gets one ratio per layer (norms over
  all axes but the first): the ratio of the tensor that layer would have in the per-layer layout."""

  def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
    if params is None:
      raise ValueError("LAMB's trust ratio needs the parameters")

    def scale(key_path: tuple[Any, ...], update: jax.Array, param: jax.Array) -> jax.Array:
      stacked = is_stacked_layer_param(flat_param_path(key_path))
      axes = tuple(range(1, param.ndim)) if stacked else None
      param_norm = optax.safe_norm(param, 0.0, axis=axes, keepdims=stacked)  # [] or [L, 1, ...]
      update_norm = optax.safe_norm(update, 0.0, axis=axes, keepdims=stacked)
      zero = jnp.logical_or(param_norm == 0.0, update_norm == 0.0)
      return update * jnp.where(zero, jnp.asarray(1.0, param.dtype), param_norm / update_norm)

    return jax.tree_util.tree_map_with_path(scale, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_schedule(
  learning_rate: float, num_train_steps: int, num_warmup_steps: int, kind: str = "bert"
) -> optax.Schedule:
  """Learning rate as a function of the 0-based optimizer-update count `t` (T = train steps, W = warmup steps).

  * `bert` (Google `optimization.py`): `lr·t/W` for `t < W`, else `lr·(1 − min(t, T)/T)`. The decay runs from step 0
    and warmup only overrides it, so the rate jumps down from ≈lr to `lr·(1 − W/T)` at `t = W`; the first update uses
    rate 0.
  * `warmup_linear` (HF `run_mlm_flax`, PyTorch `BertAdam` 'warmup_linear', NVIDIA LAMB): `lr·t/W` for `t < W`, then
    linear from `lr` at `t = W` to 0 at `t = T`.

  Differences are taken in integers before dividing: `1 − t/T` in float32 loses two digits near the end of a run.
  """
  _check_schedule_args(learning_rate, num_train_steps, num_warmup_steps, kind)

  def warmup(count: jax.Array) -> jax.Array:
    return learning_rate * (jnp.asarray(count, jnp.float32) / max(num_warmup_steps, 1))

  if kind == "bert":

    def bert_schedule(count: jax.Array) -> jax.Array:
      remaining = num_train_steps - jnp.minimum(jnp.asarray(count), num_train_steps)
      decayed = learning_rate * (remaining.astype(jnp.float32) / num_train_steps)
      return jnp.where(count < num_warmup_steps, warmup(count), decayed)

    return bert_schedule

  decay_steps = num_train_steps - num_warmup_steps

  def decay_from_peak(count_after_warmup: jax.Array) -> jax.Array:
    remaining = decay_steps - jnp.minimum(jnp.asarray(count_after_warmup), decay_steps)
    return learning_rate * (remaining.astype(jnp.float32) / max(decay_steps, 1))

  return optax.join_schedules([warmup, decay_from_peak], [num_warmup_steps])


class ScaleByBertAdamState(NamedTuple):
  """Google's `adam_m`/`adam_v` slots; there is no step counter because there is no bias correction."""

  mu: Any
  nu: Any


def scale_by_google_adamw(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
  """`m/(sqrt(v) + eps)` with `m`, `v` the raw (not bias-corrected) moving averages of `AdamWeightDecayOptimizer`."""

  def init(params: Any) -> ScaleByBertAdamState:
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
    return ScaleByBertAdamState(mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update(grads: Any, state: ScaleByBertAdamState, params: Any = None) -> tuple[Any, ScaleByBertAdamState]:
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, grads)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return updates, ScaleByBertAdamState(mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`tf.clip_by_global_norm` (Google's `optimization.py`): every gradient times `max_norm · min(1/‖g‖, 1/max_norm)`.

  One scalar for the whole tree, multiplied in, rather than optax's per-element `select(‖g‖ < max_norm, g, g / ‖g‖ ·
  max_norm)`: XLA then fuses the scaling into the moment updates that read each gradient instead of writing a clipped
  copy of every gradient first (a second params-sized tree of temporaries; 1.25 GiB at BERT-Large)."""

  def update(grads: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
    del params
    norm = optax.tree.norm(grads)
    scale = max_norm * jnp.minimum(1.0 / norm, 1.0 / max_norm)  # [] fp32; 1 (to rounding) when ‖g‖ ≤ max_norm
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def upcast_gradients_to_fp32() -> optax.GradientTransformation:
  """Casts gradients to float32 so clipping norms, moments and accumulators stay fp32 under bf16 compute."""
  return optax.stateless(lambda grads, params: jax.tree.map(lambda g: g.astype(jnp.float32), grads))


def canonical_optimizer(name: str) -> str:
  """The optimizer's current name (`bert_adam` → `google_adamw`); unknown names are returned unchanged."""
  return OPTIMIZER_ALIASES.get(name, name)


def default_schedule(name: str) -> str:
  """The schedule optimizer `name` (or an earlier name of it) gets unless told otherwise."""
  return DEFAULT_SCHEDULE[canonical_optimizer(name)]


def make_optimizer(
  name: str,
  learning_rate: float,
  num_train_steps: int,
  num_warmup_steps: int,
  weight_decay: float = 0.01,
  clip_norm: float | None = 1.0,
  grad_accum_steps: int = 1,
  *,
  schedule: str | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
) -> optax.GradientTransformation:
  """The optimizer `name` with the BERT weight-decay mask, global-norm clipping and a learning-rate schedule.

  `num_train_steps`/`num_warmup_steps` count optimizer updates; with `grad_accum_steps = k > 1` the returned
  transformation must be called once per micro-batch and applies an update (the mean of the k micro-batch gradients)
  on every k-th call, returning zero updates in between; the schedule advances only on real updates.
  `clip_norm` None or 0 disables clipping. `schedule` None picks `DEFAULT_SCHEDULE[name]`. Defaults are Google's.
  """
  name = canonical_optimizer(name)
  if name not in OPTIMIZER_NAMES:
    raise UserError(f"--optimizer={name!r} is not known; use one of {', '.join(OPTIMIZER_NAMES)}")
  schedule = DEFAULT_SCHEDULE[name] if schedule is None else schedule
  _check_optimizer_args(weight_decay, clip_norm, grad_accum_steps, b1, b2, eps)
  learning_rate_fn = make_schedule(learning_rate, num_train_steps, num_warmup_steps, schedule)

  if name == "google_adamw":
    update_rule = optax.chain(
      scale_by_google_adamw(b1, b2, eps),
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate_fn),
    )
  elif name == "adamw":
    update_rule = optax.adamw(
      learning_rate_fn, b1=b1, b2=b2, eps=eps, mu_dtype=jnp.float32, weight_decay=weight_decay, mask=weight_decay_mask
    )
  else:  # optax.lamb's chain (same state tree) with the trust ratio taken per layer in the stacked layout too
    update_rule = optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      scale_by_layerwise_trust_ratio(),
      optax.scale_by_learning_rate(learning_rate_fn),
    )

  transform = optax.chain(clip_by_global_norm(clip_norm), update_rule) if clip_norm else update_rule
  if grad_accum_steps > 1:
    # MultiSteps rather than a scan over micro-batches inside the train step: the train step and the input pipeline
    # stay the same for every k, and a checkpoint taken mid-accumulation resumes exactly (the partial sum and the
    # micro-step counter are part of the optimizer state). It costs one fp32 params-sized accumulator, and optax
    # evaluates the update rule on every micro-step (elementwise, negligible next to a forward/backward pass).
    transform = optax.MultiSteps(transform, every_k_schedule=int(grad_accum_steps)).gradient_transformation()
  return optax.chain(upcast_gradients_to_fp32(), transform)


def _check_schedule_args(learning_rate: float, num_train_steps: int, num_warmup_steps: int, kind: str) -> None:
  if kind not in SCHEDULE_NAMES:
    raise UserError(f"--lr_schedule={kind!r} is not known; use one of {', '.join(SCHEDULE_NAMES)}")
  if not (math.isfinite(learning_rate) and learning_rate > 0):
    raise UserError(f"--learning_rate={learning_rate} must be a positive number, e.g. 5e-5")
  if num_train_steps < 1:
    raise UserError(f"--num_train_steps={num_train_steps} must be at least 1")
  if not 0 <= num_warmup_steps <= num_train_steps:
    raise UserError(f"--num_warmup_steps={num_warmup_steps} must be between 0 and --num_train_steps={num_train_steps}")


def _check_optimizer_args(
  weight_decay: float, clip_norm: float | None, grad_accum_steps: int, b1: float, b2: float, eps: float
) -> None:
  if not weight_decay >= 0:
    raise UserError(f"--weight_decay={weight_decay} must be >= 0 (0 disables weight decay)")
  if clip_norm is not None and not clip_norm >= 0:
    raise UserError(f"--clip_norm={clip_norm} must be >= 0 (0 disables gradient clipping)")
  if int(grad_accum_steps) != grad_accum_steps or grad_accum_steps < 1:
    raise UserError(f"--grad_accum_steps={grad_accum_steps} must be a whole number >= 1")
  for option, beta in (("b1", b1), ("b2", b2)):
    if not 0 <= beta < 1:
      raise UserError(f"optimizer option {option}={beta} must be in [0, 1)")
  if not eps >= 0:
    raise UserError(f"optimizer option eps={eps} must be >= 0")
