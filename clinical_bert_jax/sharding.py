"""Device mesh and logical-axis sharding rules (MaxText style).

The model names every parameter dimension with a LOGICAL axis ('vocab', 'embed', 'heads', ...; see
`model.param_logical_axes`). `LOGICAL_AXIS_RULES` maps logical axes to the axes of a 3-D device mesh:

* `data`: pure data parallelism (parameters replicated, batch split);
* `fsdp`: fully-sharded data parallelism (batch split AND parameters/optimizer state split along 'embed');
* `tensor`: tensor (model) parallelism inside a layer ('vocab', 'heads', 'mlp', 'embed_out').

Rules are tried in table order and a mesh axis is used at most once per array, exactly like
`flax.linen.logical_to_mesh_axes`, so the same table also serves `nn.logical_axis_rules(LOGICAL_AXIS_RULES)` for
activation constraints: 'batch' comes first, so an activation ('batch', 'length', 'embed') is split by batch and its
'embed' dimension stays whole. Unlike flax's specs, ours never split a dimension that the chosen mesh axes do not
divide (vocab 28,996 over 8 devices), which jit would reject: it is replicated instead. Mesh axes of size 1 are left
out of the specs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from clinical_bert_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
MESH_FLAGS = ("--mesh_data", "--mesh_fsdp", "--mesh_tensor")

MeshAxes = str | tuple[str, ...] | None
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("mlp", "tensor"),
  ("embed_out", "tensor"),
  ("position", None),
  ("token_type", None),
  ("classes", None),
  ("layers", None),  # the leading axis of --scan_layers' stacked layer parameters: every device holds all layers
)
_RULE_TABLE = dict(LOGICAL_AXIS_RULES)


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

  One size may be -1: it takes whatever the other two leave. The sizes must use every device, because an idle
  accelerator is almost always a configuration mistake. 'tensor' is the innermost axis so that its (chattiest)
  collectives stay within a host.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = (data, fsdp, tensor)
  flags = ", ".join(f"{flag}={size}" for flag, size in zip(MESH_FLAGS, sizes))
  if any(size == 0 or size < -1 for size in sizes) or sizes.count(-1) > 1:
    raise UserError(f"mesh sizes {flags} must be positive, with at most one -1 (= use the remaining devices)")
  known = math.prod(size for size in sizes if size != -1)
  if len(devices) % known != 0 or (-1 not in sizes and known != len(devices)):
    raise UserError(
      f"mesh sizes {flags} do not fit the {len(devices)} devices: their product must equal the device count "
      "(set one of them to -1 to fill the rest)"
    )
  shape = tuple(len(devices) // known if size == -1 else size for size in sizes)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_mesh_spec(
  logical_axes: Sequence[str | None],
  shape: Sequence[int],
  mesh: Mesh,
  rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
  """The mesh PartitionSpec for an array of `shape` whose dimensions have the logical names `logical_axes`.

  Rules are applied in order; a rule is skipped when one of its mesh axes is already used by another dimension or
  when the product of its mesh-axis sizes does not divide the dimension (that dimension is then replicated).
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match the rank of shape {tuple(shape)}")
  rule_names = {name for name, _ in rules}
  named = [name for name in logical_axes if name is not None]
  unknown = sorted(set(named) - rule_names)
  if unknown or len(set(named)) != len(named):
    raise ValueError(
      f"logical axes {tuple(logical_axes)}: unknown {unknown} or repeated names; rules know {sorted(rule_names)}"
    )
  assigned: list[tuple[str, ...] | None] = [None] * len(shape)
  used: set[str] = set()
  for name, mesh_axes in rules:
    if name not in named:
      continue
    dim = list(logical_axes).index(name)
    axes = tuple(axis for axis in _as_tuple(mesh_axes) if mesh.shape[axis] > 1)
    if assigned[dim] is not None or not axes or used.intersection(axes):
      continue
    if shape[dim] % math.prod(mesh.shape[axis] for axis in axes) != 0:
      continue
    assigned[dim] = axes
    used.update(axes)
  return PartitionSpec(*(axes[0] if axes and len(axes) == 1 else axes for axes in assigned))


