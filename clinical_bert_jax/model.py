"""BERT in Flax linen, numerically the same network as Google's `modeling.py` and HF's `BertForPreTraining`.

Parameter names follow the Hugging Face Flax layout (docs/ARCHITECTURE.md), so the converter is a renaming plus
transposes. Every parameter carries logical axis names; `sharding.py` maps them to mesh axes, so this file never names
a device. Parity traps handled here (bert-pretraining.md §4): exact-erf vs tanh GELU chosen by `hidden_act`,
LayerNorm epsilon 1e-12 with the two-pass variance, post-LN blocks, the MLM decoder tied to the word embeddings.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from clinical_bert_jax.config import BertConfig

Array = jax.Array
DType = Any

# Logical axis names (see sharding.LOGICAL_AXIS_RULES).
BATCH, LENGTH, EMBED = "batch", "length", "embed"
VOCAB, HEADS, MLP, EMBED_OUT = "vocab", "heads", "mlp", "embed_out"
POSITION, TOKEN_TYPE, CLASSES = "position", "token_type", "classes"
LAYERS = "layers"  # the leading [L] axis of the `scan_layers` layout's stacked layer parameters (never sharded)
ACTIVATION_AXES = (BATCH, LENGTH, EMBED)


def activation_fn(name: str) -> Callable[[Array], Array]:
  """`gelu` is the exact erf form (HF and the 2018 Google checkpoints); `gelu_new` the tanh approximation."""
  return {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
  }[name]


def _kernel_init(config: BertConfig, names: tuple[str, str]):
  # Google initialises kernels and embeddings from a truncated normal (stddev = initializer_range).
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(config.initializer_range), names)


def _zeros(names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def _dense(config: BertConfig, features: int, names: tuple[str, str], dtype: DType, name: str) -> nn.Dense:
  return nn.Dense(
    features, dtype=dtype, kernel_init=_kernel_init(config, names), bias_init=_zeros(names[1:]), name=name
  )


def _embed(config: BertConfig, rows: int, row_axis: str, dtype: DType, name: str) -> nn.Embed:
  """A [rows, H] embedding table, its rows named `row_axis` and its columns EMBED."""
  return nn.Embed(
    rows, config.hidden_size, dtype=dtype, embedding_init=_kernel_init(config, (row_axis, EMBED)), name=name
  )


def _layer_norm(config: BertConfig, dtype: DType, name: str = "LayerNorm") -> nn.LayerNorm:
  """TF-compatible LayerNorm: epsilon from the config (1e-12 for BERT) and the two-pass variance."""
  return nn.LayerNorm(
    epsilon=config.layer_norm_eps,
    dtype=dtype,
    use_fast_variance=False,
    scale_init=_ones((EMBED,)),
    bias_init=_zeros((EMBED,)),
    name=name,
  )


def _random_uint16(key: Array, shape: tuple[int, ...]) -> Array:
  """Uniform random uint16 of `shape`, four per threefry evaluation.

  `jax.random.bits` (partitionable threefry, jax's default) runs one threefry2x32 per element and folds its 64 output
  bits into one 32-bit word; dropout needs 16. The raw data of `jax.random.split(key, n)` is the full 64-bit output
  of n threefry evaluations on distinct counters, so splitting into shape[:-1] + (shape[-1] / 4,) keys and reading
  their data as uint16 gives the same kind of bits at a quarter of the cost. Depends only on the key and the shape
  (not on the device mesh).
  """
  if not shape or shape[-1] % 4:
    return jax.random.bits(key, shape, jnp.uint16)
  words = jax.random.key_data(jax.random.split(key, shape[:-1] + (shape[-1] // 4,)))  # [..., n/4, 2] uint32
  return jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(shape)  # [..., n/4, 2, 2] → [..., n]


class Dropout(nn.Module):
  """Inverted dropout with 16-bit random draws (`_random_uint16`): keep an element iff its draw is below
  t = round((1 - rate) · 2^16), scale kept elements by 2^16 / t. The keep probability is t / 2^16 (within 2^-17 of
  1 - rate) and the scale its exact inverse, so E[output] = input as with `flax.linen.Dropout`."""

  rate: float

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return inputs
    if self.rate >= 1.0:
      return jnp.zeros_like(inputs)
    threshold = round((1.0 - self.rate) * 65536)
    if threshold >= 65536:
      return inputs
    keep = _random_uint16(self.make_rng("dropout"), inputs.shape) < jnp.uint16(threshold)  # inputs.shape, bool
    return jnp.where(keep, inputs * jnp.asarray(65536 / threshold, inputs.dtype), jnp.zeros((), inputs.dtype))


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
    cfg = self.config
    word = _embed(cfg, cfg.vocab_size, VOCAB, self.dtype, "word_embeddings")
    position = _embed(cfg, cfg.max_position_embeddings, POSITION, self.dtype, "position_embeddings")
    token_type = _embed(cfg, cfg.type_vocab_size, TOKEN_TYPE, self.dtype, "token_type_embeddings")
    positions = jnp.arange(input_ids.shape[-1])[None, :]  # [1, S]
    hidden = word(input_ids) + position(positions) + token_type(token_type_ids)  # [B, S, H]
    hidden = _layer_norm(cfg, self.dtype)(hidden)  # [B, S, H]
    hidden = Dropout(cfg.hidden_dropout_prob)(hidden, deterministic=deterministic)  # [B, S, H]
    return nn.with_logical_constraint(hidden, ACTIVATION_AXES)  # [B, S, H]


class BertSelfAttention(nn.Module):
  """Multi-head self-attention. Uses `jax.nn.dot_product_attention` (fused, cuDNN on GPU) whenever no dropout is
  applied to the attention probabilities; with attention dropout in training it computes the probabilities
  explicitly, because the fused kernel has no dropout. Both paths give the same result in eval mode (tested)."""

  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    batch, length, _ = hidden.shape  # hidden: [B, S, H]
    split = lambda x: x.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)  # [B, S, H] → [B, S, N, D]
    query = split(_dense(cfg, cfg.hidden_size, (EMBED, HEADS), self.dtype, "query")(hidden))  # [B, S, N, D]
    key = split(_dense(cfg, cfg.hidden_size, (EMBED, HEADS), self.dtype, "key")(hidden))  # [B, S, N, D]
    value = split(_dense(cfg, cfg.hidden_size, (EMBED, HEADS), self.dtype, "value")(hidden))  # [B, S, N, D]
    key_mask = mask[:, None, None, :].astype(bool)  # [B, 1, 1, S]: True where the key is a real token
    if deterministic or cfg.attention_probs_dropout_prob == 0.0:
      context = jax.nn.dot_product_attention(query, key, value, mask=key_mask)  # [B, S, N, D]
    else:
      scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) / jnp.sqrt(cfg.head_dim)  # [B, N, S, S]
      scores = scores + jnp.where(key_mask, 0.0, -10000.0)  # [B, N, S, S]: Google's additive mask
      probs = jax.nn.softmax(scores, axis=-1)  # [B, N, S, S] fp32
      probs = Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=False)  # [B, N, S, S]
      context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), value)  # [B, S, N, D]
    return context.reshape(batch, length, cfg.hidden_size)  # [B, S, H]


class BertAttention(nn.Module):
  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, mask: Array, deterministic: bool) -> Array:
    context = BertSelfAttention(self.config, self.dtype, name="self")(hidden, mask, deterministic)  # [B, S, H]
    return _ResidualOutput(self.config, self.dtype, (HEADS, EMBED), name="output")(context, hidden, deterministic)


class _ResidualOutput(nn.Module):
  """dense → dropout → residual add → LayerNorm: the post-LN step shared by attention and feed-forward."""

  config: BertConfig
  dtype: DType
  kernel_names: tuple[str, str]

  @nn.compact
  def __call__(self, hidden: Array, residual: Array, deterministic: bool) -> Array:
    cfg = self.config
    hidden = _dense(cfg, cfg.hidden_size, self.kernel_names, self.dtype, "dense")(hidden)  # [B, S, H]
    hidden = Dropout(cfg.hidden_dropout_prob)(hidden, deterministic=deterministic)  # [B, S, H]
    hidden = _layer_norm(cfg, self.dtype)(hidden + residual)  # [B, S, H]
    return nn.with_logical_constraint(hidden, ACTIVATION_AXES)  # [B, S, H]


class _Intermediate(nn.Module):
  config: BertConfig
  dtype: DType

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.config
    inner = _dense(cfg, cfg.intermediate_size, (EMBED, MLP), self.dtype, "dense")(hidden)  # [B, S, I]
    return activation_fn(cfg.hidden_act)(inner)  # [B, S, I]


class BertLayer(nn.Module):
  config: BertConfig
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, hidden: Array, mask: Array, deterministic: bool) -> Array:
    attended = BertAttention(self.config, self.dtype, name="attention")(hidden, mask, deterministic)  # [B, S, H]
    inner = _Intermediate(self.config, self.dtype, name="intermediate")(attended)  # [B, S, I]
    output = _ResidualOutput(self.config, self.dtype, (MLP, EMBED), name="output")
    return output(inner, attended, deterministic)  # [B, S, H]


REMAT_POLICIES = ("none", "full", "dots")
SCANNED = "stacked"  # `encoder/layer/stacked/block/...`: the scanned layers' parameters, stacked on a leading axis


def _layer_class(remat: str, scanned: bool) -> type[nn.Module]:
  """BertLayer, or BertLayer with activation checkpointing: `full` keeps only each layer's input and recomputes the
  layer in the backward pass; `dots` also keeps the matmul outputs that have no batch dimension in the contraction
  (jax.checkpoint_policies.dots_with_no_batch_dims_saveable), so the backward pass recomputes only elementwise work
  (GELU, LayerNorm, softmax, dropout masks)."""
  if remat == "none":
    return BertLayer
  policy = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return nn.remat(BertLayer, static_argnums=(3,), policy=policy, prevent_cse=not scanned)


class BertEncoder(nn.Module):
  config: BertConfig
  dtype: DType = jnp.float32
  scan_layers: bool = False
  remat: str = "none"

  @nn.compact
  def __call__(
    self, hidden: Array, mask: Array, deterministic: bool, output_hidden_states: bool = False
  ) -> tuple[Array, tuple[Array, ...]]:
    all_hidden = (hidden,)  # [B, S, H] each: the embeddings, then every layer's output
    layers = _LayerStack(self.config, self.dtype, self.scan_layers, self.remat, name="layer")
    hidden, stacked = layers(hidden, mask, deterministic, output_hidden_states)  # [B, S, H]; L × [B, S, H] or ()
    return hidden, all_hidden + stacked


class _ScanBody(nn.Module):
  """One layer as a `nn.scan` body: (hidden, mask) → (hidden, hidden or None)."""

  config: BertConfig
  dtype: DType
  deterministic: bool
  remat: str
  output_hidden_states: bool

  @nn.compact
  def __call__(self, hidden: Array, mask: Array) -> tuple[Array, Array | None]:
    layer = _layer_class(self.remat, True)(self.config, self.dtype, name="block")
    hidden = layer(hidden, mask, self.deterministic)  # [B, S, H]
    return hidden, hidden if self.output_hidden_states else None


class _LayerStack(nn.Module):
  """Holds the layers as `layer/0 … layer/L-1` (HF's names), or with `scan_layers` as one `nn.scan` over a layer
  whose parameters are stacked on a leading axis (`layer/stacked/block/...`): XLA then compiles one layer instead of
  L. Checkpoints always hold the per-layer names: `stack_layer_params`/`unstack_layer_params` convert."""

  config: BertConfig
  dtype: DType
  scan_layers: bool = False
  remat: str = "none"

  @nn.compact
  def __call__(
    self, hidden: Array, mask: Array, deterministic: bool, output_hidden_states: bool
  ) -> tuple[Array, tuple[Array, ...]]:
    if self.scan_layers:
      scanned = nn.scan(
        _ScanBody,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,),
        length=self.config.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: LAYERS},  # logical axes (LAYERS, ...) of each stacked parameter
      )
      layers = scanned(self.config, self.dtype, deterministic, self.remat, output_hidden_states, name=SCANNED)
      hidden, stacked = layers(hidden, mask)  # [B, S, H]; stacked: [L, B, S, H] or None
      return hidden, tuple(stacked) if output_hidden_states else ()
    outputs = []
    layer_class = _layer_class(self.remat, False)
    for index in range(self.config.num_hidden_layers):
      hidden = layer_class(self.config, self.dtype, name=str(index))(hidden, mask, deterministic)  # [B, S, H]
      if output_hidden_states:
        outputs.append(hidden)
    return hidden, tuple(outputs)


def _layer_tree(params: dict[str, Any]) -> dict[str, Any]:
  return params["bert"]["encoder"]["layer"]


def _with_layer_tree(params: dict[str, Any], layers: dict[str, Any]) -> dict[str, Any]:
  return {**params, "bert": {**params["bert"], "encoder": {**params["bert"]["encoder"], "layer": layers}}}


def stack_layer_params(params: dict[str, Any]) -> dict[str, Any]:
  """Per-layer parameters (`encoder/layer/0 … L-1`, the checkpoint layout) → the `scan_layers` layout (one tree,
  arrays [L, ...]). Inside a jitted step this is a copy of the layer weights (and its transpose, a split, for the
  gradients)."""
  layers = _layer_tree(params)
  if SCANNED in layers:
    return params
  count = len(layers)
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[layers[str(index)] for index in range(count)])  # [L, ...]
  return _with_layer_tree(params, {SCANNED: {"block": stacked}})


def unstack_layer_params(params: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `stack_layer_params` (also on host numpy arrays: views, no copy)."""
  layers = _layer_tree(params)
  if SCANNED not in layers:
    return params
  stacked = layers[SCANNED]["block"]
  count = jax.tree.leaves(stacked)[0].shape[0]
  return _with_layer_tree(
    params, {str(index): jax.tree.map(lambda leaf, i=index: leaf[i], stacked) for index in range(count)}
  )


def _is_param_tree(tree: Any) -> bool:
  return isinstance(tree, Mapping) and isinstance(tree.get("bert"), Mapping) and "encoder" in tree["bert"]


def to_layer_layout(tree: Any, scan_layers: bool) -> Any:
  """`tree` with every parameter-shaped subtree (the params themselves, Adam's `mu`/`nu` inside an optimizer state)
  in the stacked `scan_layers` layout (True) or the per-layer layout of checkpoints and exports (False); leaves
  outside such subtrees (step counts, scalars) are returned as they are. Subtrees already in that layout too."""
  convert = stack_layer_params if scan_layers else unstack_layer_params
  return jax.tree.map(lambda node: convert(node) if _is_param_tree(node) else node, tree, is_leaf=_is_param_tree)


class BertModule(nn.Module):
  """The encoder with pooler (HF `BertModel`): returns the sequence output, pooled output and, on request, the
  hidden states of the embedding layer and every encoder layer."""

  config: BertConfig
  dtype: DType = jnp.float32
  scan_layers: bool = False
  remat: str = "none"

  def setup(self):
    self.embeddings = BertEmbeddings(self.config, self.dtype)
    self.encoder = BertEncoder(self.config, self.dtype, self.scan_layers, self.remat)
    self.pooler = _Pooler(self.config, self.dtype)

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    deterministic: bool = True,
    output_hidden_states: bool = False,
  ) -> dict[str, Any]:
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)  # [B, S]
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)  # [B, S]
    hidden = self.embeddings(input_ids, token_type_ids, deterministic)  # [B, S, H]
    sequence, hidden_states = self.encoder(hidden, attention_mask, deterministic, output_hidden_states)  # [B, S, H]
    outputs = {"sequence_output": sequence, "pooled_output": self.pooler(sequence)}
    if output_hidden_states:
      outputs["hidden_states"] = hidden_states
    return outputs

  def word_embedding_table(self) -> Array:
    return nn.meta.unbox(self.embeddings.variables["params"]["word_embeddings"]["embedding"])


