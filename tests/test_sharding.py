"""Mesh construction, logical-axis rules, parameter/batch placement on 8 simulated CPU devices (tests/conftest.py sets
XLA_FLAGS), and multi-process batch assembly."""

import os
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from clinical_bert_jax import losses, model, optimizers, sharding
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError
from cli_util import XLA_TEST_FLAG

# The ClinicalBERT vocabulary size: 4 × 7,249, so it divides 2- and 4-way splits but not 8-way.
VOCAB = 28_996
TINY = BertConfig(
  vocab_size=VOCAB,
  hidden_size=32,
  num_hidden_layers=1,
  num_attention_heads=4,
  intermediate_size=64,
  max_position_embeddings=32,
)


@pytest.mark.parametrize(
  "sizes, shape",
  [
    ((2, 2, 2), (2, 2, 2)),
    ((-1, 1, 1), (8, 1, 1)),
    ((1, -1, 2), (1, 4, 2)),
    ((2, 4, -1), (2, 4, 1)),
    ((1, 8, 1), (1, 8, 1)),
  ],
)
def test_make_mesh_shapes(sizes, shape):
  mesh = sharding.make_mesh(*sizes)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == shape
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_make_mesh_on_a_subset_of_devices():
  mesh = sharding.make_mesh(2, -1, 1, devices=jax.devices()[:4])
  assert tuple(mesh.shape.values()) == (2, 2, 1) and mesh.devices.size == 4


@pytest.mark.parametrize("sizes", [(3, 1, 1), (2, 2, 1), (-1, 3, 1), (-1, -1, 2), (0, 8, 1), (-2, 4, 1)])
def test_make_mesh_rejects_sizes_that_do_not_fit_and_names_the_flags(sizes):
  with pytest.raises(UserError, match="--mesh_data=.*--mesh_fsdp=.*--mesh_tensor="):
    sharding.make_mesh(*sizes)


def test_indivisible_dimension_falls_back_to_replication():
  eight_way_tensor = sharding.make_mesh(1, 1, 8)
  assert sharding.logical_to_mesh_spec(("vocab", "embed"), (VOCAB, 32), eight_way_tensor) == P(None, None)
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), (32, 64), eight_way_tensor) == P(None, "tensor")
  four_way_tensor = sharding.make_mesh(1, 2, 4)
  assert sharding.logical_to_mesh_spec(("vocab", "embed"), (VOCAB, 32), four_way_tensor) == P("tensor", "fsdp")
  # A mesh axis is used once per array: the square pooler kernel puts its second dim on 'tensor', not 'fsdp' again.
  assert sharding.logical_to_mesh_spec(("embed", "embed_out"), (32, 32), four_way_tensor) == P("fsdp", "tensor")


def test_rules_work_as_flax_logical_axis_rules_for_activations():
  # 'batch' takes ('data', 'fsdp') first, so an activation's 'embed' dimension stays whole, in flax and here alike.
  assert nn.logical_to_mesh_axes(model.ACTIVATION_AXES, sharding.LOGICAL_AXIS_RULES) == P(("data", "fsdp"), None, None)
  mesh = sharding.make_mesh(2, 2, 2)
  assert sharding.logical_to_mesh_spec(model.ACTIVATION_AXES, (8, 16, 32), mesh) == P(("data", "fsdp"), None, None)


def test_unknown_logical_axis_is_a_programming_error():
  with pytest.raises(ValueError, match="unknown"):
    sharding.logical_to_mesh_spec(("embedding",), (32,), sharding.make_mesh(1, 8, 1))


def zeros_like_shapes(shapes):
  """Host arrays for the parameter shapes: placement does not depend on the values, and skipping the model's init
  keeps the test fast."""
  return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)


def expected_shard_shape(shape, logical_axes, mesh_shape: dict) -> tuple[int, ...]:
  """Independent statement of the FSDP/tensor layout for the tiny model: 'embed' split over fsdp; 'vocab', 'heads',
  'mlp', 'embed_out' over tensor; a split that does not divide the dimension is skipped."""
  axis_of = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "mlp": "tensor", "embed_out": "tensor"}
  result = []
  for size, name in zip(shape, logical_axes):
    ways = mesh_shape.get(axis_of.get(name), 1)
    result.append(size // ways if size % ways == 0 else size)
  return tuple(result)


@pytest.mark.parametrize("sizes", [(1, 8, 1), (1, 2, 4), (2, 1, 4), (1, 1, 8)])
def test_model_params_are_placed_with_the_expected_shard_shapes(sizes):
  mesh = sharding.make_mesh(*sizes)
  shapes = model.param_shapes(TINY)
  logical = model.param_logical_axes(TINY)
  shardings = sharding.param_shardings(mesh, logical, shapes)
  params = jax.device_put(zeros_like_shapes(shapes), shardings)
  flat_logical = {
    optimizers.flat_param_path(path): tuple(spec)
    for path, spec in jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, P))[0]
  }
  for path, array in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = optimizers.flat_param_path(path)
    expected = expected_shard_shape(array.shape, flat_logical[name], dict(mesh.shape))
    assert {shard.data.shape for shard in array.addressable_shards} == {expected}, name
  word_embeddings = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  assert word_embeddings.addressable_shards[0].data.shape[0] == (
    VOCAB if mesh.shape["tensor"] == 8 else VOCAB // mesh.shape["tensor"]
  )


