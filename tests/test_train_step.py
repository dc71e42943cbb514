"""The jitted train step (train.train_step through train.make_runtime, as `pretrain` runs it): gradient accumulation
inside the step gives the unsplit batch's update within fp32 rounding, under pjit and pmap, because every
micro-batch's loss is divided by the WHOLE batch's Σ weights (not its own). The batch's MLM weights are deliberately
uneven across micro-batches, so per-micro-batch normalisation (the old optax.MultiSteps way) would fail this test.

Dropout is off: its random bits depend on the micro-batch shapes (train.py), so only the deterministic network can
be compared across splits.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from clinical_bert_jax import train

from clinical_bert_jax.config import BertConfig

pytestmark = pytest.mark.slow  # compiles and runs train steps

SEQ, PREDICTIONS, BATCH, VOCAB = 16, 4, 32, 97
CONFIG = BertConfig(
  vocab_size=VOCAB,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=2,
  intermediate_size=64,
  max_position_embeddings=SEQ,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)
STEPS = 2


def _batch(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(6, SEQ + 1, BATCH)
  mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
  weights = (rng.random((BATCH, PREDICTIONS)) < np.linspace(0.1, 1.0, BATCH)[:, None]).astype(np.float32)
  weights[:, 0] = 1.0
  return {
    "input_ids": (rng.integers(5, VOCAB, (BATCH, SEQ)) * mask).astype(np.int32),
    "input_mask": mask,
    "segment_ids": (np.arange(SEQ)[None] >= lengths[:, None] // 2).astype(np.int32) * mask,
    "masked_lm_positions": np.sort(rng.integers(1, 6, (BATCH, PREDICTIONS)), axis=1).astype(np.int32),
    "masked_lm_ids": rng.integers(5, VOCAB, (BATCH, PREDICTIONS)).astype(np.int32),
    "masked_lm_weights": weights,
    "next_sentence_labels": rng.integers(0, 2, BATCH).astype(np.int32),
  }


def _train(**changes) -> tuple[list[dict], dict]:
  cfg = train.TrainConfig(
    num_train_steps=10,
    num_warmup_steps=1,
    learning_rate=1e-2,
    train_batch_size=BATCH,
    max_predictions_per_seq=PREDICTIONS,
    optimizer="bert_adam",
    **changes,
  )
  cfg.validate()
  keys = jax.random.split(jax.random.key(7), 3)
  runtime = train.make_runtime(cfg, CONFIG, train.make_train_optimizer(cfg), None, None, jax.random.key_data(keys[2]))
  state = runtime.init_state(None, keys[0], np.asarray(jax.random.key_data(keys[1])))
  stats = []
  for step in range(STEPS):
    state, values = runtime.train_step(state, runtime.put_batch(_batch(step)))
    stats.append({name: float(value) for name, value in runtime.host_values(values).items()})
  return stats, runtime.host_params(state)


@pytest.fixture(scope="module")
def unsplit():
  return _train(mesh_data=-1)


def _assert_same(left: tuple[list[dict], dict], right: tuple[list[dict], dict], what: str) -> None:
  for step, (a, b) in enumerate(zip(left[0], right[0])):
    for name in a:
      np.testing.assert_allclose(b[name], a[name], rtol=2e-5, atol=1e-6, err_msg=f"{what}: step {step} {name}")
  difference = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(left[1]), jax.tree.leaves(right[1]))
  )
  assert difference < 1e-5, (what, difference)


@pytest.mark.parametrize("parallelism, grad_accum_steps", [("pjit", 4), ("pmap", 2)])
def test_accumulation_inside_the_step_equals_the_unsplit_batch(unsplit, parallelism, grad_accum_steps):
  if jax.device_count() < 8:
    pytest.skip("needs 8 simulated devices (tests/conftest.py)")
  _assert_same(
    unsplit,
    _train(parallelism=parallelism, grad_accum_steps=grad_accum_steps),
    f"{parallelism}, {grad_accum_steps} micro-batches",
  )


def test_the_test_can_fail(unsplit):
  """Normalising each micro-batch by its own weights (the old rule) changes the update: the tolerance above is
  tight enough to see it."""
  original = train.step_normalisers
  try:
    # Per-micro-batch normalisers: half the batch's weights ≈ what one of two micro-batches would hold.
    train.step_normalisers = lambda batch, axis_name=None: {
      name: value * 0.5 for name, value in original(batch, axis_name).items()
    }
    with pytest.raises(AssertionError):
      _assert_same(unsplit, _train(mesh_data=-1, grad_accum_steps=2), "scaled normalisers")
  finally:
    train.step_normalisers = original


def _loss_and_grads(bert, params, batch):
  from clinical_bert_jax import losses

  def loss_fn(params):
    outputs = train._apply_model(bert, params, batch, None)
    return losses.pretraining_loss(outputs, batch)[0], outputs

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def test_scan_layers_and_remat_compute_the_same_loss_gradients_and_hidden_states():
  from clinical_bert_jax import model

  params = model.init_params(CONFIG, jax.random.key(3))
  batch = {name: jax.numpy.asarray(value) for name, value in _batch(5).items()}
  (loss, outputs), grads = _loss_and_grads(model.BertForPreTraining(CONFIG), params, batch)
  for scan_layers, remat in ((True, "none"), (False, "full"), (True, "dots")):
    bert = model.BertForPreTraining(CONFIG, scan_layers=scan_layers, remat=remat)
    (other_loss, other_outputs), other_grads = _loss_and_grads(bert, params, batch)
    what = f"scan_layers={scan_layers} remat={remat}"
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6, err_msg=what)
    np.testing.assert_allclose(other_outputs["mlm_logits"], outputs["mlm_logits"], rtol=1e-5, atol=1e-5)
    # Gradients come back in the per-layer layout (the checkpoint's), whatever the model's layout.
    assert jax.tree.structure(other_grads) == jax.tree.structure(grads), what
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=what)
  # Hidden states of every layer, scanned or not.
  scanned = model.BertForPreTraining(CONFIG, scan_layers=True)
  hidden = scanned.apply(
    {"params": model.stack_layer_params(params)}, batch["input_ids"], batch["input_mask"], output_hidden_states=True
  )["hidden_states"]
  unrolled = model.BertForPreTraining(CONFIG).apply(
    {"params": params}, batch["input_ids"], batch["input_mask"], output_hidden_states=True
  )["hidden_states"]
  assert len(hidden) == len(unrolled) == CONFIG.num_hidden_layers + 1
  for a, b in zip(unrolled, hidden):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  # The layouts convert both ways without loss.
  back = model.unstack_layer_params(model.stack_layer_params(params))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)))


def test_scan_layers_and_remat_train_like_the_unrolled_step(unsplit):
  _assert_same(unsplit, _train(mesh_data=-1, scan_layers=True, remat="dots"), "scan_layers, remat=dots")