def param_shardings(mesh: Mesh, logical_specs: Any, param_shapes: Any) -> Any:
  """A pytree of NamedSharding for the params, from the model's logical specs and the params' shapes.

  `logical_specs` is `model.param_logical_axes(config)` (PartitionSpecs of logical names); `param_shapes` is any
  pytree of the same structure whose leaves have `.shape` (the params or `jax.eval_shape(init_params, ...)`). Shapes
  are needed because non-divisible dimensions fall back to replication.
  """
  return jax.tree.map(
    lambda leaf, logical: NamedSharding(mesh, logical_to_mesh_spec(tuple(logical), leaf.shape, mesh)),
    param_shapes,
    logical_specs,
  )


def mirror_param_shardings(tree: Any, param_shapes: Any, shardings_of_params: Any, mesh: Mesh) -> Any:
  """Shardings for a pytree that embeds params-shaped subtrees, e.g. an optimizer state.

  A leaf whose path ends with a parameter's path (`.../mu/bert/encoder/...`) and has that parameter's shape gets the
  parameter's sharding, so Adam moments and gradient accumulators are split exactly like the weights under FSDP;
  every other leaf (step counters, scalars) is replicated. Needed because XLA may replicate freshly created zeros.
  `shardings_of_params` is the output of `param_shardings`; `tree` may hold arrays or ShapeDtypeStructs.
  """
  by_path = {}
  for (key_path, leaf), sharding in zip(
    jax.tree_util.tree_flatten_with_path(param_shapes)[0], jax.tree.leaves(shardings_of_params)
  ):
    by_path[_dict_keys(key_path)] = (tuple(leaf.shape), sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(key_path: tuple[Any, ...], leaf: Any) -> NamedSharding:
    keys = _dict_keys(key_path)
    for start in range(len(keys)):  # longest suffix first: the parameter path below any wrapping dict keys
      shape_and_sharding = by_path.get(keys[start:])
      if shape_and_sharding is not None:
        shape, sharding = shape_and_sharding
        return sharding if shape == tuple(np.shape(leaf)) else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding for [global_batch, ...] arrays: rows split over ('data', 'fsdp'), other dimensions whole."""
  return NamedSharding(mesh, PartitionSpec(_RULE_TABLE["batch"]))


def host_local_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global jax.Arrays sharded by `batch_sharding`.

  Every process passes the rows it loaded (its share of the global batch, in process order); with one process the
  local batch is the global batch.
  """
  row_counts = {np.shape(array)[0] if np.ndim(array) else None for array in batch.values()}
  if len(row_counts) != 1 or None in row_counts:
    raise ValueError(f"batch arrays must all have the same leading (row) dimension, got {sorted(map(str, row_counts))}")
  local_rows = row_counts.pop()
  local_shards = _local_batch_shard_count(mesh)
  if local_rows % local_shards != 0:
    data_times_fsdp = mesh.shape["data"] * mesh.shape["fsdp"]
    raise UserError(
      f"the per-process batch of {local_rows} rows cannot be split over this process's {local_shards} batch shards: "
      f"make the global batch size a multiple of --mesh_data × --mesh_fsdp = {data_times_fsdp}"
    )
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(array)) for name, array in batch.items()}


def _local_batch_shard_count(mesh: Mesh) -> int:
  """How many distinct (data, fsdp) coordinates this process's devices occupy: the splits of its local rows."""
  this_process = jax.process_index()
  batch_dims = [mesh.axis_names.index(axis) for axis in _RULE_TABLE["batch"]]
  coordinates = {
    tuple(index[dim] for dim in batch_dims)
    for index, device in np.ndenumerate(mesh.devices)
    if device.process_index == this_process
  }
  return len(coordinates)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _dict_keys(key_path: tuple[Any, ...]) -> tuple[str, ...]:
  """The trailing run of dict keys of a pytree path: where a parameter path sits inside an optimizer-state entry."""
  keys: list[str] = []
  for key in reversed(key_path):
    if not isinstance(key, jax.tree_util.DictKey):
      break
    keys.append(str(key.key))
  return tuple(reversed(keys))
