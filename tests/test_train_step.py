"""The jitted train step (train.train_step through train.make_runtime, as `pretrain` runs it): gradient accumulation
inside the step gives the unsplit batch's update within fp32 rounding, under pjit and pmap, because every
micro-batch's loss is divided by the WHOLE batch's Σ weights (not its own). The batch's MLM weights are deliberately
uneven across micro-batches, so per-micro-batch normalisation (the old optax.MultiSteps way) would fail this test.
`--scan_layers` (the train state stacked [L, ...]) trains the same model as the per-layer layout, with each optimizer,
under pjit (also FSDP) and pmap, and its checkpoints resume in either layout.

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


def _runtime(**changes) -> train.PjitRuntime | train.PmapRuntime:
  cfg = train.TrainConfig(
    **{
      "num_train_steps": 10,
      "num_warmup_steps": 1,
      "learning_rate": 1e-2,
      "train_batch_size": BATCH,
      "max_predictions_per_seq": PREDICTIONS,
      "optimizer": "bert_adam",
      **changes,
    }
  )
  cfg.validate()
  return train.make_runtime(cfg, CONFIG, train.make_train_optimizer(cfg), None, None, jax.random.key_data(KEYS[2]))


KEYS = jax.random.split(jax.random.key(7), 3)


def _steps(runtime, state, steps) -> tuple[list[dict], train.TrainState]:
  stats = []
  for step in steps:
    state, values = runtime.train_step(state, runtime.put_batch(_batch(step)))
    stats.append({name: float(value) for name, value in runtime.host_values(values).items()})
  return stats, state


def _train(**changes) -> tuple[list[dict], dict]:
  runtime = _runtime(**changes)
  state = runtime.init_state(None, KEYS[0], np.asarray(jax.random.key_data(KEYS[1])))
  stats, state = _steps(runtime, state, range(STEPS))
  return stats, runtime.host_params(state)


@pytest.fixture(scope="module")
def unsplit():
  return _train(mesh_data=-1)


def _assert_same(left: tuple[list[dict], dict], right: tuple[list[dict], dict], what: str) -> None:
  assert jax.tree.structure(left[1]) == jax.tree.structure(right[1]), what  # per-layer names, whatever the layout
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
    layout_params = model.to_layer_layout(params, scan_layers)
    (other_loss, other_outputs), other_grads = _loss_and_grads(bert, layout_params, batch)
    what = f"scan_layers={scan_layers} remat={remat}"
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6, err_msg=what)
    np.testing.assert_allclose(other_outputs["mlm_logits"], outputs["mlm_logits"], rtol=1e-5, atol=1e-5)
    # Gradients come in the model's layout (stacked [L, ...] when scanned); per-layer they are the unrolled ones.
    assert jax.tree.structure(other_grads) == jax.tree.structure(layout_params), what
    other_grads = model.to_layer_layout(other_grads, False)
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


@pytest.fixture(scope="module")
def unrolled_lamb():
  return _train(optimizer="lamb")


def test_scan_layers_train_like_the_unrolled_step_with_adamw_and_dp_clipping():
  """AdamW's moments stacked, and DP-SGD's per-example clipping (a global norm per example) in the stacked layout
  (noise off: its draws are per leaf, so a noisy run differs between layouts in its random numbers only)."""
  private = {"optimizer": "adamw", "dp_l2_clip": 0.05}
  _assert_same(_train(**private), _train(**private, scan_layers=True), "adamw, DP clipping, scan_layers")


def test_scan_layers_train_like_the_unrolled_step_with_lamb_and_fsdp(unrolled_lamb):
  """LAMB's trust ratio is taken per layer of a stacked leaf, so the trajectory is the per-layer one; the stacked
  state is also sharded with FSDP here (the layer axis whole, 'embed' split)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 simulated devices (tests/conftest.py)")
  _assert_same(unrolled_lamb, _train(optimizer="lamb", scan_layers=True, mesh_fsdp=2), "lamb, scan_layers, fsdp")


def test_lamb_trust_ratio_per_layer_is_needed(unrolled_lamb):
  """The test above can fail: one trust ratio over the whole stacked tensor (optax's scale_by_trust_ratio) moves the
  layers differently from the per-layer run."""
  from clinical_bert_jax import optimizers

  original = optimizers.is_stacked_layer_param
  try:
    optimizers.is_stacked_layer_param = lambda path: False
    with pytest.raises(AssertionError):
      _assert_same(unrolled_lamb, _train(optimizer="lamb", scan_layers=True), "lamb, whole-tensor ratio")
  finally:
    optimizers.is_stacked_layer_param = original


