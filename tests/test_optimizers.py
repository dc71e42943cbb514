"""Optimizers: Google's AdamWeightDecay and learning-rate schedule exactly, PyTorch `BertAdam` where it agrees with
Google, the weight-decay mask on the real parameter tree, gradient accumulation, fp32 state."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from pytorch_pretrained_bert.optimization import BertAdam, WarmupLinearSchedule

from clinical_bert_jax import model, optimizers
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError

pytestmark = pytest.mark.slow  # TF/PyTorch optimizer oracles

# ---------------------------------------------------------------------------------------------------------- toy problem
# pred = (x @ kernel + bias) * scale + ln_bias, mean squared error. The names put one leaf in each weight-decay class:
# a decayed kernel, a plain bias, and LayerNorm scale/bias.
TOY_NAMES = ("encoder/dense/kernel", "encoder/dense/bias", "encoder/LayerNorm/scale", "encoder/LayerNorm/bias")
TORCH_NAMES = ("encoder.dense.weight", "encoder.dense.bias", "encoder.LayerNorm.weight", "encoder.LayerNorm.bias")


def toy_data(seed: int, rows: int = 16, target_scale: float = 1.0, dense_scale: float = 0.5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, 4))
  y = target_scale * (x @ rng.normal(size=(4, 3)) + 0.1 * rng.normal(size=(rows, 3)))  # learnable, a little noise
  flat = {
    "encoder/dense/kernel": rng.normal(size=(4, 3)) * dense_scale,
    "encoder/dense/bias": rng.normal(size=3) * dense_scale,
    "encoder/LayerNorm/scale": 1.0 + rng.normal(size=3) * 0.1,
    "encoder/LayerNorm/bias": rng.normal(size=3) * 0.1,
  }
  return x, y, flat


def nest(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def flatten(tree) -> dict:
  return {
    optimizers.flat_param_path(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def toy_loss(params, x, y):
  p = params["encoder"]
  pred = (x @ p["dense"]["kernel"] + p["dense"]["bias"]) * p["LayerNorm"]["scale"] + p["LayerNorm"]["bias"]
  return jnp.mean((pred - y) ** 2)


def numpy_toy_grads(flat: dict, x, y) -> dict:
  """Analytic float64 gradients of `toy_loss`, independent of JAX."""
  hidden = x @ flat["encoder/dense/kernel"] + flat["encoder/dense/bias"]
  pred = hidden * flat["encoder/LayerNorm/scale"] + flat["encoder/LayerNorm/bias"]
  residual = 2.0 * (pred - y) / pred.size
  return {
    "encoder/dense/kernel": x.T @ (residual * flat["encoder/LayerNorm/scale"]),
    "encoder/dense/bias": (residual * flat["encoder/LayerNorm/scale"]).sum(0),
    "encoder/LayerNorm/scale": (residual * hidden).sum(0),
    "encoder/LayerNorm/bias": residual.sum(0),
  }


def run_optax(tx, flat, x, y, steps: int) -> tuple[dict, list[float]]:
  """`steps` full-batch updates; returns final params and the gradient global norm seen at each step."""
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), nest(flat))
  state = tx.init(params)
  norms = []

  @jax.jit
  def step(params, state):
    grads = jax.grad(toy_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, optax.tree.norm(grads)

  for _ in range(steps):
    params, state, norm = step(params, state)
    norms.append(float(norm))
  return flatten(params), norms


def google_adam_weight_decay_numpy(flat, x, y, init_lr, num_train_steps, num_warmup_steps, steps) -> dict:
  """Line-by-line float64 transcription of google-research/bert `optimization.py` (create_optimizer +
  AdamWeightDecayOptimizer.apply_gradients), with the TF variable names mapped to ours."""
  params = {name: value.copy() for name, value in flat.items()}
  m = {name: np.zeros_like(value) for name, value in params.items()}
  v = {name: np.zeros_like(value) for name, value in params.items()}
  for global_step in range(steps):
    grads = numpy_toy_grads(params, x, y)
    global_norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
    grads = {name: g * 1.0 / max(global_norm, 1.0) for name, g in grads.items()}  # tf.clip_by_global_norm(…, 1.0)
    learning_rate = init_lr * (1.0 - min(global_step, num_train_steps) / num_train_steps)  # polynomial_decay, power 1
    if num_warmup_steps and global_step < num_warmup_steps:
      learning_rate = init_lr * (global_step / num_warmup_steps)
    for name in params:
      m[name] = 0.9 * m[name] + (1.0 - 0.9) * grads[name]
      v[name] = 0.999 * v[name] + (1.0 - 0.999) * np.square(grads[name])
      update = m[name] / (np.sqrt(v[name]) + 1e-6)
      if not any(re.search(r, name) for r in ["LayerNorm", "layer_norm", "bias"]):
        update += 0.01 * params[name]
      params[name] = params[name] - learning_rate * update
  return params


def assert_params_close(actual: dict, expected: dict, atol: float = 1e-6):
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=atol, err_msg=name)


# -------------------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
  "num_train_steps, lr_w_minus_1, lr_w, lr_t_minus_1",
  [
    (150_000, 4.9995e-5, 4.6667e-5, 3.3e-10),  # ClinicalBERT all notes (bert-pretraining.md §6)
    (100_000, 4.9995e-5, 4.5000e-5, 5.0e-10),  # ClinicalBERT discharge summaries
  ],
)
def test_bert_schedule_reproduces_reference_table(num_train_steps, lr_w_minus_1, lr_w, lr_t_minus_1):
  schedule = optimizers.make_schedule(5e-5, num_train_steps, 10_000, "bert")
  # The table is rounded to the digits shown.
  np.testing.assert_allclose(float(schedule(9_999)), lr_w_minus_1, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(10_000)), lr_w, rtol=1e-4)
  np.testing.assert_allclose(float(schedule(num_train_steps - 1)), lr_t_minus_1, rtol=0.02)
  assert float(schedule(0)) == 0.0  # Google's first update uses rate 0


@pytest.mark.parametrize("num_train_steps, num_warmup_steps", [(150_000, 10_000), (100_000, 10_000), (50, 0), (7, 7)])
def test_schedules_equal_their_formulas_at_every_interesting_step(num_train_steps, num_warmup_steps):
  init_lr, t_total, warmup = 5e-5, num_train_steps, num_warmup_steps
  steps = np.unique(
    np.clip(
      np.concatenate(
        [np.arange(0, 5), warmup + np.arange(-3, 4), t_total + np.arange(-3, 4), [t_total // 2, 2 * t_total]]
      ),
      0,
      None,
    )
  )
  bert = jax.jit(jax.vmap(optimizers.make_schedule(init_lr, t_total, warmup, "bert")))(steps)
  warmup_linear = jax.jit(jax.vmap(optimizers.make_schedule(init_lr, t_total, warmup, "warmup_linear")))(steps)
  for index, t in enumerate(steps):
    warming = t < warmup
    expected_bert = init_lr * t / warmup if warming else init_lr * (1.0 - min(t, t_total) / t_total)
    expected_linear = init_lr * t / warmup if warming else init_lr * max(t_total - t, 0) / max(t_total - warmup, 1)
    np.testing.assert_allclose(bert[index], expected_bert, rtol=1e-6, atol=1e-16, err_msg=f"bert t={t}")
    np.testing.assert_allclose(warmup_linear[index], expected_linear, rtol=1e-6, atol=1e-16, err_msg=f"t={t}")


# ------------------------------------------------------------------------------------------------------- decay mask
def test_decay_mask_on_the_model_tree_selects_kernels_and_embeddings_only():
  config = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
  )
  shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
  mask = {
    optimizers.flat_param_path(path): bool(decay)
    for path, decay in jax.tree_util.tree_flatten_with_path(optimizers.weight_decay_mask(shapes))[0]
  }
  # Google decays kernels, the three embedding tables and the NSP output weights; every bias and LayerNorm
  # parameter is excluded. In Flax names that is: decay exactly the `kernel` and `embedding` leaves.
  expected = {path: path.rsplit("/", 1)[-1] in ("kernel", "embedding") for path in mask}
  assert mask == expected
  assert mask["cls/predictions/bias"] is False
  assert mask["cls/seq_relationship/kernel"] is True
  assert mask["bert/embeddings/word_embeddings/embedding"] is True
  assert mask["bert/encoder/layer/1/attention/output/LayerNorm/scale"] is False
  assert sum(mask.values()) == 3 + 2 * 6 + 3  # embeddings, 6 kernels per layer, pooler + transform + NSP kernels


SMALL = BertConfig(
  vocab_size=50,
  hidden_size=16,
  num_hidden_layers=3,
  num_attention_heads=2,
  intermediate_size=32,
  max_position_embeddings=32,
)


def test_decay_mask_selects_the_same_leaves_in_the_scan_layers_layout():
  shapes = lambda scan_layers: jax.eval_shape(lambda: model.init_params(SMALL, jax.random.key(0), scan_layers))
  mask = optimizers.weight_decay_mask(shapes(False))
  stacked_mask = optimizers.weight_decay_mask(shapes(True))
  layers = stacked_mask["bert"]["encoder"]["layer"]
  assert list(layers) == [model.SCANNED]
  # Per-layer mask of the stacked tree: each stacked leaf's flag stands for its L layers.
  unstacked = model.unstack_layer_params(
    jax.tree.map(lambda flag: np.full(SMALL.num_hidden_layers, flag), stacked_mask)
  )
  assert jax.tree.map(lambda flags: bool(np.all(flags)) if np.ndim(flags) else bool(flags), unstacked) == mask


def test_lamb_takes_its_trust_ratio_per_layer_in_the_stacked_layout():
  """Our LAMB equals `optax.lamb` on the per-layer tree, and on the stacked tree gives the same updates per layer
  (optax's own trust ratio over a whole [L, ...] leaf would not)."""
  params = jax.jit(model.init_params, static_argnums=0)(SMALL, jax.random.key(0))
  # Gradients of different size per layer, so a shared trust ratio would scale the layers differently.
  grads = jax.tree.map(lambda leaf: np.sin(7.0 * np.asarray(leaf) + 1.0), params)
  grads["bert"]["encoder"]["layer"]["1"] = jax.tree.map(lambda g: 5.0 * g, grads["bert"]["encoder"]["layer"]["1"])
  ours = optimizers.make_optimizer("lamb", 1e-3, 10, 0, weight_decay=0.01, clip_norm=0.0, schedule="warmup_linear")
  oracle = optax.lamb(
    optimizers.make_schedule(1e-3, 10, 0, "warmup_linear"),
    eps=1e-6,
    weight_decay=0.01,
    mask=optimizers.weight_decay_mask,
  )
  first_update = lambda tx, grads, params: jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
  expected = first_update(oracle, grads, params)
  per_layer = first_update(ours, grads, params)
  stacked_params, stacked_grads = model.stack_layer_params(params), model.stack_layer_params(grads)
  stacked = first_update(ours, stacked_grads, stacked_params)
  assert jax.tree.structure(stacked) == jax.tree.structure(stacked_params)
  for got in (per_layer, model.unstack_layer_params(stacked)):
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-9)
  whole = first_update(oracle, stacked_grads, stacked_params)
  kernel = lambda tree: tree["bert"]["encoder"]["layer"][model.SCANNED]["block"]["intermediate"]["dense"]["kernel"]
  assert not np.allclose(kernel(whole), kernel(stacked), rtol=1e-3)