class _Pooler(nn.Module):
  config: BertConfig
  dtype: DType

  @nn.compact
  def __call__(self, sequence: Array) -> Array:
    cfg = self.config
    first = sequence[:, 0]  # [B, H]: the [CLS] row
    return jnp.tanh(_dense(cfg, cfg.hidden_size, (EMBED, EMBED_OUT), self.dtype, "dense")(first))  # [B, H]


class _MaskedLMHead(nn.Module):
  """transform (dense → activation → LayerNorm) then logits = h·Eᵀ + bias with E the tied word embeddings."""

  config: BertConfig
  dtype: DType

  @nn.compact
  def __call__(self, hidden: Array, embedding_table: Array) -> Array:
    cfg = self.config
    hidden = _TransformHead(cfg, self.dtype, name="transform")(hidden)  # [B, P or S, H]
    bias = self.param("bias", _zeros((VOCAB,)), (cfg.vocab_size,), jnp.float32)  # [V]
    logits = jnp.einsum("...h,vh->...v", hidden, embedding_table.astype(self.dtype))  # [B, P or S, V]
    return logits.astype(jnp.float32) + bias  # [B, P or S, V] fp32


class _TransformHead(nn.Module):
  config: BertConfig
  dtype: DType

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.config
    hidden = _dense(cfg, cfg.hidden_size, (EMBED, EMBED_OUT), self.dtype, "dense")(hidden)  # [B, P or S, H]
    return _layer_norm(cfg, self.dtype)(activation_fn(cfg.hidden_act)(hidden))  # [B, P or S, H]