def test_scan_layers_state_is_stacked_and_its_layer_axis_never_sharded():
  from jax.sharding import PartitionSpec as P

  from clinical_bert_jax import model

  if jax.device_count() < 8:
    pytest.skip("needs 8 simulated devices (tests/conftest.py)")
  runtime = _runtime(scan_layers=True, mesh_fsdp=2, mesh_tensor=2)
  unrolled = _runtime(mesh_fsdp=2, mesh_tensor=2)
  layers = runtime.param_sharding["bert"]["encoder"]["layer"]
  assert list(layers) == [model.SCANNED]
  per_layer = unrolled.param_sharding["bert"]["encoder"]["layer"]["0"]
  stacked = layers[model.SCANNED]["block"]
  assert jax.tree.structure(stacked) == jax.tree.structure(per_layer)
  for path, where in jax.tree_util.tree_leaves_with_path(stacked):
    one = per_layer
    for key in path:
      one = one[key.key]
    assert where.spec == P(None, *one.spec), path  # [L] whole, the rest as in the per-layer layout
  assert any("fsdp" in str(where.spec) for where in jax.tree.leaves(stacked))
  # Adam's moments (mu, nu) are placed like the stacked params; checkpoints stay per-layer.
  names = lambda path: "/".join(str(getattr(key, "key", "")) for key in path)
  specs = {names(path): where.spec for path, where in jax.tree_util.tree_leaves_with_path(stacked)}
  moments = [
    (names(path).split("/block/")[1], where.spec)
    for path, where in jax.tree_util.tree_leaves_with_path(runtime.opt_sharding)
    if "/block/" in names(path)
  ]
  assert sorted(moments) == sorted(list(specs.items()) * 2)
  assert jax.tree.structure(runtime.abstract_checkpoint()) == jax.tree.structure(unrolled.abstract_checkpoint())
  # A warm start from per-layer params (pretrain --init_checkpoint) is stacked and placed; host_params unstacks.
  params = model.init_params(CONFIG, jax.random.key(11))
  state = runtime.init_state(params, KEYS[0], np.asarray(jax.random.key_data(KEYS[1])))
  assert jax.tree.map(lambda leaf: leaf.sharding, state.params) == runtime.param_sharding
  assert state.params["bert"]["encoder"]["layer"][model.SCANNED]["block"]["output"]["dense"]["kernel"].shape == (
    CONFIG.num_hidden_layers,
    CONFIG.intermediate_size,
    CONFIG.hidden_size,
  )
  back = runtime.host_params(state)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)))


@pytest.mark.parametrize(
  "first, second",
  [
    ({"scan_layers": True}, {}),
    ({}, {"scan_layers": True, "parallelism": "pmap"}),
  ],
  ids=["scanned-to-unrolled", "unrolled-to-scanned-pmap"],
)
def test_checkpoints_resume_across_layouts(unsplit, tmp_path, first, second):
  """A step in one layout, a checkpoint (per-layer names on disk), the next step in the other layout: the same
  trajectory as two uninterrupted steps (params, optimizer moments, step and RNG all carried over)."""
  from clinical_bert_jax import checkpointing

  if jax.device_count() < 8:
    pytest.skip("needs 8 simulated devices (tests/conftest.py)")
  runtime = _runtime(**first)
  state = runtime.init_state(None, KEYS[0], np.asarray(jax.random.key_data(KEYS[1])))
  stats, state = _steps(runtime, state, [0])
  store = checkpointing.CheckpointStore(tmp_path, keep=2, async_save=False)
  params, items = runtime.checkpoint_items(state)
  assert "0" in params["bert"]["encoder"]["layer"]
  store.save(1, params, items, data_state={})
  store.close()
  resumed = _runtime(**second)
  store = checkpointing.CheckpointStore(tmp_path, keep=2, async_save=False)
  restored = store.restore_latest(*resumed.abstract_checkpoint())
  store.close()
  more, state = _steps(resumed, resumed.state_from_checkpoint(restored), [1])
  _assert_same(unsplit, (stats + more, resumed.host_params(state)), f"{first} → {second}")
