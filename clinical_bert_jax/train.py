"""The pretraining loop: one readable file to fork for an experiment.

What a step does (Google `run_pretraining.py`, bert-pretraining.md §5–§6):
  1. with `masking=dynamic`, choose fresh masked-LM positions on the device (`masking.mask_batch`);
  2. forward BERT with dropout, the MLM head only at the prediction slots (sparse head);
  3. loss = MLM + NSP, gradients, optimizer update (`optimizers.make_optimizer`: clipping, BERT Adam, schedule).

Loss normaliser across devices: the MLM loss is Σ(w·NLL) / (Σw + 1e-5) with both sums over the GLOBAL batch (all
devices, all hosts), the NSP loss the mean over the global batch. On one device this is exactly Google's loss; on
many it is the loss of the whole batch, not a mean of per-device losses (which would weight devices with few
predictions as much as devices with many), and it does not depend on how the batch is split. The same rule holds
for `--grad_accum_steps=k`: the step receives the whole batch, splits it into k micro-batches inside the jitted step
(`accumulate_gradients`, a `lax.scan`), and every micro-batch's loss is divided by the denominators of the WHOLE
batch, so the summed gradient equals the unsplit batch's up to fp32 rounding; one optimizer update per step.

Two ways to run on several devices, same results:
  * `pjit` (default): one `jax.jit` over a ('data', 'fsdp', 'tensor') mesh; parameters and optimizer state are placed
    by the model's logical axis names through `sharding.LOGICAL_AXIS_RULES` (replicated for data parallelism, split
    for FSDP/tensor parallelism), the batch is split over ('data', 'fsdp'). Works across processes (hosts).
  * `pmap`: the classic data-parallel form: the state is stacked once per local device and the summed gradients are
    applied on every device. Single process only.
Random numbers (dynamic masks, dropout) come from `fold_in(run key, step, 0)` (dropout of micro-batch i: folded
with i). Under `pjit` they are drawn
for the global batch (partitionable threefry), so they do not depend on the mesh or the number of hosts; under `pmap`
each device folds in its index, so pmap and pjit agree exactly only without dropout and with static masks.

The loop saves checkpoints (`checkpointing.py`), resumes from the newest one with the exact input position, RNG and
open metric window, stops cleanly on SIGTERM/SIGINT (saving first), refuses to continue after a non-finite loss, logs
(`metrics_io.py`) and evaluates on held-out data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clinical_bert_jax import (
  checkpointing,
  dp,
  fileio,
  host_memory,
  losses,
  masking,
  metrics_io,
  model,
  optimizers,
  sharding,
)
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError
from clinical_bert_jax.input_pipeline import DevicePrefetcher, EvalInput, PretrainingInput, Prefetcher
from clinical_bert_jax.records import PretrainingData
from clinical_bert_jax.settings import setting

PARALLELISMS = ("pjit", "pmap")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PMAP_AXIS = "batch"
# Additive statistics of a step (losses.pretraining_sums), summed over micro-batches and log windows.
SUM_NAMES = ("mlm_loss_sum", "mlm_correct_sum", "mlm_weight_sum", "nsp_loss_sum", "nsp_correct_sum", "nsp_count")


def parse_profile_steps(value: str | None) -> tuple[int, int] | None:
  """`--profile_steps=START,END` → (START, END); None for an empty flag."""
  if not value:
    return None
  try:
    start, end = (int(part) for part in value.split(","))
  except ValueError:
    raise UserError(f"--profile_steps={value} must be START,END (two step numbers, e.g. 10,20)") from None
  if not 1 <= start <= end:
    raise UserError(f"--profile_steps={value} needs 1 <= START <= END")
  return start, end


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything the loop needs besides the model config and the data. Each field declared with `settings.setting` is
  also a flag of `pretrain` (same name, default and help; `google=True`: Google's `run_pretraining.py` name), so this
  is the one declaration of the training settings. Defaults are the paper's discharge-summary run
  (clinicalbert-paper.md §2). `validate()` checks them."""

  num_train_steps: int = setting(100_000, help="Optimizer updates in total.", google=True)
  num_warmup_steps: int = setting(10_000, help="Learning-rate warmup updates.", google=True)
  learning_rate: float = setting(5e-5, help="Peak learning rate.", google=True)
  # global, per optimizer update (split into grad_accum_steps micro-batches in the step)
  train_batch_size: int = setting(
    32, help="Global batch size (sequences per optimizer update, all devices).", google=True
  )
  max_predictions_per_seq: int = setting(
    20, help="Masked-LM prediction slots per sequence (checked against statically masked shards).", google=True
  )
  optimizer: str = setting(
    "google_adamw",
    choices=optimizers.OPTIMIZER_CHOICES,
    help="google_adamw (Google's AdamWeightDecay; earlier name bert_adam), adamw or lamb.",
  )
  lr_schedule: str | None = setting(
    None, help="bert (Google's, with the jump after warmup) or warmup_linear; default depends on --optimizer."
  )  # None: optimizers.DEFAULT_SCHEDULE[optimizer]
  weight_decay: float = setting(0.01, help="Decoupled weight decay (not on LayerNorm and biases).")
  clip_norm: float = setting(1.0, help="Global gradient-norm clipping (0: off).")
  grad_accum_steps: int = setting(
    1, help="Split each global batch into N sequential micro-batches (same update, less memory)."
  )
  whole_word_mask: bool = setting(False, help="Dynamic masking: mask whole words.")
  masked_lm_prob: float = setting(0.15, help="Dynamic masking: fraction of tokens predicted.")
  compute_dtype: str = setting(
    "float32", choices=COMPUTE_DTYPES, help="Activation/matmul dtype; parameters and optimizer state stay float32."
  )
  parallelism: str = setting(
    "pjit",
    choices=PARALLELISMS,
    help="pjit: jit over a (data, fsdp, tensor) mesh, multi-host; pmap: classic single-process data parallelism.",
  )
  mesh_data: int = setting(-1, help="pjit mesh: data-parallel size (-1: all remaining devices).")
  mesh_fsdp: int = setting(1, help="pjit mesh: FSDP size (parameters sharded).")
  mesh_tensor: int = setting(1, help="pjit mesh: tensor-parallel size.")
  seed: int = setting(12345, help="Seed of initialisation, data order, dropout and dynamic masks.")
  save_checkpoints_steps: int = setting(
    10_000, help="Save a checkpoint every N steps (and at the end, and on SIGTERM).", google=True
  )
  keep_checkpoints: int = setting(5, help="Keep the newest K checkpoints.")
  async_checkpointing: bool = setting(True, help="Write checkpoints in the background.")
  log_every_steps: int = setting(100, help="Log metrics every N steps.")
  eval_every_steps: int = setting(0, help="Evaluate every N steps (0: only at the start and the end).")
  eval_batch_size: int = setting(8, help="Global eval batch size.", google=True)
  max_eval_steps: int = setting(100, help="At most this many eval batches per evaluation.", google=True)
  prefetch_batches: int = 2  # not a flag
  # DP-SGD (dp.py): on when dp_l2_clip > 0
  dp_noise_multiplier: float = setting(
    0.0,
    help="DP-SGD noise multiplier σ: Gaussian noise of std σ·C on the sum of "
    "clipped per-example gradients (docs/privacy.md). Needs --dp_l2_clip.",
  )
  dp_l2_clip: float = setting(0.0, help="DP-SGD per-example gradient L2 bound C (0: DP off).")
  dp_delta: float = setting(1e-5, help="DP-SGD: the δ at which ε is reported (metrics, model card).")
  dp_accountant: str = setting("rdp", choices=dp.ACCOUNTANTS, help="DP-SGD accountant (dp-accounting).")
  # jax.profiler trace of steps START..END into WORKDIR/profile
  profile_steps: tuple[int, int] | None = setting(
    None,
    flag_type=str,
    parse=parse_profile_steps,
    help="START,END: write a jax.profiler trace of these steps to WORKDIR/profile (TensorBoard profile plugin, "
    "Perfetto).",
  )
  # nn.scan over the encoder layers: one compiled layer; the train state holds the layers stacked [L, ...], while
  # checkpoints, exports and TrainResult.params keep the per-layer names (converted at those boundaries only)
  scan_layers: bool = setting(
    False,
    help="Compile one encoder layer and scan it, the layers' weights and optimizer state stacked (faster compiles "
    "for deep models); checkpoints and exports keep per-layer names, so runs resume with or without it.",
  )
  # activation checkpointing per layer (model.REMAT_POLICIES)
  remat: str = setting(
    "none",
    choices=model.REMAT_POLICIES,
    help="Activation checkpointing per encoder layer: none, "
    "full (recompute each layer in the backward pass) or dots (keep matmul outputs). On the CPU backend it saves "
    "memory only with --scan_layers (XLA:CPU schedules an unrolled model's recomputation early; BENCHMARKS.md).",
  )

  @property
  def micro_batch_size(self) -> int:
    return self.train_batch_size // self.grad_accum_steps

  def validate(self) -> None:
    """UserError for settings that cannot work: numbers out of range, unknown names, bad optimizer numbers, batches
    that do not split evenly over micro-batches, processes and devices. The one check of the training settings: cheap,
    run before anything is written (`pretrain.PretrainOptions.validate`; library callers of `train_and_evaluate` call
    it themselves)."""
    for flag, value in (
      ("--train_batch_size", self.train_batch_size),
      ("--max_predictions_per_seq", self.max_predictions_per_seq),
      ("--save_checkpoints_steps", self.save_checkpoints_steps),
      ("--keep_checkpoints", self.keep_checkpoints),
      ("--log_every_steps", self.log_every_steps),
      ("--eval_batch_size", self.eval_batch_size),
      ("--max_eval_steps", self.max_eval_steps),
    ):
      if value < 1:
        raise UserError(f"{flag}={value} must be at least 1")
    if self.eval_every_steps < 0:
      raise UserError(
        f"--eval_every_steps={self.eval_every_steps} must be >= 0 (0: evaluate at the start and end only)"
      )
    if self.seed < 0:
      raise UserError(f"--seed={self.seed} must be a non-negative integer")
    if not 0.0 < self.masked_lm_prob <= 1.0:  # also rejects NaN
      raise UserError(f"--masked_lm_prob={self.masked_lm_prob} must be in (0, 1]")
    optimizers.make_optimizer(
      self.optimizer,
      self.learning_rate,
      self.num_train_steps,
      self.num_warmup_steps,
      self.weight_decay,
      self.clip_norm,
      self.grad_accum_steps,
      schedule=self.lr_schedule,
    )
    dp.check_settings(self.dp_noise_multiplier, self.dp_l2_clip, self.dp_delta, self.dp_accountant)
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise UserError(
        f"--compute_dtype={self.compute_dtype!r} is not supported; use one of {', '.join(COMPUTE_DTYPES)}"
      )
    if self.remat not in model.REMAT_POLICIES:
      raise UserError(f"--remat={self.remat!r} is not known; use one of {', '.join(model.REMAT_POLICIES)}")
    if self.parallelism not in PARALLELISMS:
      raise UserError(f"--parallelism={self.parallelism!r} is not known; use one of {', '.join(PARALLELISMS)}")
    if self.parallelism == "pmap" and jax.process_count() > 1:
      raise UserError("--parallelism=pmap runs in a single process; use --parallelism=pjit for multi-process runs")
    processes = jax.process_count()
    if self.train_batch_size % self.grad_accum_steps:
      raise UserError(
        f"--train_batch_size={self.train_batch_size} is not divisible by --grad_accum_steps="
        f"{self.grad_accum_steps}; each accumulation step needs the same number of sequences"
      )
    if self.parallelism == "pmap":
      splits, what = jax.local_device_count(), f"{jax.local_device_count()} local devices (pmap)"
    else:
      mesh = sharding.make_mesh(self.mesh_data, self.mesh_fsdp, self.mesh_tensor)
      splits = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], processes)
      what = (
        f"--mesh_data × --mesh_fsdp = {mesh.shape['data'] * mesh.shape['fsdp']} batch shards and "
        f"{processes} process(es)"
      )
    for flag, size in (("--train_batch_size", self.micro_batch_size), ("--eval_batch_size", self.eval_batch_size)):
      if size % splits:
        per_step = " per accumulation step" if flag == "--train_batch_size" and self.grad_accum_steps > 1 else ""
        raise UserError(
          f"{flag}: {size} sequences{per_step} cannot be split evenly over {what}; use a multiple of {splits}"
        )


