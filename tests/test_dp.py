"""DP-SGD (clinical_bert_jax/dp.py): the private step equals the DP-SGD formula computed by hand, one example at a
time; with no noise and no effective clipping it equals the normal step; the accountant agrees with the closed form of
the Gaussian mechanism; bad settings fail with one line."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import brentq
from scipy.stats import norm

from cli_util import assert_one_line_error, run_module
from clinical_bert_jax import dp, losses, model, train
from clinical_bert_jax.config import BertConfig
from clinical_bert_jax.errors import UserError
from test_pretrain import PREDICTIONS, TINY_MODEL, make_instances

BATCH = 8


@pytest.fixture(scope="module")
def setup():
  config = BertConfig(
    **{**TINY_MODEL, "num_hidden_layers": 1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
  )
  bert = model.BertForPreTraining(config)
  params = model.init_params(config, jax.random.key(0))
  instances = make_instances(BATCH, seed=3)
  batch = {name: np.stack([instance[name] for instance in instances]) for name in instances[0]}
  return config, bert, params, batch


_CACHE: dict = {}


def _step_grads(bert, params, batch, **dp_settings) -> np.ndarray:
  """The gradient train.train_step applies (plain SGD with rate 1: params - new params), flattened; cached, since
  compiling is most of this file's time."""
  key = (id(batch), train.TrainConfig(**dp_settings))
  if key not in _CACHE:
    _CACHE[key] = _compute_step_grads(bert, params, batch, **dp_settings)
  return _CACHE[key]


def _compute_step_grads(bert, params, batch, **dp_settings) -> np.ndarray:
  cfg = train.TrainConfig(max_predictions_per_seq=PREDICTIONS, **dp_settings)
  tx = optax.sgd(1.0)
  state = train.TrainState(
    params=params, opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(5)), step=jnp.zeros((), jnp.int32)
  )
  step = jax.jit(functools.partial(train.train_step, bert=bert, tx=tx, cfg=cfg, vocab=None))
  new_state, _ = step(state, batch)
  return np.asarray(ravel_pytree(params)[0] - ravel_pytree(new_state.params)[0], np.float64)


def _hand_dp_gradient(bert, params, batch, clip: float) -> np.ndarray:
  """(Σ_i clip_C(∇ℓ_i)) / B, one example at a time, clipping in float64 numpy."""

  @jax.jit
  def grad_of(p, example):
    def loss(p):
      outputs = bert.apply(
        {"params": p},
        example["input_ids"],
        example["input_mask"],
        example["segment_ids"],
        example["masked_lm_positions"],
      )
      return losses.pretraining_loss(outputs, example)[0]

    return jax.grad(loss)(p)

  total = 0.0
  for row in range(BATCH):
    example = {name: values[row : row + 1] for name, values in batch.items()}
    grad = np.asarray(ravel_pytree(grad_of(params, example))[0], np.float64)
    total = total + grad * min(1.0, clip / np.linalg.norm(grad))
  return total / BATCH


@pytest.mark.slow  # compiles train steps
def test_private_step_equals_the_dp_sgd_formula(setup):
  _, bert, params, batch = setup
  clip = 0.5
  hand = _hand_dp_gradient(bert, params, batch, clip)
  noiseless = _step_grads(bert, params, batch, dp_l2_clip=clip)
  np.testing.assert_allclose(noiseless, hand, rtol=2e-4, atol=5e-7)
  # Clipping was active: the unclipped per-example gradients are larger than C here.
  assert not np.allclose(_hand_dp_gradient(bert, params, batch, 1e9), hand, rtol=1e-2)
  # The noise: the same step with σ = 1.3 differs by N(0, (σC)²) / B per coordinate.
  sigma = 1.3
  noisy = _step_grads(bert, params, batch, dp_l2_clip=clip, dp_noise_multiplier=sigma)
  noise = (noisy - noiseless) * BATCH
  assert noise.size > 5_000
  assert abs(noise.std() / (sigma * clip) - 1) < 0.03
  assert abs(noise.mean()) < 4 * sigma * clip / math.sqrt(noise.size)


@pytest.mark.slow  # compiles train steps
def test_without_noise_and_clipping_the_private_step_is_the_normal_step(setup):
  _, bert, params, batch = setup
  # Google's loss normalises the MLM loss by the batch's weight sum, DP-SGD by each sequence's own: they coincide
  # when every sequence has the same number of predictions.
  equal = dict(batch, masked_lm_weights=np.tile(np.array([1, 1, 0, 0, 0], np.float32), (BATCH, 1)))
  normal = _step_grads(bert, params, equal)
  private = _step_grads(bert, params, equal, dp_noise_multiplier=0.0, dp_l2_clip=1e9)
  np.testing.assert_allclose(private, normal, rtol=1e-4, atol=5e-7)  # atol: fp32 rounding of params - new params