def test_optimizer_state_is_sharded_like_the_params():
  mesh = sharding.make_mesh(1, 8, 1)
  shapes = model.param_shapes(TINY)
  param_shardings = sharding.param_shardings(mesh, model.param_logical_axes(TINY), shapes)
  tx = optimizers.make_optimizer("bert_adam", 1e-4, 10, 1, grad_accum_steps=2)
  state_shardings = sharding.mirror_param_shardings(jax.eval_shape(tx.init, shapes), shapes, param_shardings, mesh)
  params = jax.device_put(zeros_like_shapes(shapes), param_shardings)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  mu = optax.tree_utils.tree_get(state, "mu")
  acc_grads = optax.tree_utils.tree_get(state, "acc_grads")
  for moments in (mu, acc_grads):
    for param, moment in zip(jax.tree.leaves(params), jax.tree.leaves(moments)):
      assert moment.sharding.is_equivalent_to(param.sharding, param.ndim)
  kernel = mu["bert"]["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (32 // 8, 64)
  assert optax.tree_utils.tree_get(state, "mini_step").sharding.is_fully_replicated


def test_batch_sharding_splits_rows_over_data_and_fsdp():
  mesh = sharding.make_mesh(2, 2, 2)
  rows = np.arange(16 * 3).reshape(16, 3)
  batch = sharding.host_local_to_global({"input_ids": rows, "next_sentence_labels": np.arange(16)}, mesh)
  assert batch["input_ids"].shape == (16, 3)
  np.testing.assert_array_equal(np.asarray(batch["input_ids"]), rows)
  for shard in batch["input_ids"].addressable_shards:
    assert shard.data.shape == (4, 3)  # 16 rows over data × fsdp = 4; the 'tensor' pairs hold the same rows
  row_blocks = {shard.index[0].start for shard in batch["next_sentence_labels"].addressable_shards}
  assert row_blocks == {0, 4, 8, 12}
  assert batch["input_ids"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)


def test_batch_not_divisible_by_data_times_fsdp_is_a_user_error():
  with pytest.raises(UserError, match="multiple of --mesh_data × --mesh_fsdp = 4"):
    sharding.host_local_to_global({"input_ids": np.zeros((6, 3), np.int32)}, sharding.make_mesh(2, 2, 2))


def test_sharded_forward_pass_equals_the_single_device_one():
  """Params placed by the FSDP+tensor rules, the batch split by rows, activations constrained through the same rule
  table: the jitted model outputs and loss equal the single-device ones. (Forward only keeps the test fast; the
  train loop's tests cover sharded gradients and updates.)"""
  config = TINY.replace(vocab_size=96)
  rng = np.random.default_rng(0)
  batch = {
    "input_ids": rng.integers(1, 96, (8, 16)),
    "input_mask": np.ones((8, 16), np.int32),
    "segment_ids": np.zeros((8, 16), np.int32),
    "masked_lm_positions": rng.integers(1, 16, (8, 3)),
    "masked_lm_ids": rng.integers(1, 96, (8, 3)),
    "masked_lm_weights": np.ones((8, 3), np.float32),
    "next_sentence_labels": rng.integers(0, 2, (8,)),
  }
  # Random values from the shapes instead of model.init_params: the same test, seconds faster on CPU.
  params = jax.tree.map(lambda leaf: rng.normal(0.0, 0.2, leaf.shape).astype(np.float32), model.param_shapes(config))
  module = model.BertForPreTraining(config)

  def forward(params, batch):
    outputs = module.apply(
      {"params": params}, batch["input_ids"], batch["input_mask"], batch["segment_ids"], batch["masked_lm_positions"]
    )
    return losses.pretraining_loss(outputs, batch)[0], outputs["mlm_logits"], outputs["nsp_logits"]

  expected = jax.jit(forward)(params, batch)

  mesh = sharding.make_mesh(2, 2, 2)
  shardings = sharding.param_shardings(mesh, model.param_logical_axes(config), params)
  arguments = (jax.device_put(params, shardings), sharding.host_local_to_global(batch, mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    lowered = jax.jit(forward).lower(*arguments)
  assert "sharding_constraint" in lowered.as_text()  # the model's activation constraints were applied, not skipped
  actual = lowered.compile()(*arguments)
  for value, reference in zip(actual, expected):
    np.testing.assert_allclose(np.asarray(value), np.asarray(reference), rtol=1e-5, atol=1e-5)
  assert actual[1].sharding.shard_shape(actual[1].shape)[0] == 8 // 4  # logits rows split over data × fsdp


MULTI_PROCESS_WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, process_id = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                               local_device_ids=[0, 1])
    from clinical_bert_jax import sharding
    mesh = sharding.make_mesh(-1, 2, 1)  # 2 × 2 devices over 2 processes: data spans the processes
    local_rows = np.arange(4) + 4 * process_id  # process 0 loaded rows 0-3, process 1 rows 4-7
    batch = sharding.host_local_to_global({"ids": local_rows[:, None] * np.ones((1, 5), np.int64)}, mesh)
    assert batch["ids"].shape == (8, 5), batch["ids"].shape
    total = jax.jit(lambda ids: ids.sum(axis=1).sum())(batch["ids"])  # a cross-process reduction
    assert int(total) == 5 * sum(range(8)), int(total)
    starts = sorted(shard.index[0].start for shard in batch["ids"].addressable_shards)
    assert starts == [4 * process_id, 4 * process_id + 2], starts
    print("ok")
""")


@pytest.mark.slow  # two JAX processes
def test_host_local_to_global_across_two_processes(tmp_path):
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {XLA_TEST_FLAG}"}
  script = tmp_path / "worker.py"
  script.write_text(MULTI_PROCESS_WORKER)
  workers = [
    subprocess.Popen(
      [sys.executable, str(script), str(port), str(index)],
      env=env,
      cwd=tmp_path,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for index in range(2)
  ]
  outputs = [worker.communicate(timeout=120)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0 and output.strip().endswith("ok"), output[-2000:]
