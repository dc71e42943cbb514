"""Differentially private pretraining (DP-SGD): per-example clipping, Gaussian noise and the privacy accountant.

The private gradient of one optimizer update over a global batch of B sequences (Abadi et al. 2016):

    g = ( Σ_i clip_C(∇ℓ_i) + N(0, σ²C²·I) ) / B,        clip_C(v) = v · min(1, C / ‖v‖₂)

where ℓ_i is the loss of sequence i alone: its masked-LM loss normalised by ITS OWN prediction weights plus its NSP
loss. (Google's loss divides by the weight sum of the whole batch; that would let one sequence change the scale of
every other sequence's gradient, so clipping would no longer bound its influence.) Per-example gradients are one
`jax.vmap` of `jax.grad` over the batch inside the jitted step.

Devices and micro-batches: the train step sums Σ clip_C(∇ℓ_i) over every micro-batch of `--grad_accum_steps`
(`train.accumulate_gradients`, a `lax.scan` inside the jitted step) and, under pmap, over devices (`psum`); then it
adds the noise once, with a key that is the same on every device, and divides by B: the update is the formula above
for any split into micro-batches and devices. `private_gradient` is the same computation for one batch in one call
(tests, small uses). The optimizer's own `--clip_norm` then acts on the private gradient (post-processing, no privacy
cost).

Accounting (`dp-accounting`, Google's library, pinned in requirements.txt): a Poisson-subsampled Gaussian mechanism
with sampling probability q = B / N (N training instances), noise multiplier σ, composed over the steps taken, under
the add/remove-one-instance relation; RDP by default, PLD on request. Our input pipeline draws fixed-size batches
from shuffled epochs rather than Poisson samples; reporting the Poisson bound for shuffled batches is the common
practice (TF Privacy, Opacus) but is not a proof — docs/privacy.md says so. The privacy unit is ONE TRAINING INSTANCE
(a sequence pair): a note contributes to many instances (`--dupe_factor`, several sentences), a patient to many notes,
and their ε grows with the number of instances they touch (group privacy).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from clinical_bert_jax.errors import UserError

ACCOUNTANTS = ("rdp", "pld")
PRIVACY_FILE = "privacy.json"  # in the workdir: what the accountant needs to report ε at any step
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024])
_NOISE_STREAM = 0x0D9  # folded into the step key: the noise key differs from the dropout and masking keys

ExampleLoss = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Any]]


# ------------------------------------------------------------------------------------------------ settings
def is_enabled(noise_multiplier: float, l2_clip: float) -> bool:
  """DP-SGD is on when per-example clipping is; noise without a clip bound has no defined scale."""
  return l2_clip > 0 or noise_multiplier > 0


def check_settings(noise_multiplier: float, l2_clip: float, delta: float, accountant: str) -> None:
  """One-line UserErrors for DP flags that cannot be accounted for (no data needed)."""
  for flag, value in (("--dp_noise_multiplier", noise_multiplier), ("--dp_l2_clip", l2_clip)):
    if not (value >= 0 and math.isfinite(value)):
      raise UserError(f"{flag}={value} must be a finite number >= 0")
  if noise_multiplier > 0 and l2_clip <= 0:
    raise UserError(
      f"--dp_noise_multiplier={noise_multiplier} needs --dp_l2_clip > 0: the noise's standard deviation "
      "is σ·C, and without per-example clipping one sequence's influence is unbounded"
    )
  if not 0 < delta < 1:
    raise UserError(f"--dp_delta={delta} must be in (0, 1); use well below 1/(number of training instances)")
  if accountant not in ACCOUNTANTS:
    raise UserError(f"--dp_accountant={accountant!r} is not known; use one of {', '.join(ACCOUNTANTS)}")


def check_against_data(train_batch_size: int, grad_accum_steps: int, num_examples: int, delta: float) -> None:
  """The accounting needs q = B/N < 1 and δ < 1/N; micro-batches must split the batch evenly (equal noise shares)."""
  if train_batch_size % grad_accum_steps:
    raise UserError(
      f"--dp_*: --train_batch_size={train_batch_size} is not divisible by --grad_accum_steps="
      f"{grad_accum_steps}; the noise is split equally over micro-batches of equal size"
    )
  if train_batch_size >= num_examples:
    raise UserError(
      f"--dp_*: --train_batch_size={train_batch_size} is not smaller than the {num_examples} training "
      "instances; the accountant's sampling rate B/N must be below 1 (use more data or a smaller batch)"
    )
  if delta >= 1.0 / num_examples:
    raise UserError(
      f"--dp_delta={delta} is not below 1/{num_examples} (one over the training instances): such a δ "
      "allows releasing a whole instance; use e.g. 1e-5 or less"
    )


# ------------------------------------------------------------------------------------------- private gradient
def clip_factor(norms: jax.Array, l2_clip: float) -> jax.Array:
  """min(1, C/‖g‖) per example; all ones with clipping off (C = 0 or inf)."""
  if not l2_clip or math.isinf(l2_clip):
    return jnp.ones_like(norms)
  return jnp.minimum(1.0, l2_clip / jnp.maximum(norms, 1e-12))


def clipped_grad_sum(
  example_loss: ExampleLoss, params: Any, batch: Mapping[str, jax.Array], key: jax.Array, l2_clip: float
) -> tuple[Any, Any, dict[str, jax.Array]]:
  """Σ_i clip_C(∇ℓ_i) over the rows of `batch`, the summed aux outputs, and clipping statistics.

  `example_loss(params, example, key)` sees one row (no batch axis) and returns (loss, aux); each row gets its own
  key (`fold_in(key, row)`), so dropout differs between rows as it does in the batched step.
  """
  rows = jax.tree.leaves(batch)[0].shape[0]

  def one(example, row):
    return jax.grad(example_loss, has_aux=True)(params, example, jax.random.fold_in(key, row))

  grads, aux = jax.vmap(one)(dict(batch), jnp.arange(rows))  # every grads leaf: [rows, *param shape]
  squares = sum(
    jnp.sum(jnp.square(leaf.astype(jnp.float32)).reshape(rows, -1), axis=1) for leaf in jax.tree.leaves(grads)
  )
  norms = jnp.sqrt(squares)  # [rows]
  factors = clip_factor(norms, l2_clip)  # [rows]
  summed = jax.tree.map(lambda leaf: jnp.tensordot(factors.astype(leaf.dtype), leaf, axes=1), grads)
  stats = {"dp_clipped_count": jnp.sum((factors < 1.0).astype(jnp.float32)), "dp_example_norm_sum": jnp.sum(norms)}
  return summed, jax.tree.map(lambda value: jnp.sum(value, axis=0), aux), stats


def noise_key(step_key: jax.Array) -> jax.Array:
  """The noise key of a (micro-)step: the same on every device and process (derive it before any axis fold)."""
  return jax.random.fold_in(step_key, _NOISE_STREAM)


def add_noise(tree: Any, key: jax.Array, stddev: float | jax.Array) -> Any:
  """tree + N(0, stddev²) independently per element (one key per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noisy = [
    leaf + stddev * jax.random.normal(k, leaf.shape, jnp.float32).astype(leaf.dtype) for leaf, k in zip(leaves, keys)
  ]
  return jax.tree.unflatten(treedef, noisy)


def private_gradient(
  example_loss: ExampleLoss,
  params: Any,
  batch: Mapping[str, jax.Array],
  *,
  example_key: jax.Array,
  noise_key: jax.Array,
  noise_multiplier: float,
  l2_clip: float,
  micro_steps: int = 1,
  axis_name: str | None = None,
) -> tuple[Any, Any, dict[str, jax.Array]]:
  """(Σ clip_C(∇ℓ_i) + N(0, σ²C²/k)) / m for one micro-batch of m global rows (k = micro_steps); see the module
  docstring for why averaging k of these gives the DP-SGD update. Under pmap (`axis_name`) the clipped sums and aux
  are summed over devices first and `noise_key` must be the same on every device."""
  summed, aux, stats = clipped_grad_sum(example_loss, params, batch, example_key, l2_clip)
  rows = jax.tree.leaves(batch)[0].shape[0]
  if axis_name is not None:
    summed, aux, stats = jax.lax.psum((summed, aux, stats), axis_name)
    rows = rows * jax.lax.psum(1, axis_name)
  if noise_multiplier > 0:
    summed = add_noise(summed, noise_key, noise_multiplier * l2_clip / math.sqrt(micro_steps))
  return jax.tree.map(lambda leaf: leaf / rows, summed), aux, stats


# ---------------------------------------------------------------------------------------------- accounting
def _event(noise_multiplier: float, sampling_probability: float, steps: int):
  import dp_accounting

  return dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier)),
    int(steps),
  )