@pytest.mark.slow  # compiles train steps
def test_micro_batches_and_devices_give_the_same_private_gradient(setup):
  _, bert, params, batch = setup
  clip = 0.5
  whole = _step_grads(bert, params, batch, dp_l2_clip=clip)
  # Two micro-batches of 4, accumulated by the scan inside the step: the same clipped mean.
  cfg = train.TrainConfig(max_predictions_per_seq=PREDICTIONS, dp_l2_clip=clip, grad_accum_steps=2)
  tx = optax.sgd(1.0)
  state = train.TrainState(
    params=params, opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(5)), step=jnp.zeros((), jnp.int32)
  )
  step = jax.jit(functools.partial(train.train_step, bert=bert, tx=tx, cfg=cfg, vocab=None))
  state, _ = step(state, batch)
  accumulated = np.asarray(ravel_pytree(params)[0] - ravel_pytree(state.params)[0], np.float64)
  np.testing.assert_allclose(accumulated, whole, rtol=2e-4, atol=5e-7)
  # pmap over 2 devices: psum of clipped sums, noise drawn once with the same key on every device.
  devices = 2
  if jax.local_device_count() < devices:
    pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, as conftest sets)")
  sigma = 1.3  # the same noise too: one draw, from a key that does not depend on the device
  cfg = train.TrainConfig(max_predictions_per_seq=PREDICTIONS, dp_l2_clip=clip, dp_noise_multiplier=sigma)
  tx = optax.sgd(1.0)
  state = train.TrainState(
    params=params, opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(5)), step=jnp.zeros((), jnp.int32)
  )
  stacked = jax.tree.map(lambda value: jnp.stack([value] * devices), state)
  pmapped = jax.pmap(
    functools.partial(train.train_step, bert=bert, tx=tx, cfg=cfg, vocab=None, axis_name=train.PMAP_AXIS),
    axis_name=train.PMAP_AXIS,
    in_axes=(0, 0),
    devices=jax.local_devices()[:devices],
  )
  sharded = {name: values.reshape((devices, -1) + values.shape[1:]) for name, values in batch.items()}
  new_state, _ = pmapped(stacked, sharded)
  per_device = [
    np.asarray(ravel_pytree(jax.tree.map(lambda value, i=i: value[i], new_state.params))[0]) for i in range(devices)
  ]
  assert all(np.array_equal(per_device[0], other) for other in per_device[1:])  # the same update everywhere
  single = _step_grads(bert, params, batch, dp_l2_clip=clip, dp_noise_multiplier=sigma)
  np.testing.assert_allclose(np.asarray(ravel_pytree(params)[0]) - per_device[0], single, rtol=2e-3, atol=1e-6)


def _gaussian_epsilon(sigma: float, delta: float) -> float:
  """The exact ε of one Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Theorem 8), by root finding."""

  def excess(eps):
    return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta

  return brentq(excess, 0.0, 100.0)


def test_accountant_matches_the_gaussian_mechanism_and_behaves():
  exact = _gaussian_epsilon(2.0, 1e-5)
  assert dp.epsilon(2.0, 1.0, 1, 1e-5, "pld") == pytest.approx(exact, rel=0.02)
  assert exact <= dp.epsilon(2.0, 1.0, 1, 1e-5, "rdp") <= 1.5 * exact  # RDP is an upper bound, looser
  eps = [dp.epsilon(1.1, 256 / 60000, steps, 1e-5) for steps in (100, 1000, 10000)]
  assert eps[0] < eps[1] < eps[2] < 10
  assert dp.epsilon(2.0, 0.01, 1000, 1e-5) < dp.epsilon(1.0, 0.01, 1000, 1e-5)
  assert dp.epsilon(0.0, 0.01, 10, 1e-5) == math.inf and dp.epsilon(1.0, 0.01, 0, 1e-5) == 0.0


@pytest.mark.parametrize(
  "settings, fragment",
  [
    ({"dp_noise_multiplier": 1.0}, "needs --dp_l2_clip > 0"),
    ({"dp_l2_clip": -1.0}, "--dp_l2_clip=-1.0 must be"),
    ({"dp_l2_clip": 1.0, "dp_delta": 1.5}, "--dp_delta=1.5"),
    ({"dp_l2_clip": 1.0, "dp_accountant": "moments"}, "--dp_accountant"),
  ],
)
def test_bad_dp_settings_are_one_line_errors(settings, fragment):
  with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace("+", r"\+")):
    train.TrainConfig(**settings).validate()


def test_settings_that_break_the_accounting_are_refused():
  with pytest.raises(UserError, match="sampling rate"):
    dp.check_against_data(64, 1, 64, 1e-5)
  with pytest.raises(UserError, match="not below 1/1000"):
    dp.check_against_data(16, 2, 1000, 1e-2)
  with pytest.raises(UserError, match="divisible by --grad_accum_steps=3"):
    dp.check_against_data(16, 3, 1000, 1e-5)


def test_privacy_record_feeds_the_model_card_and_guards_resumes(tmp_path):
  record = dp.accounting_record(1.0, 0.5, 1e-5, "rdp", 16, 1000)
  dp.write_record(tmp_path, record)
  lines = "\n".join(dp.model_card_lines(f"workdir:{tmp_path}@200", 200))
  eps = dp.epsilon(1.0, 16 / 1000, 200, 1e-5)
  assert f"ε={eps:.3g}" in lines and "δ=1e-05" in lines and "one training instance" in lines
  assert dp.model_card_lines(f"ours:{tmp_path}", 200) == []
  dp.check_resume(tmp_path, record)
  with pytest.raises(UserError, match="differ"):
    dp.check_resume(tmp_path, dict(record, noise_multiplier=2.0))
  with pytest.raises(UserError, match="differ"):
    dp.check_resume(tmp_path, None)
  dp.write_record(tmp_path, None)
  assert not (tmp_path / dp.PRIVACY_FILE).exists()


@pytest.mark.slow  # runs the pretrain CLI
def test_cli_refuses_noise_without_clipping_in_one_line(tmp_path):
  result = run_module(
    "clinical_bert_jax.pretrain",
    f"--input_file={tmp_path}/none",
    f"--output_dir={tmp_path}/run",
    "--dp_noise_multiplier=1.0",
  )
  assert result.returncode == 2
  assert_one_line_error(result, "--dp_noise_multiplier=1.0 needs --dp_l2_clip > 0")
  assert not (tmp_path / "run").exists()
