"""The cross-entropy with its hand-written backward (trainers/cross_entropy.py) against a float64 numpy computation
of the same CE, and against the autodiff formula it replaced (logsumexp of float32 logits - target logit), whose
error is measured alongside so the comparison shows the new backward is no less accurate."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from maxtext.trainers.cross_entropy import token_cross_entropy, token_logprobs
from maxtext.trainers.loss import cross_entropy_sum

BATCH, LENGTH, VOCAB, EMBED = 2, 12, 1000, 16  # a vocabulary that is no power of two


def autodiff_cross_entropy_sum(logits, targets, weights):
  """The formula cross_entropy_sum used before the custom backward; jax differentiates it."""
  logits = logits.astype(jnp.float32)
  log_normaliser = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((log_normaliser - target_logit) * weights)


def mean_loss(cross_entropy):
  """The training loss's shape: the weighted CE sum over the weight total (so the cotangent is not 1)."""
  return lambda logits, targets, weights: cross_entropy(logits, targets, weights) / jnp.sum(weights)


def _inputs(seed: int):
  """Logits [B, T, V] float64 up to +-30 (rows at three scales), targets, weights with masked tokens."""
  rng = np.random.default_rng(seed)
  scale = rng.choice([1.0, 8.0, 30.0], size=(BATCH, LENGTH, 1))
  logits = np.clip(rng.normal(0.0, 1.0, (BATCH, LENGTH, VOCAB)) * scale, -30.0, 30.0)
  targets = rng.integers(0, VOCAB, (BATCH, LENGTH))
  targets[0, 0] = np.argmax(logits[0, 0])  # a confident correct token: p(target) near 1 at large scales
  weights = np.ones((BATCH, LENGTH), np.float32)
  weights[0, 5] = weights[1, 2] = 0.0
  weights[1, 9:] = 0.0  # padding
  return logits, targets.astype(np.int32), weights


def _float64_reference(logits, targets, weights):
  """(per-token CE [B, T], mean loss, gradient of the mean loss w.r.t. logits [B, T, V]) in float64."""
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  per_token = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  total = weights.astype(np.float64).sum()
  one_hot = np.zeros_like(logits)
  np.put_along_axis(one_hot, targets[..., None], 1.0, axis=-1)
  grad = (np.exp(log_probs) - one_hot) * (weights / total)[..., None]
  return per_token, (per_token * weights).sum() / total, grad