# ------------------------------------------------------------------------------------------- bert_adam parity
def test_bert_adam_matches_numpy_transcription_of_google_including_the_jump_and_clipping():
  # Targets 3× larger than the inputs give gradient norms > 1, so the global-norm clip is active early on.
  x, y, flat = toy_data(seed=1, target_scale=3.0)
  init_lr, total, warmup = 0.05, 12, 4
  ours, norms = run_optax(optimizers.make_optimizer("bert_adam", init_lr, total, warmup), flat, x, y, steps=total)
  assert max(norms) > 1.0 and min(norms) < max(norms)
  expected = google_adam_weight_decay_numpy(flat, x, y, init_lr, total, warmup, steps=total)
  assert_params_close(ours, expected)
  # Sanity check that the comparison is sensitive: without weight decay the result is measurably different.
  no_decay, _ = run_optax(
    optimizers.make_optimizer("bert_adam", init_lr, total, warmup, weight_decay=0.0), flat, x, y, steps=total
  )
  assert np.abs(no_decay["encoder/dense/kernel"] - expected["encoder/dense/kernel"]).max() > 1e-4


def run_torch_bert_adam(flat, x, y, init_lr, total, warmup, steps) -> dict:
  torch_params = {
    torch_name: torch.nn.Parameter(torch.tensor(flat[name], dtype=torch.float32))
    for name, torch_name in zip(TOY_NAMES, TORCH_NAMES)
  }
  # Parameter groups as in pytorch-pretrained-bert's examples (run_lm_finetuning.py).
  no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
  groups = [
    {"params": [p for n, p in torch_params.items() if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
    {"params": [p for n, p in torch_params.items() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
  ]
  optimizer = BertAdam(groups, lr=init_lr, warmup=warmup / total, t_total=total, schedule="warmup_linear")
  x_t, y_t = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
  for _ in range(steps):
    optimizer.zero_grad()
    hidden = x_t @ torch_params["encoder.dense.weight"] + torch_params["encoder.dense.bias"]
    pred = hidden * torch_params["encoder.LayerNorm.weight"] + torch_params["encoder.LayerNorm.bias"]
    torch.mean((pred - y_t) ** 2).backward()
    optimizer.step()
  return {name: torch_params[torch_name].detach().numpy() for name, torch_name in zip(TOY_NAMES, TORCH_NAMES)}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bert_adam_matches_pytorch_pretrained_bert_where_the_two_agree():
  # Small targets keep every gradient norm below 1, where BertAdam's per-tensor clip and Google's global clip are
  # both no-ops (the assertion on `norms` checks that premise).
  x, y, flat = toy_data(seed=2, target_scale=0.1, dense_scale=0.1)
  init_lr, total, warmup = 0.05, 12, 4
  # BertAdam's 'warmup_linear' decays from the peak over T−W: our `warmup_linear` schedule, for the whole run.
  expected = run_torch_bert_adam(flat, x, y, init_lr, total, warmup, steps=total)
  ours, norms = run_optax(
    optimizers.make_optimizer("bert_adam", init_lr, total, warmup, schedule="warmup_linear"), flat, x, y, steps=total
  )
  assert max(norms) < 1.0
  assert_params_close(ours, expected)
  # Google's own schedule agrees with BertAdam during warmup (t < W), so there the default bert_adam matches too.
  expected = run_torch_bert_adam(flat, x, y, init_lr, total, warmup, steps=warmup)
  ours, _ = run_optax(optimizers.make_optimizer("bert_adam", init_lr, total, warmup), flat, x, y, steps=warmup)
  assert_params_close(ours, expected)


def test_pytorch_bert_adam_schedule_differs_from_google_after_warmup():
  init_lr, total, warmup = 1.0, 20, 5
  bert_adam_schedule = WarmupLinearSchedule(warmup=warmup / total, t_total=total)
  google = optimizers.make_schedule(init_lr, total, warmup, "bert")
  warmup_linear = optimizers.make_schedule(init_lr, total, warmup, "warmup_linear")
  for t in range(total + 2):
    np.testing.assert_allclose(float(warmup_linear(t)), bert_adam_schedule.get_lr(t, nowarn=True), atol=1e-6)
  # At t = W BertAdam uses the peak rate, Google has already jumped down to 1 − W/T.
  assert bert_adam_schedule.get_lr(warmup) == pytest.approx(1.0)
  assert float(google(warmup)) == pytest.approx(1.0 - warmup / total)


# BertAdam calls `add_` with a signature torch deprecated.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pytorch_bert_adam_clips_per_tensor_where_google_clips_globally():
  grads = {
    "encoder/dense/kernel": np.full((4, 3), 3.0 / np.sqrt(12.0)),
    "encoder/dense/bias": np.zeros(3),
    "encoder/LayerNorm/scale": np.array([4.0, 0.0, 0.0]),
    "encoder/LayerNorm/bias": np.zeros(3),
  }
  # Tensor norms 3 and 4, global norm 5: BertAdam scales them by 1/3 and 1/4, Google both by 1/5.
  torch_params = [torch.nn.Parameter(torch.zeros(grads[name].shape)) for name in TOY_NAMES]
  for parameter, name in zip(torch_params, TOY_NAMES):
    parameter.grad = torch.tensor(grads[name], dtype=torch.float32)
  optimizer = BertAdam(torch_params, lr=0.1)
  optimizer.step()
  torch_m = {name: optimizer.state[p]["next_m"].numpy() for name, p in zip(TOY_NAMES, torch_params)}
  np.testing.assert_allclose(torch_m["encoder/dense/kernel"], 0.1 * grads["encoder/dense/kernel"] / 3.0, atol=1e-6)
  np.testing.assert_allclose(
    torch_m["encoder/LayerNorm/scale"], 0.1 * grads["encoder/LayerNorm/scale"] / 4.0, atol=1e-6
  )

  tx = optimizers.make_optimizer("bert_adam", 0.1, 10, 0)
  params = jax.tree.map(lambda g: jnp.zeros(g.shape), nest(grads))
  _, state = tx.update(jax.tree.map(jnp.asarray, nest(grads)), tx.init(params), params)
  our_m = flatten(optax.tree_utils.tree_get(state, "mu"))
  for name in ("encoder/dense/kernel", "encoder/LayerNorm/scale"):
    np.testing.assert_allclose(our_m[name], 0.1 * grads[name] / 5.0, atol=1e-6)


# ------------------------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("name", optimizers.OPTIMIZER_NAMES)
def test_accumulating_k_micro_batches_equals_one_big_batch_step(name):
  x, y, flat = toy_data(seed=3, rows=16, target_scale=3.0)
  updates, micro_batches = 3, 4
  big_tx = optimizers.make_optimizer(name, 0.05, 10, 1)
  expected, _ = run_optax(big_tx, flat, x, y, steps=updates)

  tx = optimizers.make_optimizer(name, 0.05, 10, 1, grad_accum_steps=micro_batches)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), nest(flat))
  state = tx.init(params)
  micro_step = jax.jit(lambda params, state, xs, ys: tx.update(jax.grad(toy_loss)(params, xs, ys), state, params))
  for _ in range(updates):
    before = params
    for rows in np.split(np.arange(len(x)), micro_batches):
      update, state = micro_step(params, state, x[rows], y[rows])
      params = optax.apply_updates(params, update)
      if rows[-1] != len(x) - 1:  # no parameter change until the k-th micro-batch
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)))
  # The schedule counted optimizer updates, not micro-steps: otherwise the learning rates (and results) would differ.
  assert_params_close(flatten(params), expected)
  assert int(optax.tree_utils.tree_get(state, "gradient_step")) == updates


