"""Model parity against independent implementations at 1e-5 on fp32 logits.

* Google's TensorFlow BERT: a small BERT with pretraining heads built by bert-tensorflow's own `modeling.py` and
  `run_pretraining.py` (`get_masked_lm_output`, `get_next_sentence_output`: the `cls/predictions` and
  `cls/seq_relationship` variables exactly as Google creates them), saved as a real TF checkpoint, read by
  `convert from_tf`, and compared with TensorFlow's own forward pass and losses.
* transformers' `BertForPreTraining` for both GELU variants, and each variant against the other, which must fail:
  the tolerance is tight enough to tell the erf GELU from the tanh one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from clinical_bert_jax import losses, model, model_io, weight_names
from clinical_bert_jax.config import BertConfig
from tests.cli_util import run_module

pytestmark = pytest.mark.slow  # TF/PyTorch model oracles


TOLERANCE = 1e-5
TF_CONFIG = {
  "vocab_size": 61,
  "hidden_size": 32,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "intermediate_size": 64,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1,
  "attention_probs_dropout_prob": 0.1,
  "max_position_embeddings": 32,
  "type_vocab_size": 2,
  "initializer_range": 0.02,
}

# Runs in a child process: bert-tensorflow 1.0.4 imports `tensorflow.contrib` (gone in TF 2) for its layer norm,
# and calls `tf.layers.dense` (gone with Keras 3). The two stand-ins below create the same variables
# (`LayerNorm/gamma|beta`, `<name or dense>/kernel|bias`) and compute what contrib/tf.layers computed
# (contrib's layer_norm: variance epsilon 1e-12); everything else is Google's code.
TF_BUILDER = textwrap.dedent('''
    import json, sys, types
    import numpy as np
    import tensorflow.compat.v1 as tf
    tf.disable_eager_execution()

    def layer_norm(inputs, begin_norm_axis=-1, begin_params_axis=-1, scope=None):
      with tf.variable_scope(scope, default_name="LayerNorm"):
        depth = inputs.shape[-1]
        beta = tf.get_variable("beta", [depth], initializer=tf.zeros_initializer())
        gamma = tf.get_variable("gamma", [depth], initializer=tf.ones_initializer())
        mean, variance = tf.nn.moments(inputs, [-1], keepdims=True)
        return tf.nn.batch_normalization(inputs, mean, variance, beta, gamma, 1e-12)

    def dense(inputs, units, activation=None, name=None, kernel_initializer=None):
      with tf.variable_scope(name, default_name="dense"):
        kernel = tf.get_variable("kernel", [inputs.shape[-1], units], initializer=kernel_initializer)
        bias = tf.get_variable("bias", [units], initializer=tf.zeros_initializer())
        outputs = tf.matmul(inputs, kernel) + bias
        return activation(outputs) if activation is not None else outputs

    contrib = types.ModuleType("tensorflow.contrib")
    contrib.layers = types.SimpleNamespace(layer_norm=layer_norm)
    sys.modules["tensorflow.contrib"] = contrib
    tf.layers = types.SimpleNamespace(dense=dense)
    from bert import modeling, run_pretraining

    config_file, prefix, inputs_file, outputs_file = sys.argv[1:5]
    config = modeling.BertConfig.from_json_file(config_file)
    inputs = dict(np.load(inputs_file))
    with tf.Graph().as_default():
      tf.set_random_seed(0)
      bert = modeling.BertModel(config, is_training=False, input_ids=tf.constant(inputs["input_ids"]),
                                input_mask=tf.constant(inputs["input_mask"]),
                                token_type_ids=tf.constant(inputs["segment_ids"]), use_one_hot_embeddings=False)
      mlm_loss, _, mlm_log_probs = run_pretraining.get_masked_lm_output(
          config, bert.get_sequence_output(), bert.get_embedding_table(), tf.constant(inputs["masked_lm_positions"]),
          tf.constant(inputs["masked_lm_ids"]), tf.constant(inputs["masked_lm_weights"]))
      nsp_loss, _, nsp_log_probs = run_pretraining.get_next_sentence_output(
          config, bert.get_pooled_output(), tf.constant(inputs["next_sentence_labels"]))
      rng = np.random.default_rng(1)
      perturb = [v.assign_add(tf.constant(rng.normal(size=v.shape.as_list()).astype(np.float32) * 0.05))
                 for v in tf.trainable_variables()]  # non-zero biases, non-unit LayerNorm scales
      saver = tf.train.Saver()
      with tf.Session() as session:
        session.run(tf.global_variables_initializer())
        session.run(perturb)
        saver.save(session, prefix, write_meta_graph=False)
        names = [v.name.split(":")[0] for v in tf.trainable_variables()]
        values = session.run({"mlm_log_probs": mlm_log_probs, "nsp_log_probs": nsp_log_probs,
                              "sequence_output": bert.get_sequence_output(), "mlm_loss": mlm_loss,
                              "nsp_loss": nsp_loss})
    np.savez(outputs_file, **values)
    json.dump(names, open(outputs_file + ".names.json", "w"))
''')


def pretraining_batch(
  rng: np.random.Generator, vocab_size: int, batch: int = 3, length: int = 16, predictions: int = 4
) -> dict[str, np.ndarray]:
  lengths = np.array([length, length - 5, 7])[:batch]
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = (rng.integers(5, vocab_size, size=(batch, length)) * mask).astype(np.int32)
  segments = ((np.arange(length)[None, :] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int32)
  positions = np.stack([np.sort(rng.choice(np.arange(1, n), size=predictions, replace=False)) for n in lengths]).astype(
    np.int32
  )
  weights = np.ones((batch, predictions), np.float32)
  weights[2, 3] = 0.0  # a padded prediction slot
  return {
    "input_ids": ids,
    "input_mask": mask,
    "segment_ids": segments,
    "masked_lm_positions": positions,
    "masked_lm_ids": rng.integers(5, vocab_size, size=(batch, predictions)).astype(np.int32),
    "masked_lm_weights": weights,
    "next_sentence_labels": np.array([0, 1, 1], np.int32),
  }


@pytest.fixture(scope="module")
def google_tf_model(tmp_path_factory):
  root = tmp_path_factory.mktemp("google_tf")
  (root / "bert_config.json").write_text(json.dumps(TF_CONFIG))
  batch = pretraining_batch(np.random.default_rng(0), TF_CONFIG["vocab_size"])
  np.savez(root / "inputs.npz", **batch)
  prefix = root / "bert_model.ckpt"
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
  built = subprocess.run(
    [
      sys.executable,
      "-c",
      TF_BUILDER,
      str(root / "bert_config.json"),
      str(prefix),
      str(root / "inputs.npz"),
      str(root / "outputs.npz"),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert built.returncode == 0, built.stderr[-4000:]
  names = json.loads((root / "outputs.npz.names.json").read_text())
  return root, prefix, batch, dict(np.load(root / "outputs.npz")), names


def convert_from_tf(root: Path, prefix: Path, hidden_act: str) -> model_io.LoadedModel:
  config_file = root / f"config_{hidden_act}.json"
  config_file.write_text(json.dumps({**TF_CONFIG, "hidden_act": hidden_act}))
  out = root / f"ours_{hidden_act}"
  result = run_module(
    "clinical_bert_jax.convert",
    "from_tf",
    f"--tf_checkpoint={prefix}",
    f"--bert_config={config_file}",
    f"--output_dir={out}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return model_io.load_model(out)


def our_outputs(loaded: model_io.LoadedModel, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  outputs = model.BertForPreTraining(loaded.config).apply(
    {"params": loaded.params},
    jnp.asarray(batch["input_ids"]),
    jnp.asarray(batch["input_mask"]),
    jnp.asarray(batch["segment_ids"]),
    masked_lm_positions=jnp.asarray(batch["masked_lm_positions"]),
  )
  jax_batch = {name: jnp.asarray(value) for name, value in batch.items()}
  metrics = losses.metrics_from_sums(losses.pretraining_sums(outputs, jax_batch))
  return {
    "mlm_log_probs": np.asarray(jax.nn.log_softmax(outputs["mlm_logits"])).reshape(-1, loaded.config.vocab_size),
    "nsp_log_probs": np.asarray(jax.nn.log_softmax(outputs["nsp_logits"])),
    "sequence_output": np.asarray(outputs["sequence_output"]),
    "metrics": {key: float(value) for key, value in metrics.items()},
  }


def test_googles_tensorflow_bert_checkpoint_converts_and_matches_tensorflows_forward(google_tf_model):
  root, prefix, batch, expected, names = google_tf_model
  assert {
    "cls/predictions/transform/dense/kernel",
    "cls/predictions/transform/LayerNorm/gamma",
    "cls/predictions/output_bias",
    "cls/seq_relationship/output_weights",
    "cls/seq_relationship/output_bias",
  } <= set(names)
  # Google's modeling.py (since February 2019, and so bert-tensorflow 1.0.4) computes "gelu" as the tanh form.
  loaded = convert_from_tf(root, prefix, "gelu_new")
  assert loaded.report.get("initialised", []) == [] and loaded.report.get("skipped", []) == []
  ours = our_outputs(loaded, batch)
  real = batch["input_mask"].astype(bool)
  np.testing.assert_allclose(
    ours["sequence_output"][real],
    expected["sequence_output"].reshape(ours["sequence_output"].shape)[real],
    atol=TOLERANCE,
    rtol=0,
  )
  np.testing.assert_allclose(ours["mlm_log_probs"], expected["mlm_log_probs"], atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(ours["nsp_log_probs"], expected["nsp_log_probs"], atol=TOLERANCE, rtol=0)
  # The losses as run_pretraining.py defines them (MLM: weighted mean + 1e-5 in the denominator; NSP: mean).
  assert ours["metrics"]["mlm_loss"] == pytest.approx(float(expected["mlm_loss"]), abs=TOLERANCE)
  assert ours["metrics"]["nsp_loss"] == pytest.approx(float(expected["nsp_loss"]), abs=TOLERANCE)

  # The same checkpoint read as the erf GELU is measurably another network: the tolerance can tell them apart.
  (root / "config_erf.json").write_text(json.dumps(TF_CONFIG))
  erf = our_outputs(model_io.load_tf_checkpoint(str(prefix), root / "config_erf.json"), batch)
  assert np.max(np.abs(erf["mlm_log_probs"] - expected["mlm_log_probs"])) > TOLERANCE


# --------------------------------------------------------------------------------------------------- transformers
def torch_bert(hidden_act: str) -> transformers.BertForPreTraining:
  torch.manual_seed(0)
  config = transformers.BertConfig(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_act=hidden_act,
  )
  torch_model = transformers.BertForPreTraining(config).eval()
  with torch.no_grad():
    for parameter in torch_model.parameters():
      parameter.add_(torch.randn_like(parameter) * 0.05)
  return torch_model


def logit_difference(ours_act: str, theirs_act: str) -> float:
  torch_model = torch_bert(theirs_act)
  state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  config = BertConfig.from_dict({**torch_model.config.to_dict(), "hidden_act": ours_act})
  params, _ = weight_names.params_from_named_arrays(state, model_io._fresh_reference(config), "pt", "test")
  batch = pretraining_batch(np.random.default_rng(0), config.vocab_size)
  with torch.no_grad():
    theirs = torch_model(
      input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
      attention_mask=torch.tensor(batch["input_mask"], dtype=torch.long),
      token_type_ids=torch.tensor(batch["segment_ids"], dtype=torch.long),
    )
  ours = model.BertForPreTraining(config).apply(
    {"params": params},
    jnp.asarray(batch["input_ids"]),
    jnp.asarray(batch["input_mask"]),
    jnp.asarray(batch["segment_ids"]),
  )
  real = batch["input_mask"].astype(bool)
  return max(
    float(np.max(np.abs(np.asarray(ours["mlm_logits"])[real] - theirs.prediction_logits.numpy()[real]))),
    float(np.max(np.abs(np.asarray(ours["nsp_logits"]) - theirs.seq_relationship_logits.numpy()))),
  )


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_mlm_and_nsp_logits_match_transformers_within_1e_5(hidden_act):
  assert logit_difference(hidden_act, hidden_act) <= TOLERANCE


@pytest.mark.parametrize("ours, theirs", [("gelu", "gelu_new"), ("gelu_new", "gelu")])
def test_each_gelu_variant_fails_against_the_other(ours, theirs):
  assert logit_difference(ours, theirs) > 10 * TOLERANCE