def _bf16_ulps(got: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """|got - reference| in units of the bf16 spacing at `reference` (a bf16 value); where reference is 0, any
  difference counts as infinitely many."""
  exponent = np.floor(np.log2(np.where(reference != 0, np.abs(reference), 1.0)))
  ulp = 2.0 ** (exponent - 7)  # bf16 keeps 7 fraction bits
  error = np.abs(got - reference)
  return np.where(reference != 0, error / ulp, np.where(error > 0, np.inf, 0.0))


@pytest.fixture(scope="module")
def case():
  return _inputs(0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_value_and_gradient_match_float64(case, dtype):
  logits64, targets, weights = case
  logits = jnp.asarray(logits64, dtype)
  exact_logits = np.asarray(logits, np.float64)  # the values the function sees, after rounding to dtype
  want_tokens, want_loss, want_grad = _float64_reference(exact_logits, targets, weights)

  got_tokens = jax.jit(token_cross_entropy)(logits, jnp.asarray(targets))
  assert got_tokens.dtype == jnp.float32
  # float32 rounding of max + log(sum) and of the target logit: a few ulps of values up to ~60.
  np.testing.assert_allclose(np.asarray(got_tokens, np.float64), want_tokens, rtol=1e-6, atol=1e-5)

  results = {}
  for name, cross_entropy in [("custom", cross_entropy_sum), ("autodiff", autodiff_cross_entropy_sum)]:
    loss, grad = jax.jit(jax.value_and_grad(mean_loss(cross_entropy)))(logits, jnp.asarray(targets),
                                                                      jnp.asarray(weights))
    assert grad.dtype == dtype
    results[name] = (float(loss), np.asarray(grad, np.float64))
  loss, grad = results["custom"]
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  assert loss == results["autodiff"][0]  # the same forward ops
  masked = weights == 0
  assert np.all(grad[masked] == 0)

  if dtype == jnp.float32:
    # Relative to each element: exp(x - max) sees x - max rounded to float32 (|x - max| up to 60 -> ~2e-6).
    errors = {name: np.max(np.abs(g - want_grad) / np.maximum(np.abs(want_grad), 1e-30))
              for name, (_, g) in results.items()}
    assert errors["custom"] <= 1e-5, errors
  else:
    # The reference is the float64 gradient rounded to bf16: one rounding of a float32 value close to it can land
    # on the neighbouring bf16 number, never further.
    reference = want_grad.astype(ml_dtypes.bfloat16).astype(np.float64)
    errors = {name: np.max(_bf16_ulps(g, reference)) for name, (_, g) in results.items()}
    assert errors["autodiff"] <= 1, errors
    assert errors["custom"] <= 1, errors
  print(f"{np.dtype(dtype).name} logits, largest gradient error: {errors}")
  assert errors["custom"] <= errors["autodiff"], errors


def _head_loss(cross_entropy):
  """A tiny LM head: hidden [B, T, E] @ kernel [E, V] -> logits in the parameters' dtype -> mean CE."""

  def loss(hidden, kernel, targets, weights):
    return mean_loss(cross_entropy)(hidden @ kernel, targets, weights)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lm_head_gradients_match_autodiff_formula(dtype):
  rng = np.random.default_rng(1)
  _, targets, weights = _inputs(1)
  hidden = jnp.asarray(rng.normal(0.0, 1.0, (BATCH, LENGTH, EMBED)), dtype)
  kernel = jnp.asarray(rng.normal(0.0, 2.0, (EMBED, VOCAB)), dtype)  # logits of std ~8
  args = (hidden, kernel, jnp.asarray(targets), jnp.asarray(weights))
  got_loss, got_grads = _head_loss(cross_entropy_sum)(*args)
  want_loss, want_grads = _head_loss(autodiff_cross_entropy_sum)(*args)
  assert float(got_loss) == float(want_loss)
  for got, want in zip(got_grads, want_grads):
    assert got.dtype == dtype
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    # Both build d_logits as exp(x - max) * (g / sum) - onehot * g in float32 and round it once to `dtype`; the
    # GEMMs that follow may differ only in XLA's choices, by rounding: one ulp of dtype at the gradient's scale.
    ulp = 2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -23
    np.testing.assert_allclose(got, want, rtol=0, atol=ulp * np.max(np.abs(want)))


# token_logprobs: log softmax(logits / temperature)[target], the RL policy's log-probs.


def old_token_logprobs(logits, targets, temperature):
  """The formula rl.losses.token_logprobs used before the custom backward; jax differentiates it."""
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def weighted_logprob_sum(logprobs, temperature):
  """A policy loss's shape: per-token log-probs times per-token coefficients of either sign (0 where masked)."""
  return lambda logits, targets, coefficients: jnp.sum(logprobs(logits, targets, temperature) * coefficients)


def _float64_logprobs(logits, targets, coefficients, temperature):
  """(log-probs [B, T], gradient of sum(log-probs x coefficients) w.r.t. logits [B, T, V]) in float64."""
  scaled = logits / temperature
  shifted = scaled - scaled.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  one_hot = np.zeros_like(logits)
  np.put_along_axis(one_hot, targets[..., None], 1.0, axis=-1)
  grad = (one_hot - np.exp(log_probs)) * (coefficients / temperature)[..., None]
  return np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0], grad


@pytest.fixture(scope="module")
def logprob_case():
  logits, targets, weights = _inputs(2)
  coefficients = np.random.default_rng(2).normal(0.0, 1.0, weights.shape).astype(np.float32) * weights
  return logits, targets, coefficients


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logprobs_are_bitwise_the_old_formula(logprob_case, dtype, temperature):
  # Bitwise: with rl_replay_logprobs the trainer's log-probs must equal the engine's, computed by the old formula.
  logits64, targets, coefficients = logprob_case
  args = (jnp.asarray(logits64, dtype), jnp.asarray(targets))
  want = jax.jit(old_token_logprobs, static_argnums=2)(*args, temperature)
  got = jax.jit(token_logprobs, static_argnums=2)(*args, temperature)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert got.dtype == jnp.float32
  # Also the log-probs that the differentiated forward (the custom_vjp's fwd rule) computes.
  primal = jax.jit(lambda x, t: jax.vjp(lambda x: token_logprobs(x, t, temperature), x)[0])(*args)
  np.testing.assert_array_equal(np.asarray(primal), np.asarray(want))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logprob_gradients_match_float64(logprob_case, dtype, temperature):
  logits64, targets, coefficients = logprob_case
  logits = jnp.asarray(logits64, dtype)
  want_logp, want_grad = _float64_logprobs(np.asarray(logits, np.float64), targets, coefficients, temperature)
  got_logp = jax.jit(token_logprobs, static_argnums=2)(logits, jnp.asarray(targets), temperature)
  # float32 rounding of x / temperature, of x[t] - max and of log(sum): a few ulps of values up to ~90.
  np.testing.assert_allclose(np.asarray(got_logp, np.float64), want_logp, rtol=1e-6, atol=2e-5)

  errors, grads = {}, {}
  for name, logprobs in [("custom", token_logprobs), ("autodiff", old_token_logprobs)]:
    grad = jax.jit(jax.grad(weighted_logprob_sum(logprobs, temperature)))(logits, jnp.asarray(targets),
                                                                         jnp.asarray(coefficients))
    assert grad.dtype == dtype
    grads[name] = np.asarray(grad, np.float64)
  assert np.all(grads["custom"][coefficients == 0] == 0)

  if dtype == jnp.float32:
    # Relative to each element: exp(x / temperature - max) sees its argument rounded to float32 (up to ~90 here,
    # and the temperature itself rounded to float32 when it is not 1).
    errors = {name: np.max(np.abs(g - want_grad) / np.maximum(np.abs(want_grad), 1e-30)) for name, g in grads.items()}
    assert errors["custom"] <= 1e-5, errors
  else:
    # One rounding to bf16 of a float32 value close to the float64 gradient: at most the neighbouring bf16 number.
    # Except below float32's normal range (exp(-86) x coefficient here), where XLA on CPU flushes float32 to zero
    # on both paths: there only the size is checked. (The old path also flushes d/d(x / temperature) before its
    # division by the temperature, so some gradients just above float32's smallest normal come out 0 there.)
    reference = want_grad.astype(ml_dtypes.bfloat16).astype(np.float64)
    tiny = np.finfo(np.float32).tiny
    normal = np.abs(reference) >= tiny
    errors = {name: np.max(_bf16_ulps(g, reference)[normal]) for name, g in grads.items()}
    assert np.all(np.abs(grads["custom"][~normal]) < tiny)
    assert errors["custom"] <= 1, errors
  print(f"{np.dtype(dtype).name} logits, temperature {temperature}, largest gradient error: {errors}")
  assert errors["custom"] <= errors["autodiff"], errors
