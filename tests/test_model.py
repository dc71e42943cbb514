"""The Flax BERT is the same network as transformers' BertForPreTraining (fp32, eval mode, padded batch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from clinical_bert_jax import losses, model, model_io, weight_names
from clinical_bert_jax.config import BertConfig

pytestmark = pytest.mark.slow  # PyTorch/transformers model oracle

TOLERANCE = 1e-4


def tiny_hf_config(hidden_act: str) -> transformers.BertConfig:
  return transformers.BertConfig(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_act=hidden_act,
  )


def padded_batch(rng: np.random.Generator, vocab_size: int, batch: int = 3, length: int = 16):
  ids = rng.integers(1, vocab_size, size=(batch, length))
  lengths = np.array([length, length - 5, 7])[:batch]
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
  ids = ids * mask
  segments = ((np.arange(length)[None, :] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int64)
  positions = np.stack([rng.choice(n, size=4, replace=False) for n in lengths])
  return ids, mask, segments, positions


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_matches_pytorch_bert_for_pretraining(hidden_act):
  torch.manual_seed(0)
  torch_model = transformers.BertForPreTraining(tiny_hf_config(hidden_act)).eval()
  # Random non-zero heads so the test sees biases and LayerNorm parameters, not their zero/one initial values.
  with torch.no_grad():
    for parameter in torch_model.parameters():
      parameter.add_(torch.randn_like(parameter) * 0.05)
  state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  config = BertConfig.from_dict(torch_model.config.to_dict())
  params, report = weight_names.params_from_named_arrays(state, model_io._fresh_reference(config), "pt", "test")
  assert report["initialised"] == []

  ids, mask, segments, positions = padded_batch(np.random.default_rng(0), config.vocab_size)
  with torch.no_grad():
    theirs = torch_model(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      token_type_ids=torch.tensor(segments),
      output_hidden_states=True,
    )
  ours = model.BertForPreTraining(config).apply(
    {"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(segments)
  )
  gathered = model.BertForPreTraining(config).apply(
    {"params": params},
    jnp.asarray(ids),
    jnp.asarray(mask),
    jnp.asarray(segments),
    masked_lm_positions=jnp.asarray(positions),
  )
  real = mask.astype(bool)
  sequence_theirs = theirs.hidden_states[-1].numpy()
  np.testing.assert_allclose(np.asarray(ours["sequence_output"])[real], sequence_theirs[real], atol=TOLERANCE)
  np.testing.assert_allclose(
    np.asarray(ours["mlm_logits"])[real], theirs.prediction_logits.numpy()[real], atol=TOLERANCE
  )
  np.testing.assert_allclose(np.asarray(ours["nsp_logits"]), theirs.seq_relationship_logits.numpy(), atol=TOLERANCE)
  expected_gathered = np.take_along_axis(theirs.prediction_logits.numpy(), positions[..., None], axis=1)
  np.testing.assert_allclose(np.asarray(gathered["mlm_logits"]), expected_gathered, atol=TOLERANCE)
  pooled_theirs = torch_model.bert.pooler(theirs.hidden_states[-1]).detach().numpy()
  np.testing.assert_allclose(np.asarray(ours["pooled_output"]), pooled_theirs, atol=TOLERANCE)


def test_gelu_variants_differ():
  """Guards against silently using one GELU for both names (flax's default is the tanh form)."""
  x = jnp.linspace(-4, 4, 101)
  difference = jnp.max(jnp.abs(model.activation_fn("gelu")(x) - model.activation_fn("gelu_new")(x)))
  assert 1e-4 < float(difference) < 1e-3


def test_fused_and_explicit_attention_agree():
  """The explicit path (used for attention dropout) equals jax.nn.dot_product_attention when dropout is off."""
  config = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    attention_probs_dropout_prob=1e-9,
    hidden_dropout_prob=0.0,
  )
  params = model.init_params(config, jax.random.key(0))
  ids = jnp.arange(24).reshape(2, 12) % 50
  mask = jnp.array([[1] * 12, [1] * 6 + [0] * 6])
  bert = model.BertForPreTraining(config)
  fused = bert.apply({"params": params}, ids, mask)
  explicit = bert.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_allclose(
    np.asarray(explicit["sequence_output"])[mask == 1], np.asarray(fused["sequence_output"])[mask == 1], atol=1e-5
  )


