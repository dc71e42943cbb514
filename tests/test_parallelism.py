"""On 8 simulated CPU devices, pmap, pjit data parallelism and pjit with FSDP-sharded parameters train the same model
(same loss trajectory, same parameters); bf16 compute keeps fp32 state; gradient accumulation matches the full batch.

Tolerance: the three layouts sum gradients and losses in different orders (all-reduce trees, sharded matmuls), so
they agree to float32 rounding, not bitwise: per-step losses within 1e-5 relative, parameters within 2e-5 absolute
after 8 steps. Dropout is off and masks are static here, because pmap draws per-device random numbers (train.py).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from clinical_bert_jax import checkpointing, model_io, train
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.records import PretrainingData
from test_pretrain import PREDICTIONS, TINY_MODEL, deterministic_records, make_corpus

STEPS = 8
pytestmark = [
  pytest.mark.slow,  # trains on 8 simulated devices
  pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
  ),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return make_corpus(tmp_path_factory.mktemp("parallel_data"), train_count=256, eval_count=32)


def _run(train_data: Path, workdir: Path, **changes) -> tuple[list[float], train.TrainResult]:
  """Trains STEPS steps without dropout (or resumes the finished run); returns the per-step losses and the result."""
  config = BertConfig.from_dict({**TINY_MODEL, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
  cfg = train.TrainConfig(
    num_train_steps=STEPS,
    num_warmup_steps=2,
    learning_rate=3e-3,
    train_batch_size=16,
    max_predictions_per_seq=PREDICTIONS,
    optimizer="bert_adam",
    save_checkpoints_steps=STEPS,
    log_every_steps=1,
    seed=3,
    **changes,
  )
  result = train.train_and_evaluate(cfg, config, workdir, PretrainingData.open(train_data), print_fn=lambda line: None)
  config.save_hf(workdir / "config.json")  # what pretrain.py adds around the loop; lets model_io read the workdir
  losses = [record["train/loss"] for record in deterministic_records(workdir)]
  return losses, result


def _max_difference(left: dict, right: dict) -> float:
  return max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(left), jax.tree.leaves(right))
  )


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """pjit, pure data parallelism over the 8 devices."""
  return _run(corpus.train, tmp_path_factory.mktemp("pjit_data"), mesh_data=-1)


def test_pmap_pjit_and_fsdp_follow_the_same_loss_trajectory(corpus, reference, tmp_path):
  losses, result = reference
  assert len(losses) == STEPS and losses[-1] < losses[0]
  for name, changes in (("pmap", {"parallelism": "pmap"}), ("fsdp", {"mesh_data": 2, "mesh_fsdp": 4})):
    other_losses, other = _run(corpus.train, tmp_path / name, **changes)
    np.testing.assert_allclose(other_losses, losses, rtol=1e-5, err_msg=name)
    assert _max_difference(other.params, result.params) < 2e-5, name
    # Rerunning the finished run restores its checkpoint into the same layout (stacked for pmap, sharded for FSDP).
    _, resumed = _run(corpus.train, tmp_path / name, **changes)
    assert (resumed.start_step, resumed.completed) == (STEPS, True), name
    assert _max_difference(resumed.params, other.params) == 0, name
  # The FSDP checkpoint holds full arrays, readable without any mesh.
  restored = model_io.load_model(tmp_path / "fsdp")
  assert restored.step == STEPS and _max_difference(restored.params, result.params) < 2e-5
  assert checkpointing.restorable_steps(tmp_path / "pmap") == [STEPS]


def test_bfloat16_compute_keeps_float32_state_and_tracks_the_float32_run(corpus, reference, tmp_path):
  losses, _ = reference
  bf16_losses, bf16 = _run(corpus.train, tmp_path / "bf16", mesh_data=-1, compute_dtype="bfloat16")
  assert {np.asarray(leaf).dtype for leaf in jax.tree.leaves(bf16.params)} == {np.dtype(np.float32)}
  np.testing.assert_allclose(bf16_losses, losses, rtol=2e-2)
  assert bf16_losses != losses  # bf16 matmuls really ran


def test_gradient_accumulation_matches_the_full_batch(corpus, reference, tmp_path):
  losses, _ = reference
  accumulated, _ = _run(corpus.train, tmp_path / "accumulate", mesh_data=-1, grad_accum_steps=2)
  # The step splits the same 16 sequences into 2 micro-batches and normalises by the whole batch (train.py): the
  # same trajectory as the unsplit batch up to fp32 rounding (tests/test_train_step.py checks it step by step).
  np.testing.assert_allclose(accumulated, losses, rtol=1e-5)