def epsilon(
  noise_multiplier: float, sampling_probability: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
  """ε of `steps` Poisson-subsampled Gaussian steps at δ (inf without noise, 0 before the first step)."""
  if steps <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  import dp_accounting

  if accountant == "rdp":
    acc = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
  else:
    acc = dp_accounting.pld.PLDAccountant()
  acc.compose(_event(noise_multiplier, sampling_probability, steps))
  return float(acc.get_epsilon(delta))


def accounting_record(
  noise_multiplier: float, l2_clip: float, delta: float, accountant: str, batch_size: int, num_examples: int
) -> dict[str, Any]:
  """What `privacy.json` stores: everything needed to recompute ε at any step."""
  return {
    "mechanism": "DP-SGD (per-example clipping, Gaussian noise)",
    "noise_multiplier": noise_multiplier,
    "l2_clip": l2_clip,
    "delta": delta,
    "accountant": accountant,
    "batch_size": batch_size,
    "num_examples": num_examples,
    "sampling_probability": batch_size / num_examples,
    "sampling_assumption": "Poisson subsampling with q = batch_size / num_examples (the pipeline shuffles "
    "epochs and draws fixed-size batches)",
    "neighbouring_relation": "add or remove one training instance (sequence pair)",
    "library": "dp-accounting",
  }


def epsilon_at(record: Mapping[str, Any], steps: int) -> float:
  return epsilon(
    record["noise_multiplier"], record["sampling_probability"], steps, record["delta"], record["accountant"]
  )


def write_record(workdir: Path, record: Mapping[str, Any] | None) -> None:
  """Writes the workdir's privacy.json; None removes it (a fresh non-private run must not inherit a DP claim)."""
  from clinical_bert_jax.fileio import atomic_write

  if record is None:
    (Path(workdir) / PRIVACY_FILE).unlink(missing_ok=True)
    return
  with atomic_write(Path(workdir) / PRIVACY_FILE) as handle:
    json.dump(dict(record), handle, indent=2)


def read_record(workdir: Path) -> dict[str, Any] | None:
  path = Path(workdir) / PRIVACY_FILE
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise UserError(f"{path} is not valid JSON; it records the run's DP settings — restore it from a backup") from None


def check_resume(workdir: Path, record: Mapping[str, Any] | None) -> None:
  """A resumed run must keep the DP settings its earlier steps were accounted with (or stay non-private)."""
  previous = read_record(workdir)
  keys = ("noise_multiplier", "l2_clip", "batch_size", "num_examples")
  if previous is None and record is None:
    return
  if previous is None or record is None or any(previous[k] != record[k] for k in keys):
    raise UserError(
      f"--dp_* settings differ from those recorded in {Path(workdir) / PRIVACY_FILE} for the run being "
      "resumed (or one of the two is not private); the accountant composes identical steps — resume "
      "with the same --dp_noise_multiplier, --dp_l2_clip, --train_batch_size and data, or use a new "
      "--output_dir"
    )


def model_card_lines(source: str, step: int | None) -> list[str]:
  """A '## Privacy' section for an export of a pretraining workdir that trained with DP (else nothing)."""
  if not source.startswith("workdir:") or step is None:
    return []
  record = read_record(Path(source[len("workdir:") :].rsplit("@", 1)[0]))
  if record is None:
    return []
  eps = epsilon_at(record, step)
  return [
    "## Privacy",
    "",
    f"Pretrained with DP-SGD: per-example L2 clip C={record['l2_clip']}, noise multiplier "
    f"σ={record['noise_multiplier']}, batch {record['batch_size']} of {record['num_examples']} instances, "
    f"{step} steps: **(ε={eps:.3g}, δ={record['delta']:g})** ({record['accountant'].upper()} accountant of "
    "dp-accounting; " + record["sampling_assumption"] + "; " + record["neighbouring_relation"] + "). "
    "The unit is one training instance: a note or a patient that contributes many instances has a larger ε. "
    "This DP guarantee covers this pretraining run only, not an initial checkpoint it started from.",
    "",
  ]