# ---------------------------------------------------------------------------------------------------- adamw, lamb
@pytest.mark.parametrize("name", optimizers.OPTIMIZER_NAMES)
def test_every_optimizer_decreases_a_toy_loss(name):
  x, y, flat = toy_data(seed=4, target_scale=3.0)
  params, _ = run_optax(optimizers.make_optimizer(name, 0.05, 60, 5), flat, x, y, steps=60)
  initial = float(toy_loss(nest(flat), x, y))
  final = float(toy_loss(nest(params), x, y))
  assert final < 0.5 * initial


@pytest.mark.parametrize("name", optimizers.OPTIMIZER_NAMES)
def test_optimizer_state_stays_fp32_with_bf16_gradients(name):
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), nest(toy_data(seed=5)[2]))
  tx = optimizers.make_optimizer(name, 1e-3, 10, 2, grad_accum_steps=2)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.bfloat16), params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  float_dtypes = {leaf.dtype for leaf in jax.tree.leaves((state, updates)) if jnp.issubdtype(leaf.dtype, jnp.floating)}
  assert float_dtypes == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(name="sgd"), "google_adamw, adamw, lamb"),
    (dict(schedule="cosine"), "--lr_schedule"),
    (dict(num_warmup_steps=11), "--num_warmup_steps"),
    (dict(num_train_steps=0, num_warmup_steps=0), "--num_train_steps"),
    (dict(learning_rate=-1.0), "--learning_rate"),
    (dict(grad_accum_steps=0), "--grad_accum_steps"),
    (dict(clip_norm=-1.0), "--clip_norm"),
    (dict(weight_decay=-0.1), "--weight_decay"),
  ],
)
def test_bad_settings_raise_user_errors_naming_the_flag(kwargs, message):
  arguments = dict(name="bert_adam", learning_rate=1e-4, num_train_steps=10, num_warmup_steps=1) | kwargs
  with pytest.raises(UserError, match=re.escape(message)):
    optimizers.make_optimizer(**arguments)


