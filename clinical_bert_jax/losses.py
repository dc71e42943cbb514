"""Pretraining losses and metrics exactly as Google's `run_pretraining.py` computes them.

MLM loss = Σ(w·NLL) / (Σw + 1e-5) over the prediction slots (w = masked_lm_weights), NLL from a log-softmax over the
whole vocabulary; NSP loss = mean cross-entropy over the batch (label 0 = IsNext); total = MLM + NSP, unweighted.
Metrics are returned both as per-batch values and as sums/counts, so a caller can add them across devices, hosts,
accumulation micro-steps or eval batches before dividing.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

MLM_EPSILON = 1e-5  # Google's denominator guard


def mlm_sums(logits: jax.Array, label_ids: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
  """Weighted NLL and accuracy sums over prediction slots. logits [..., V] fp32; label_ids/weights [...]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, label_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == label_ids).astype(jnp.float32)
  return {
    "mlm_loss_sum": jnp.sum(weights * nll),
    "mlm_correct_sum": jnp.sum(weights * correct),
    "mlm_weight_sum": jnp.sum(weights),
  }


def nsp_sums(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels = labels.reshape(-1).astype(jnp.int32)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return {
    "nsp_loss_sum": jnp.sum(nll),
    "nsp_correct_sum": jnp.sum(correct),
    "nsp_count": jnp.asarray(labels.shape[0], jnp.float32),
  }


def metrics_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Turns (possibly globally summed) sums into Google's four metrics plus the total loss."""
  mlm_loss = sums["mlm_loss_sum"] / (sums["mlm_weight_sum"] + MLM_EPSILON)
  nsp_loss = sums["nsp_loss_sum"] / jnp.maximum(sums["nsp_count"], 1.0)
  return {
    "loss": mlm_loss + nsp_loss,
    "mlm_loss": mlm_loss,
    "nsp_loss": nsp_loss,
    "mlm_accuracy": sums["mlm_correct_sum"] / jnp.maximum(sums["mlm_weight_sum"], MLM_EPSILON),
    "nsp_accuracy": sums["nsp_correct_sum"] / jnp.maximum(sums["nsp_count"], 1.0),
  }


def pretraining_sums(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """All additive statistics of one batch (model outputs with gathered MLM logits [B, P, V])."""
  return {
    **mlm_sums(outputs["mlm_logits"], batch["masked_lm_ids"], batch["masked_lm_weights"]),
    **nsp_sums(outputs["nsp_logits"], batch["next_sentence_labels"]),
  }


def pretraining_loss(
  outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Google's total loss for one (per-device) batch, with metrics and the sums they came from."""
  sums = pretraining_sums(outputs, batch)
  metrics = metrics_from_sums(sums)
  return metrics["loss"], {**metrics, **sums}