def check_data_fit(cfg: TrainConfig, train_data: PretrainingData, eval_data: PretrainingData | None) -> None:
  """UserError for batches the data cannot fill and DP settings its size cannot account for: the check of the
  settings against the data, run (after `cfg.validate()`) before anything is written."""
  if cfg.train_batch_size > len(train_data):
    raise UserError(
      f"--train_batch_size={cfg.train_batch_size} needs {cfg.train_batch_size} sequences per step but "
      f"--input_file has only {len(train_data)} instances; lower it or generate more data"
    )
  if dp.is_enabled(cfg.dp_noise_multiplier, cfg.dp_l2_clip):
    dp.check_against_data(cfg.train_batch_size, cfg.grad_accum_steps, len(train_data), cfg.dp_delta)
  if eval_data is not None and cfg.eval_batch_size > len(eval_data):
    raise UserError(
      f"--eval_batch_size={cfg.eval_batch_size} is larger than the {len(eval_data)} instances of "
      "--eval_input_file; lower it"
    )


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training. `rng` is the run's base key (raw uint32 key data); per-step keys are
  folded from it and `step` (optimizer updates done), so resuming needs no RNG bookkeeping."""

  params: Any
  opt_state: Any
  rng: jax.Array
  step: jax.Array


@dataclasses.dataclass
class TrainResult:
  start_step: int  # where this invocation started (the resumed checkpoint, or 0)
  step: int
  completed: bool  # False when stopped by a signal before num_train_steps
  params: Any  # host numpy pytree (fp32), gathered from all devices and hosts
  last_train: dict[str, float]
  last_eval: dict[str, float]


# ------------------------------------------------------------------------------------------------ step functions
def _apply_model(bert: nn.Module, params: Any, batch: Mapping[str, jax.Array], dropout_key: jax.Array | None):
  """`params` in the layout of `bert` (stacked with `scan_layers`: the train state's layout)."""
  return bert.apply(
    {"params": params},
    batch["input_ids"],
    batch["input_mask"],
    batch["segment_ids"],
    batch["masked_lm_positions"],
    deterministic=dropout_key is None,
    rngs=None if dropout_key is None else {"dropout": dropout_key},
  )


def _mask_if_dynamic(
  batch: Mapping[str, jax.Array], key: jax.Array, vocab: masking.MaskingVocab | None, cfg: TrainConfig
) -> Mapping[str, jax.Array]:
  if vocab is None:
    return batch
  return masking.mask_batch(
    key,
    batch,
    vocab,
    max_predictions_per_seq=cfg.max_predictions_per_seq,
    masked_lm_prob=cfg.masked_lm_prob,
    whole_word=cfg.whole_word_mask,
  )


def _example_loss(bert: nn.Module, params: Any, example: Mapping[str, jax.Array], dropout_key: jax.Array):
  """One sequence's own loss (its MLM loss over its own prediction weights + its NSP loss) and its sums; DP-SGD
  clips the gradient of this."""
  batch = jax.tree.map(lambda value: value[None], dict(example))
  sums = losses.pretraining_sums(_apply_model(bert, params, batch, dropout_key), batch)
  return losses.metrics_from_sums(sums)["loss"], sums


def micro_batch_grads(
  params: Any,
  batch: Mapping[str, jax.Array],
  dropout_key: jax.Array,
  normalisers: Mapping[str, jax.Array],
  *,
  bert: nn.Module,
) -> tuple[Any, dict[str, jax.Array]]:
  """Gradient of one micro-batch's share of the whole step's loss, and the micro-batch's sums.

  The share is Σ_micro(w·NLL) / (W + 1e-5) + Σ_micro NSP-NLL / N with W and N (`normalisers`) counted over the
  WHOLE step (all micro-batches, devices and hosts), so the shares' gradients add up to the gradient of the global
  loss whatever the split. This is the seam for per-example work (e.g. clipping): replace it by a function with the
  same signature.
  """

  def loss_fn(params):
    sums = losses.pretraining_sums(_apply_model(bert, params, batch, dropout_key), batch)
    return losses.metrics_from_sums({**sums, **normalisers})["loss"], sums

  return jax.grad(loss_fn, has_aux=True)(params)


def step_normalisers(batch: Mapping[str, jax.Array], axis_name: str | None = None) -> dict[str, jax.Array]:
  """The loss denominators of the whole step: Σ masked_lm_weights and the number of sequences, over all devices."""
  normalisers = {
    "mlm_weight_sum": jnp.sum(batch["masked_lm_weights"].astype(jnp.float32)),
    "nsp_count": jnp.asarray(batch["next_sentence_labels"].shape[0], jnp.float32),
  }
  return jax.lax.psum(normalisers, axis_name) if axis_name is not None else normalisers


def split_micro_batches(batch: Mapping[str, jax.Array], num_micro_batches: int) -> dict[str, jax.Array]:
  """[B, ...] → [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, … Strided rather than contiguous: the rows
  each device (or host) holds stay on it, so splitting moves no data between devices."""

  def split(values: jax.Array) -> jax.Array:
    strided = values.reshape((values.shape[0] // num_micro_batches, num_micro_batches) + values.shape[1:])
    return jnp.swapaxes(nn.with_logical_constraint(strided, (model.BATCH,) + (None,) * (strided.ndim - 1)), 0, 1)

  return {name: split(values) for name, values in batch.items()}


def accumulate_gradients(
  grad_fn: Callable[..., tuple[Any, dict[str, jax.Array]]],
  params: Any,
  batch: Mapping[str, jax.Array],
  dropout_key: jax.Array,
  normalisers: Mapping[str, jax.Array],
  num_micro_batches: int,
) -> tuple[Any, dict[str, jax.Array]]:
  """Σ over micro-batches of `grad_fn(params, micro_batch, key, normalisers)`, in a `lax.scan` inside the step (one
  compiled micro-step, activations of one micro-batch alive at a time). Micro-batch i draws dropout from
  fold_in(dropout_key, i); with one micro-batch the key is used as it is."""
  if num_micro_batches == 1:
    return grad_fn(params, batch, dropout_key, normalisers)
  micro_batches = split_micro_batches(batch, num_micro_batches)

  def body(carry, inputs):
    index, micro_batch = inputs
    grads, sums = grad_fn(params, micro_batch, jax.random.fold_in(dropout_key, index), normalisers)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches), dropout_key, normalisers))
  carry = jax.tree.map(lambda shape: jnp.zeros(shape.shape, shape.dtype), zeros)
  (grads, sums), _ = jax.lax.scan(body, carry, (jnp.arange(num_micro_batches), micro_batches))
  return grads, sums