def test_bert_adam_matches_googles_tensorflow_optimizer():
  """The real `optimization.create_optimizer` from google-research/bert (PyPI bert-tensorflow), run in TF1 graph mode:
  it is the oracle for the numpy transcription above and for our optax chain."""
  import tensorflow.compat.v1 as tf
  from bert import optimization

  x, y, flat = toy_data(seed=6, target_scale=3.0)
  init_lr, total, warmup = 0.05, 12, 4
  tf_names = {
    "encoder/dense/kernel": "encoder/dense/kernel",
    "encoder/dense/bias": "encoder/dense/bias",
    "encoder/LayerNorm/scale": "encoder/LayerNorm/gamma",
    "encoder/LayerNorm/bias": "encoder/LayerNorm/beta",
  }
  with tf.Graph().as_default():
    variables = {
      name: tf.get_variable(tf_name, initializer=tf.constant(flat[name], tf.float32))
      for name, tf_name in tf_names.items()
    }
    hidden = tf.matmul(tf.constant(x, tf.float32), variables["encoder/dense/kernel"]) + variables["encoder/dense/bias"]
    pred = hidden * variables["encoder/LayerNorm/scale"] + variables["encoder/LayerNorm/bias"]
    loss = tf.reduce_mean(tf.square(pred - tf.constant(y, tf.float32)))
    train_op = optimization.create_optimizer(loss, init_lr, total, warmup, use_tpu=False)
    with tf.Session() as session:
      session.run(tf.global_variables_initializer())
      for _ in range(total):
        session.run(train_op)
      expected = session.run(variables)
  ours, norms = run_optax(optimizers.make_optimizer("bert_adam", init_lr, total, warmup), flat, x, y, steps=total)
  assert max(norms) > 1.0
  assert_params_close(ours, expected)