class _PretrainingHeads(nn.Module):
  config: BertConfig
  dtype: DType

  @nn.compact
  def __call__(self, mlm_hidden: Array, pooled: Array, embedding_table: Array) -> tuple[Array, Array]:
    mlm_logits = _MaskedLMHead(self.config, self.dtype, name="predictions")(mlm_hidden, embedding_table)  # [B, P, V]
    nsp = nn.Dense(
      2,
      dtype=self.dtype,
      kernel_init=_kernel_init(self.config, (EMBED, CLASSES)),
      bias_init=_zeros((CLASSES,)),
      name="seq_relationship",
    )
    return mlm_logits, nsp(pooled).astype(jnp.float32)  # nsp: [B, 2] fp32


class BertForPreTraining(nn.Module):
  """BERT with the masked-LM and next-sentence heads (Google `run_pretraining.py`, HF `BertForPreTraining`).

  With `masked_lm_positions` [B, P] the vocabulary projection runs only at those positions (Google's sparse head:
  6.4× smaller logits for BERT-base at P=20); without them it returns full-sequence logits [B, S, V] (fill-mask,
  evaluation). Logits are fp32 whatever the compute dtype. `scan_layers` and `remat` (REMAT_POLICIES) change how the
  encoder is compiled and differentiated, not what it computes; with `scan_layers` the parameters must be in the
  stacked layout (`stack_layer_params`).
  """

  config: BertConfig
  dtype: DType = jnp.float32
  scan_layers: bool = False
  remat: str = "none"

  def setup(self):
    self.bert = BertModule(self.config, self.dtype, self.scan_layers, self.remat)
    self.cls = _PretrainingHeads(self.config, self.dtype)

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    masked_lm_positions: Array | None = None,
    deterministic: bool = True,
    output_hidden_states: bool = False,
  ) -> dict[str, Any]:
    outputs = self.bert(input_ids, attention_mask, token_type_ids, deterministic, output_hidden_states)
    sequence = outputs["sequence_output"]  # [B, S, H]
    if masked_lm_positions is not None:
      positions = masked_lm_positions[..., None].astype(jnp.int32)  # [B, P, 1]
      mlm_hidden = jnp.take_along_axis(sequence, positions, axis=1)  # [B, P, H]
    else:
      mlm_hidden = sequence  # [B, S, H]
    mlm_logits, nsp_logits = self.cls(mlm_hidden, outputs["pooled_output"], self.bert.word_embedding_table())
    # mlm_logits: [B, P, V] (or [B, S, V] without positions); nsp_logits: [B, 2]
    return {**outputs, "mlm_logits": mlm_logits, "nsp_logits": nsp_logits}