def train_step(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  bert: nn.Module,
  tx: optax.GradientTransformation,
  cfg: TrainConfig,
  vocab: masking.MaskingVocab | None,
  axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on the whole step's batch: (dynamic masks,) `cfg.grad_accum_steps` forward/backward
  passes accumulated in a scan, one optimizer call. Returns the new state and the step's sums.

  `axis_name` is set under pmap: counts and gradients are then summed over devices, so every device applies the
  gradient of the global loss.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), 0)
  noise_key = dp.noise_key(key)  # DP-SGD noise: drawn once per step, the same on every device
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  mask_key, dropout_key = jax.random.split(key)
  batch = _mask_if_dynamic(batch, mask_key, vocab, cfg)
  normalisers = step_normalisers(batch, axis_name)
  private = dp.is_enabled(cfg.dp_noise_multiplier, cfg.dp_l2_clip)
  if private:  # DP-SGD (dp.py): Σ of per-example clipped gradients over every micro-batch, noise once, ÷ B
    example_loss = functools.partial(_example_loss, bert)

    def grad_fn(params, micro_batch, micro_key, _):
      summed, aux, _ = dp.clipped_grad_sum(example_loss, params, micro_batch, micro_key, cfg.dp_l2_clip)
      return summed, aux
  else:
    grad_fn = functools.partial(micro_batch_grads, bert=bert)
  grads, sums = accumulate_gradients(grad_fn, state.params, batch, dropout_key, normalisers, cfg.grad_accum_steps)
  if axis_name is not None:
    grads, sums = jax.lax.psum((grads, sums), axis_name)
  if private:
    if cfg.dp_noise_multiplier > 0:
      grads = dp.add_noise(grads, noise_key, cfg.dp_noise_multiplier * cfg.dp_l2_clip)
    grads = jax.tree.map(lambda leaf: leaf / normalisers["nsp_count"], grads)  # B: sequences of the whole step
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state, step=state.step + 1)
  return new_state, {**sums, "grad_norm": optax.tree.norm(grads)}