def test_bert_adam_is_the_earlier_name_of_google_adamw():
  """`--optimizer=bert_adam` (flagfiles, the flags.txt of earlier runs) keeps working as `google_adamw`."""
  assert optimizers.canonical_optimizer("bert_adam") == "google_adamw"
  assert optimizers.default_schedule("bert_adam") == optimizers.default_schedule("google_adamw") == "bert"
  params = {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}
  grads = jax.tree.map(lambda leaf: jnp.sin(leaf) + 0.5, params)
  updates = {}
  for name in ("bert_adam", "google_adamw"):
    tx = optimizers.make_optimizer(name, 1e-3, 10, 0)
    updates[name], _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["google_adamw"]["kernel"]).min()) > 1e-4
  for leaf_a, leaf_b in zip(jax.tree.leaves(updates["bert_adam"]), jax.tree.leaves(updates["google_adamw"])):
    np.testing.assert_array_equal(leaf_a, leaf_b)


@pytest.mark.parametrize("size", [0.01, 3.0])  # global norm below and above the clip norm
def test_clip_by_global_norm_is_tensorflows(size):
  """Our clip multiplies by one scalar (so XLA fuses it into the moment updates); the oracle is TF's own
  `tf.clip_by_global_norm`, which Google's `optimization.py` calls with clip_norm=1.0."""
  import tensorflow as tf

  rng = np.random.default_rng(7)
  grads = {
    "kernel": rng.normal(size=(30, 20)) * size,
    "bias": rng.normal(size=(20,)) * size,
    "scalar": np.float64(size),
  }
  grads = {name: np.asarray(value, np.float32) for name, value in grads.items()}
  for clip_norm in (1.0, 0.3):
    expected, norm = tf.clip_by_global_norm([tf.constant(grads[name]) for name in sorted(grads)], clip_norm)
    clipped, _ = optimizers.clip_by_global_norm(clip_norm).update(grads, optax.EmptyState())
    assert (float(norm) > clip_norm) == (size > 1.0)
    for name, tf_value in zip(sorted(grads), expected):
      np.testing.assert_allclose(
        np.asarray(clipped[name]), tf_value.numpy(), rtol=1e-6, atol=0
      )  # norms summed in another order