def _dummy_inputs(config: BertConfig, batch: int = 1, length: int = 8) -> dict[str, Array]:
  length = min(length, config.max_position_embeddings)
  ids = jnp.zeros((batch, length), jnp.int32)  # [B, S]
  return {
    "input_ids": ids,
    "attention_mask": jnp.ones_like(ids),
    "token_type_ids": ids,
    "masked_lm_positions": jnp.zeros((batch, 1), jnp.int32),
  }


def _boxed_init(config: BertConfig, rng: Array, scan_layers: bool = False):
  return BertForPreTraining(config, scan_layers=scan_layers).init(rng, **_dummy_inputs(config))["params"]


def init_params(config: BertConfig, rng: Array, scan_layers: bool = False) -> dict[str, Any]:
  """Fresh fp32 parameters (Google's initialisers) as a plain pytree, without logical-axis boxes. With `scan_layers`
  the same values in the stacked layout (so a seed gives the same model whichever layout trains it)."""
  params = nn.meta.unbox(_boxed_init(config, rng))
  return stack_layer_params(params) if scan_layers else params


def param_logical_axes(config: BertConfig, scan_layers: bool = False) -> dict[str, Any]:
  """PartitionSpecs of logical axis names, one per parameter, in the same tree as `init_params` (with
  `scan_layers`: the stacked layout, each layer parameter's spec led by LAYERS)."""
  return nn.get_partition_spec(jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0), scan_layers)))


def param_shapes(config: BertConfig, scan_layers: bool = False) -> dict[str, Any]:
  """ShapeDtypeStructs of every parameter (per-layer, or with `scan_layers` stacked), computed without allocating."""
  return nn.meta.unbox(jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0), scan_layers)))