def test_every_parameter_has_logical_axes():
  config = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
  )
  shapes = weight_names.flatten_params(jax.tree.map(lambda s: np.zeros(s.shape), model.param_shapes(config)))
  specs = weight_names.flatten_params(
    jax.tree.map(
      lambda s: np.array(tuple(s), dtype=object),
      model.param_logical_axes(config),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
  )
  assert shapes.keys() == specs.keys()
  for name, value in shapes.items():
    axes = tuple(specs[name])
    assert len(axes) == value.ndim and all(isinstance(a, str) for a in axes), name


def test_bf16_compute_keeps_fp32_params_and_logits():
  config = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
  )
  params = model.init_params(config, jax.random.key(0))
  ids = jnp.ones((2, 8), jnp.int32)
  out32 = model.BertForPreTraining(config).apply({"params": params}, ids)
  out16 = model.BertForPreTraining(config, dtype=jnp.bfloat16).apply({"params": params}, ids)
  assert out16["sequence_output"].dtype == jnp.bfloat16
  assert out16["mlm_logits"].dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  assert float(jnp.max(jnp.abs(out16["mlm_logits"] - out32["mlm_logits"]))) < 0.1


def test_losses_follow_google_formulas():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=(2, 3))
  weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  nsp_logits = rng.normal(size=(2, 2)).astype(np.float32)
  nsp_labels = np.array([0, 1])
  loss, metrics = losses.pretraining_loss(
    {"mlm_logits": logits, "nsp_logits": nsp_logits},
    {"masked_lm_ids": labels, "masked_lm_weights": weights, "next_sentence_labels": nsp_labels},
  )
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
  mlm = (weights * nll).sum() / (weights.sum() + 1e-5)
  nsp_log_probs = nsp_logits - np.log(np.exp(nsp_logits).sum(-1, keepdims=True))
  nsp = -nsp_log_probs[np.arange(2), nsp_labels].mean()
  np.testing.assert_allclose(float(metrics["mlm_loss"]), mlm, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["nsp_loss"]), nsp, rtol=1e-5)
  np.testing.assert_allclose(float(loss), mlm + nsp, rtol=1e-5)
  accuracy = ((logits.argmax(-1) == labels) * weights).sum() / weights.sum()
  np.testing.assert_allclose(float(metrics["mlm_accuracy"]), accuracy, rtol=1e-5)


def test_dropout_keeps_the_expected_fraction_and_the_mean():
  """model.Dropout draws 16-bit numbers four per threefry call: check rate, unbiasedness, independence of draws."""
  inputs = jnp.ones((64, 128, 128), jnp.float32)  # 1M elements: the kept fraction has a std of 3e-4
  dropout = model.Dropout(0.1)
  outputs = [dropout.apply({}, inputs, deterministic=False, rngs={"dropout": jax.random.key(seed)}) for seed in (0, 1)]
  for out in outputs:
    kept = np.asarray(out) != 0
    assert abs(kept.mean() - 0.9) < 2e-3
    np.testing.assert_allclose(np.asarray(out).mean(), 1.0, atol=3e-3)  # scaled by 1 / keep probability
  first, second = (np.asarray(out) != 0 for out in outputs)
  assert abs((first & second).mean() - 0.81) < 3e-3  # two keys: independent masks
  # Neighbouring elements (which share a threefry word) are independent too.
  assert abs((first[..., 0::4] & first[..., 1::4]).mean() - 0.81) < 5e-3
  bits = np.asarray(model._random_uint16(jax.random.key(2), (256, 1024))).astype(np.int64)
  counts = np.bincount((bits >> 12).ravel(), minlength=16)  # top 4 bits: uniform (chi-square, 15 dof, p ≈ 1e-6 cut-off)
  assert ((counts - bits.size / 16) ** 2 / (bits.size / 16)).sum() < 50
  assert dropout.apply({}, inputs, deterministic=True) is inputs