def eval_step(
  params: Any,
  batch: Mapping[str, jax.Array],
  batch_index: jax.Array,
  *,
  bert: nn.Module,
  cfg: TrainConfig,
  vocab: masking.MaskingVocab | None,
  eval_key: jax.Array,
  axis_name: str | None = None,
) -> dict[str, jax.Array]:
  """Sums of one held-out batch, no dropout. Dynamic masks use a fixed key per batch: every evaluation sees the
  same masks, so eval curves are comparable across steps."""
  key = jax.random.fold_in(jax.random.wrap_key_data(eval_key), batch_index)
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  batch = _mask_if_dynamic(batch, key, vocab, cfg)
  sums = losses.pretraining_sums(_apply_model(bert, params, batch, None), batch)
  return jax.lax.psum(sums, axis_name) if axis_name is not None else sums


# --------------------------------------------------------------------------------------- device placement
def _abstract_rng_and_step(where: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
  """Restore targets of `train_state`'s rng (raw key data of the default PRNG implementation) and step."""
  key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  return {
    "rng": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=where),
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=where),
  }


class PjitRuntime:
  """`jax.jit` over a named mesh: state placed by logical axis names, batch split over ('data', 'fsdp')."""

  def __init__(
    self,
    cfg: TrainConfig,
    config: BertConfig,
    bert: nn.Module,
    tx: optax.GradientTransformation,
    train_vocab: masking.MaskingVocab | None,
    eval_vocab: masking.MaskingVocab | None,
    eval_key: jax.Array,
  ):
    self.mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
    self.num_devices = self.mesh.size
    self.config = config
    self.scan_layers = cfg.scan_layers
    self.tx = tx
    # The checkpoint layout (per-layer) and the train state's (stacked with scan_layers; else the same).
    self._shapes, self._opt_shapes, self._ckpt_param_sharding, self._ckpt_opt_sharding = self._layout(False)
    _, _, self.param_sharding, self.opt_sharding = self._layout(cfg.scan_layers)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    if cfg.scan_layers:  # layout conversions at the boundaries (checkpoints, warm start), placed like their targets
      self._to_train_layout = jax.jit(
        functools.partial(model.to_layer_layout, scan_layers=True),
        out_shardings=(self.param_sharding, self.opt_sharding),
      )
      self._to_checkpoint_layout = jax.jit(
        functools.partial(model.to_layer_layout, scan_layers=False),
        out_shardings=(self._ckpt_param_sharding, self._ckpt_opt_sharding),
      )
    state_sharding = TrainState(
      params=self.param_sharding, opt_state=self.opt_sharding, rng=self.replicated, step=self.replicated
    )
    batch_sharding = sharding.batch_sharding(self.mesh)
    self._train_compiled = None
    self._train = jax.jit(
      functools.partial(train_step, bert=bert, tx=tx, cfg=cfg, vocab=train_vocab),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, self.replicated),
      donate_argnums=(0,),
    )
    self._eval = jax.jit(
      functools.partial(eval_step, bert=bert, cfg=cfg, vocab=eval_vocab, eval_key=eval_key),
      in_shardings=(self.param_sharding, batch_sharding, self.replicated),
      out_shardings=self.replicated,
    )

  def _layout(self, scan_layers: bool) -> tuple[Any, Any, Any, Any]:
    """Param shapes, optimizer-state shapes and their shardings in the per-layer or the stacked layout."""
    shapes = model.param_shapes(self.config, scan_layers)
    param_sharding = sharding.param_shardings(self.mesh, model.param_logical_axes(self.config, scan_layers), shapes)
    opt_shapes = jax.eval_shape(self.tx.init, shapes)
    opt_sharding = sharding.mirror_param_shardings(opt_shapes, shapes, param_sharding, self.mesh)
    return shapes, opt_shapes, param_sharding, opt_sharding

  @contextlib.contextmanager
  def _mesh_context(self):
    # The model's activation constraints (nn.with_logical_constraint) resolve through these at trace time.
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      yield

  def _place(self, tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) → global arrays; works across processes."""
    return jax.tree.map(
      lambda value, where: jax.make_array_from_callback(np.shape(value), where, lambda index: np.asarray(value)[index]),
      tree,
      shardings,
    )

  def init_state(self, params: Any | None, init_key: jax.Array, train_key_data: np.ndarray) -> TrainState:
    """`params`: host arrays in the per-layer layout (a warm start), or None for a fresh initialisation."""
    if params is None:
      init = functools.partial(model.init_params, self.config, scan_layers=self.scan_layers)
      params = jax.jit(init, out_shardings=self.param_sharding)(init_key)
    elif self.scan_layers:
      params = self._place(params, self._ckpt_param_sharding)
      params = jax.jit(model.stack_layer_params, out_shardings=self.param_sharding)(params)
    else:
      params = self._place(params, self.param_sharding)
    opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sharding)(params)
    rng, step = self._place((train_key_data, np.zeros((), np.int32)), (self.replicated, self.replicated))
    return TrainState(params=params, opt_state=opt_state, rng=rng, step=step)

  def abstract_checkpoint(self) -> tuple[Any, Any]:
    """Restore targets in the checkpoint's (per-layer) layout, whatever the train state's."""
    struct = lambda shape, where: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=where)
    params = jax.tree.map(struct, self._shapes, self._ckpt_param_sharding)
    opt_state = jax.tree.map(struct, self._opt_shapes, self._ckpt_opt_sharding)
    return params, {"opt_state": opt_state, **_abstract_rng_and_step(self.replicated)}

  def state_from_checkpoint(self, restored: checkpointing.Restored) -> TrainState:
    items = restored.train_state
    params, opt_state = restored.params, items["opt_state"]
    if self.scan_layers:
      params, opt_state = self._to_train_layout((params, opt_state))
    return TrainState(params=params, opt_state=opt_state, rng=items["rng"], step=items["step"])

  def checkpoint_items(self, state: TrainState) -> tuple[Any, dict[str, Any]]:
    params, opt_state = state.params, state.opt_state
    if self.scan_layers:  # a per-layer copy (the saved arrays are new, so the step may donate the state's)
      params, opt_state = self._to_checkpoint_layout((params, opt_state))
    return params, {"opt_state": opt_state, "rng": state.rng, "step": state.step}

  def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return sharding.host_local_to_global(batch, self.mesh)

  def train_step(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
    with self._mesh_context():
      if self._train_compiled is None:
        # Compiled ahead of the first call so that the host memory the initialisation and the compiler freed can go
        # back to the system before the step's own buffers are allocated (BENCHMARKS.md, "memory").
        self._train_compiled = self._train.lower(state, batch).compile()
        host_memory.release_freed_memory()
      return self._train_compiled(state, batch)

  def eval_step(self, params: Any, batch: Any, batch_index: int) -> Any:
    with self._mesh_context():
      return self._eval(params, batch, np.int32(batch_index))

  def host_values(self, tree: Any) -> Any:
    """Replicated step outputs → numpy."""
    return jax.device_get(tree)

  def host_params(self, state: TrainState) -> Any:
    """Full fp32 params as numpy on every process (gathers FSDP/tensor shards across hosts), per-layer layout."""
    if jax.process_count() == 1:
      params = jax.device_get(state.params)
    else:
      from jax.experimental import multihost_utils

      params = multihost_utils.process_allgather(state.params, tiled=True)
    return model.to_layer_layout(params, scan_layers=False)


class PmapRuntime:
  """`jax.pmap` over this process's devices: state stacked per device, batch reshaped to [devices, rows, ...]."""

  def __init__(
    self,
    cfg: TrainConfig,
    config: BertConfig,
    bert: nn.Module,
    tx: optax.GradientTransformation,
    train_vocab: masking.MaskingVocab | None,
    eval_vocab: masking.MaskingVocab | None,
    eval_key: jax.Array,
  ):
    devices = jax.local_devices()
    self.num_devices = len(devices)
    self.mesh = Mesh(np.array(devices), (PMAP_AXIS,))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.stacked = NamedSharding(self.mesh, PartitionSpec(PMAP_AXIS))
    self.config = config
    self.tx = tx
    self.scan_layers = cfg.scan_layers
    # layout conversions of replicated params / optimizer state at the boundaries (checkpoints, warm start)
    self._to_train_layout = jax.jit(
      functools.partial(model.to_layer_layout, scan_layers=True), out_shardings=self.replicated
    )
    self._to_checkpoint_layout = jax.jit(
      functools.partial(model.to_layer_layout, scan_layers=False), out_shardings=self.replicated
    )
    self._train = jax.pmap(
      functools.partial(train_step, bert=bert, tx=tx, cfg=cfg, vocab=train_vocab, axis_name=PMAP_AXIS),
      axis_name=PMAP_AXIS,
      in_axes=(0, 0),
      donate_argnums=(0,),
    )
    self._eval = jax.pmap(
      functools.partial(eval_step, bert=bert, cfg=cfg, vocab=eval_vocab, eval_key=eval_key, axis_name=PMAP_AXIS),
      axis_name=PMAP_AXIS,
      in_axes=(0, 0, None),
    )

  def _stack(self, tree: Any) -> Any:
    """Replicated arrays → [devices, ...] arrays holding one copy per device (no host round trip)."""

    def stack(array: jax.Array) -> jax.Array:
      array = jax.device_put(array, self.replicated)
      shards = sorted(array.addressable_shards, key=lambda shard: list(self.mesh.devices).index(shard.device))
      return jax.make_array_from_single_device_arrays(
        (self.num_devices,) + array.shape, self.stacked, [shard.data[None] for shard in shards]
      )

    return jax.tree.map(stack, tree)

  def _unstack(self, tree: Any) -> Any:
    """[devices, ...] arrays → one replicated array (the copies are identical)."""

    def unstack(array: jax.Array) -> jax.Array:
      shape = array.shape[1:]
      return jax.make_array_from_single_device_arrays(
        shape, self.replicated, [shard.data.reshape(shape) for shard in array.addressable_shards]
      )

    return jax.tree.map(unstack, tree)

  def init_state(self, params: Any | None, init_key: jax.Array, train_key_data: np.ndarray) -> TrainState:
    if params is None:
      init = functools.partial(model.init_params, self.config, scan_layers=self.scan_layers)
      params = jax.jit(init, out_shardings=self.replicated)(init_key)
    else:  # host arrays in the per-layer layout (a warm start)
      params = jax.device_put(params, self.replicated)
      params = self._to_train_layout(params) if self.scan_layers else params
    opt_state = jax.jit(self.tx.init, out_shardings=self.replicated)(params)
    state = TrainState(
      params=params, opt_state=opt_state, rng=jnp.asarray(train_key_data), step=jnp.zeros((), jnp.int32)
    )
    return self._stack(state)

  def abstract_checkpoint(self) -> tuple[Any, Any]:
    shapes = model.param_shapes(self.config)
    struct = lambda shape: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=self.replicated)
    return jax.tree.map(struct, shapes), {
      "opt_state": jax.tree.map(struct, jax.eval_shape(self.tx.init, shapes)),
      **_abstract_rng_and_step(self.replicated),
    }

  def state_from_checkpoint(self, restored: checkpointing.Restored) -> TrainState:
    items = restored.train_state
    params, opt_state = restored.params, items["opt_state"]
    if self.scan_layers:
      params, opt_state = self._to_train_layout((params, opt_state))
    return self._stack(TrainState(params=params, opt_state=opt_state, rng=items["rng"], step=items["step"]))

  def checkpoint_items(self, state: TrainState) -> tuple[Any, dict[str, Any]]:
    state = self._unstack(state)
    params, opt_state = state.params, state.opt_state
    if self.scan_layers:
      params, opt_state = self._to_checkpoint_layout((params, opt_state))
    return params, {"opt_state": opt_state, "rng": state.rng, "step": state.step}

  def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    # An explicit per-device size: -1 cannot be inferred for the zero-width prediction slots of unmasked data.
    return {
      name: jax.device_put(
        np.reshape(values, (self.num_devices, len(values) // self.num_devices) + np.shape(values)[1:]), self.stacked
      )
      for name, values in batch.items()
    }

  def train_step(self, state: TrainState, batch: Any) -> tuple[TrainState, Any]:
    return self._train(state, batch)

  def eval_step(self, params: Any, batch: Any, batch_index: int) -> Any:
    return self._eval(params, batch, np.int32(batch_index))

  def host_values(self, tree: Any) -> Any:
    return jax.tree.map(lambda array: np.asarray(array.addressable_shards[0].data)[0], tree)

  def host_params(self, state: TrainState) -> Any:
    return model.to_layer_layout(self.host_values(state.params), scan_layers=False)


def make_runtime(
  cfg: TrainConfig,
  config: BertConfig,
  tx: optax.GradientTransformation,
  train_vocab: masking.MaskingVocab | None,
  eval_vocab: masking.MaskingVocab | None,
  eval_key: jax.Array,
) -> PjitRuntime | PmapRuntime:
  bert = model.BertForPreTraining(
    config, dtype=COMPUTE_DTYPES[cfg.compute_dtype], scan_layers=cfg.scan_layers, remat=cfg.remat
  )
  runtime = PjitRuntime if cfg.parallelism == "pjit" else PmapRuntime
  return runtime(cfg, config, bert, tx, train_vocab, eval_vocab, eval_key)


def make_train_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """The optimizer of the train step: one update per step (accumulation happens inside the step, not in optax)."""
  return optimizers.make_optimizer(
    cfg.optimizer,
    cfg.learning_rate,
    cfg.num_train_steps,
    cfg.num_warmup_steps,
    cfg.weight_decay,
    cfg.clip_norm,
    schedule=cfg.lr_schedule,
  )


# ---------------------------------------------------------------------------------------------------- signals
class StopRequest:
  """Turns SIGTERM/SIGINT (preemption, Ctrl-C) into a flag the loop checks between steps.

  Multi-host runs (jax.distributed with its preemption service, the default, e.g. on TPU pods) leave SIGTERM to JAX:
  its preemption notice reaches every host, which agree on the next safe step (`reached_preemption_sync_point`,
  polled every step); there every host saves and stops. SIGINT stays ours, agreed on at log steps.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}
    self.preemption_service = _has_preemption_service()

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        if signum == signal.SIGTERM and self.preemption_service:
          continue
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def preempted_at(self, step: int) -> bool:
    """Multi-host: True at the step all hosts agreed to save at after a preemption notice (call every step)."""
    if not self.preemption_service:
      return False
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
      self.signal_name = self.signal_name or "a preemption notice (JAX preemption service)"
      return True
    return False

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def agreed(self) -> bool:
    """Whether any process was asked to stop (a collective with several processes: call it on all of them)."""
    if jax.process_count() == 1:
      return self.signal_name is not None
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(self.signal_name is not None))
    return bool(np.any(flags))


def _has_preemption_service() -> bool:
  """Whether this multi-process run has jax.distributed's preemption service (on unless disabled by config)."""
  if jax.process_count() == 1 or not jax.distributed.is_initialized():
    return False
  from jax.experimental import multihost_utils

  try:
    multihost_utils.reached_preemption_sync_point(-1)  # False without a notice; raises when the service is off
  except RuntimeError:
    return False
  return True


class Profiler:
  """A `jax.profiler` trace of steps START..END (inclusive) into WORKDIR/profile (TensorBoard's profile plugin,
  Perfetto). A `gs://` workdir gets the trace uploaded when it stops (the profiler writes to local disk)."""

  def __init__(self, workdir: Any, steps: tuple[int, int] | None, enabled: bool):
    self.steps = steps if enabled else None
    self.target = workdir / "profile"
    self._local: Any = None
    self.active = False

  def before_step(self, step: int) -> None:
    if self.steps is None or step != self.steps[0]:
      return
    import tempfile

    if fileio.is_remote(self.target):
      self._local = tempfile.TemporaryDirectory(prefix="clinical_bert_jax-profile-")
    jax.profiler.start_trace(self._local.name if self._local else str(self.target))
    self.active = True

  def after_step(self, step: int, state: Any) -> None:
    if self.active and step >= self.steps[1]:
      self.stop(state)

  def stop(self, state: Any = None) -> None:
    if not self.active:
      return
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    if self._local is not None:
      fileio.upload_tree(Path(self._local.name), self.target)
      self._local.cleanup()
      self._local = None
    logging.warning("profile of steps %d-%d written to %s", *self.steps, self.target)


# -------------------------------------------------------------------------------------------------- the loop
def _host_step_values(values: Mapping[str, Any]) -> dict[str, float]:
  """A step's statistics (sums over its micro-batches, the norm of the accumulated gradient) as Python floats."""
  return {name: float(values[name]) for name in (*SUM_NAMES, "grad_norm")}


def _is_finite(values: Mapping[str, float]) -> bool:
  return all(math.isfinite(value) for value in values.values())


def evaluate(
  runtime: PjitRuntime | PmapRuntime, params: Any, eval_batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, float]:
  """Google's eval metrics (`eval/loss`, `eval/mlm_loss`, `eval/mlm_accuracy`, ...) over the held-out batches."""
  totals = dict.fromkeys(SUM_NAMES, 0.0)
  for index, batch in enumerate(eval_batches):
    sums = runtime.host_values(runtime.eval_step(params, runtime.put_batch(batch), index))
    for name in SUM_NAMES:
      totals[name] += float(sums[name])
  metrics = losses.metrics_from_sums({name: np.float64(value) for name, value in totals.items()})
  return {f"eval/{name}": float(value) for name, value in metrics.items()}


def train_and_evaluate(
  cfg: TrainConfig,
  config: BertConfig,
  workdir: str | Path,
  train_data: PretrainingData,
  eval_data: PretrainingData | None = None,
  train_vocab: masking.MaskingVocab | None = None,
  eval_vocab: masking.MaskingVocab | None = None,
  init_params: Any | None = None,
  print_fn: Callable[[str], None] = print,
) -> TrainResult:
  """Trains until `cfg.num_train_steps` (resuming from the workdir's newest checkpoint), evaluating and logging.

  `train_vocab`/`eval_vocab` switch dynamic masking on for the training/held-out data (None: use the stored masks).
  `init_params` (host arrays) start a fresh run from a pretrained model; they are ignored when resuming.
  Raises UserError when the loss becomes non-finite (nothing after the last good checkpoint is saved). The caller has
  checked the settings (`cfg.validate()`, `check_data_fit`), as `pretrain.run` does before it writes the workdir.
  """
  workdir = fileio.as_path(workdir)
  is_primary = jax.process_index() == 0
  tx = make_train_optimizer(cfg)
  schedule = optimizers.make_schedule(
    cfg.learning_rate,
    cfg.num_train_steps,
    cfg.num_warmup_steps,
    cfg.lr_schedule or optimizers.default_schedule(cfg.optimizer),
  )
  init_key, train_key, eval_key = jax.random.split(jax.random.key(cfg.seed), 3)
  runtime = make_runtime(cfg, config, tx, train_vocab, eval_vocab, jax.random.key_data(eval_key))

  train_input = PretrainingInput(train_data, cfg.train_batch_size, cfg.seed)
  eval_input = EvalInput(eval_data, cfg.eval_batch_size, cfg.max_eval_steps) if eval_data is not None else None
  store = checkpointing.CheckpointStore(workdir, cfg.keep_checkpoints, cfg.async_checkpointing)
  restored = store.restore_latest(*runtime.abstract_checkpoint())
  dp_record = None
  if dp.is_enabled(cfg.dp_noise_multiplier, cfg.dp_l2_clip):
    dp_record = dp.accounting_record(
      cfg.dp_noise_multiplier, cfg.dp_l2_clip, cfg.dp_delta, cfg.dp_accountant, cfg.train_batch_size, len(train_data)
    )
  if restored is not None:
    dp.check_resume(workdir, dp_record)
  elif is_primary:
    dp.write_record(workdir, dp_record)  # None: removes a stale record of an earlier private run
  if restored is not None:
    state = runtime.state_from_checkpoint(restored)
    train_input.set_state(restored.data_state["input"])
    window = metrics_io.MetricWindow.from_state(restored.data_state["metric_window"])
    start_step = restored.step
    logging.info("resuming from %s/%d", store.directory, start_step)
  else:
    state = runtime.init_state(init_params, init_key, np.asarray(jax.random.key_data(train_key)))
    window, start_step = metrics_io.MetricWindow(), 0

  writer = metrics_io.MetricsWriter(workdir, restored.step if restored is not None else None, enabled=is_primary)
  sequences_per_step = cfg.train_batch_size
  seq_length = train_data.max_seq_length
  device_kind = jax.devices()[0].device_kind
  perf = metrics_io.PerfMeter(
    sequences_per_step,
    seq_length,
    metrics_io.train_flops_per_sequence(config, seq_length, cfg.max_predictions_per_seq),
    runtime.num_devices,
    metrics_io.peak_flops_per_device(device_kind),
  )
  batches = DevicePrefetcher(Prefetcher(train_input, cfg.prefetch_batches), cfg.prefetch_batches, runtime.put_batch)
  last_train: dict[str, float] = {}
  last_eval: dict[str, float] = {}

  def log(step: int, values: Mapping[str, float]) -> None:
    writer.write(step, values)
    if is_primary:
      print_fn(metrics_io.format_progress(step, cfg.num_train_steps, values))

  def run_eval(step: int) -> None:
    nonlocal last_eval
    if eval_input is None:
      return
    last_eval = evaluate(runtime, state.params, eval_input)
    writer.write(step, last_eval)
    if is_primary:
      print_fn(f"eval at step {step}: " + ", ".join(f"{name[5:]} {value:.4f}" for name, value in last_eval.items()))

  def finish_step(step: int, device_stats: Any) -> None:
    """Host side of a dispatched step: finiteness check, metric window, log line."""
    nonlocal window, last_train
    values = _host_step_values(runtime.host_values(device_stats))
    if not _is_finite(values):
      where = store.resume_point(*runtime.abstract_checkpoint())  # re-verified: names the step a rerun uses
      raise UserError(
        f"training diverged: non-finite loss or gradient at step {step}; stopped without saving "
        f"({where}); lower --learning_rate, keep --clip_norm on, or check the data"
      )
    if step == start_step + 1:
      perf.restart(step)  # the first step of a process includes compilation
    window.add(values)
    if step % cfg.log_every_steps == 0 or step == cfg.num_train_steps:
      last_train = {f"train/{name}": value for name, value in window.summary().items()}
      last_train["train/learning_rate"] = float(schedule(step - 1))
      if dp_record is not None:
        last_train["train/dp_epsilon"] = dp.epsilon_at(dp_record, step)
      log(step, {**last_train, **perf.measure(step, cfg.num_train_steps)})
      window = metrics_io.MetricWindow()

  completed = False
  step = start_step
  stop = StopRequest()
  profiler = Profiler(workdir, cfg.profile_steps, enabled=True)
  try:
    with stop:
      if start_step == 0:
        run_eval(0)
      pending: tuple[int, Any] | None = None
      while step < cfg.num_train_steps:
        step += 1
        profiler.before_step(step)
        state, device_stats = runtime.train_step(state, next(batches))
        if pending is not None:  # fetch the previous step's numbers while this one runs
          finish_step(*pending)
        pending = (step, device_stats)
        profiler.after_step(step, state)
        check_stop = jax.process_count() == 1 or step % cfg.log_every_steps == 0
        stopping = stop.preempted_at(step) or check_stop and stop.agreed()
        save_now = step % cfg.save_checkpoints_steps == 0 or step == cfg.num_train_steps or stopping
        eval_now = step == cfg.num_train_steps or (cfg.eval_every_steps and step % cfg.eval_every_steps == 0)
        if save_now or eval_now:
          finish_step(*pending)
          pending = None
        if save_now:
          data_state = {"input": batches.get_state(), "metric_window": window.state()}
          writer.flush()  # the metrics up to this step are stored before the checkpoint that a resume starts from
          store.save(step, *runtime.checkpoint_items(state), data_state=data_state)
        if eval_now:
          run_eval(step)
          perf.restart(step)  # throughput measures training, not evaluation
        if stopping:
          store.wait()
          print_fn(
            f"received {stop.signal_name or 'a stop signal on another process'}: saved a checkpoint at step "
            f"{step} in {store.directory}; run the same command again to resume"
          )
          break
      else:
        completed = True
  finally:
    profiler.stop()
    batches.close()
    store.close()
    writer.close()
  if is_primary and completed:
    metrics_io.plot_loss_curve(writer.path, workdir / metrics_io.LOSS_CURVE_FILE)
  return TrainResult(
    start_step=start_step,
    step=step,
    completed=completed,
    params=runtime.host_params(state),
    last_train=last_train,
    last_eval=last_eval,
  )
