"""The PyTorch fine-tuning optimizers against the originals: `google_adamw_pt` against Google's TensorFlow
`optimization.create_optimizer` (bert-tensorflow 1.0.4, what run_ner.py trained with), run in TF1 graph mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clinical_bert_jax.eval_tasks import torch_optimizers

pytestmark = pytest.mark.slow  # TF/PyTorch optimizer oracles


TF_NAMES = {
  "encoder.dense.weight": "encoder/dense/kernel",
  "encoder.dense.bias": "encoder/dense/bias",
  "encoder.LayerNorm.weight": "encoder/LayerNorm/gamma",
  "encoder.LayerNorm.bias": "encoder/LayerNorm/beta",
  "classifier.weight": "output_weights",
}


def toy_problem(seed: int = 3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(16, 4)).astype(np.float32)
  y = (3.0 * (x @ rng.normal(size=(4, 3)))).astype(np.float32)
  values = {
    "encoder.dense.weight": rng.normal(size=(4, 3)),
    "encoder.dense.bias": rng.normal(size=3),
    "encoder.LayerNorm.weight": 1 + 0.1 * rng.normal(size=3),
    "encoder.LayerNorm.bias": 0.1 * rng.normal(size=3),
    "classifier.weight": rng.normal(size=(3, 3)),
  }
  return x, y, {name: value.astype(np.float32) for name, value in values.items()}


def forward(p, x):
  hidden = (x @ p["encoder.dense.weight"] + p["encoder.dense.bias"]) * p["encoder.LayerNorm.weight"]
  return (hidden + p["encoder.LayerNorm.bias"]) @ p["classifier.weight"]


class Toy(torch.nn.Module):
  def __init__(self, values):
    super().__init__()
    self.names = list(values)
    for name, value in values.items():
      *parents, leaf = name.split(".")
      module = self
      for part in parents:
        if not hasattr(module, part):
          module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
      module.register_parameter(leaf, torch.nn.Parameter(torch.tensor(value)))

  def params(self):
    return dict(self.named_parameters())


def run_torch(optimizer_name, values, x, y, lr, total, warmup_proportion):
  model = Toy(values)
  optimizer = torch_optimizers.make_optimizer(optimizer_name, model, lr, total, warmup_proportion, 0.01)
  norms = []
  for _ in range(total):
    loss = torch.mean((forward(model.params(), torch.tensor(x)) - torch.tensor(y)) ** 2)
    optimizer.zero_grad()
    loss.backward()
    norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
    optimizer.step()
  return {name: p.detach().numpy() for name, p in model.named_parameters()}, norms


def run_google_tf(values, x, y, lr, total, warmup_steps):
  import tensorflow.compat.v1 as tf
  from bert import optimization

  with tf.Graph().as_default():
    variables = {
      name: tf.get_variable(TF_NAMES[name], initializer=tf.constant(value)) for name, value in values.items()
    }
    loss = tf.reduce_mean(tf.square(forward(variables, tf.constant(x)) - tf.constant(y)))
    train_op = optimization.create_optimizer(loss, lr, total, warmup_steps, use_tpu=False)
    with tf.Session() as session:
      session.run(tf.global_variables_initializer())
      for _ in range(total):
        session.run(train_op)
      return session.run(variables)


@pytest.mark.parametrize("total, warmup_proportion", [(12, 0.25), (10, 0.0), (7, 0.1)])
def test_google_adamw_pt_matches_googles_tensorflow_optimizer(total, warmup_proportion):
  x, y, values = toy_problem()
  lr = 0.05
  ours, norms = run_torch("google_adamw_pt", values, x, y, lr, total, warmup_proportion)
  expected = run_google_tf(values, x, y, lr, total, int(total * warmup_proportion))
  assert max(norms) > 1.0  # the global clipping is exercised
  for name in values:
    np.testing.assert_allclose(ours[name], expected[name], rtol=0, atol=2e-6, err_msg=name)
    assert not np.allclose(ours[name], values[name])  # every tensor moved
  # The oracle tells the two optimizers apart: per-tensor clipping and the 0.4.0 schedule give other weights.
  bert_adam, _ = run_torch("bert_adam_pt", values, x, y, lr, total, warmup_proportion)
  assert max(np.max(np.abs(bert_adam[name] - expected[name])) for name in values) > 1e-3


def test_google_schedule_and_decay_split():
  assert torch_optimizers.google_learning_rate(1.0, 0, 100, 10) == 0.0  # the first update has rate 0
  assert torch_optimizers.google_learning_rate(1.0, 5, 100, 10) == pytest.approx(0.5)
  assert torch_optimizers.google_learning_rate(1.0, 10, 100, 10) == pytest.approx(0.9)  # Google's jump after warmup
  assert torch_optimizers.google_learning_rate(1.0, 100, 100, 10) == 0.0
  import transformers

  model = transformers.BertForTokenClassification(
    transformers.BertConfig(
      vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, num_labels=3
    )
  )
  google = [{id(p) for p in group["params"]} for group in torch_optimizers.google_parameter_groups(model, 0.01)]
  original = [{id(p) for p in group["params"]} for group in torch_optimizers.parameter_groups(model, 0.01)]
  assert google == original and google[0] and google[1]
  with pytest.raises(ValueError, match="unknown fine-tuning optimizer"):
    torch_optimizers.make_optimizer("adam", model, 1e-3, 10, 0.1, 0.01)
