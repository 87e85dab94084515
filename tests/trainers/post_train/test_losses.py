"""The RL objectives against a float64 numpy implementation written from the formulas (docs/rl.md): values and
gradients with respect to the policy's log-probs, over several masks and response lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.trainers.post_train.rl import losses
from maxtext.trainers.post_train.rl.losses import PolicyLossOptions

EPS_LOW, EPS_HIGH, CAP = 0.2, 0.28, 2.0


def random_batch(seed: int, lengths_per_row: list[list[int]], length: int = 16):
  """Packed rows [R, T]: responses of the given lengths (after a 2-token gap standing for their prompts)."""
  rng = np.random.default_rng(seed)
  rows = len(lengths_per_row)
  mask = np.zeros((rows, length), np.float32)
  seq_ids = np.zeros((rows, length), np.int32)
  advantages = np.zeros((rows, length), np.float32)
  spans, seq = [], 0
  for row, lengths in enumerate(lengths_per_row):
    cursor = 0
    for n in lengths:
      cursor += 2
      mask[row, cursor : cursor + n] = 1
      seq_ids[row, cursor : cursor + n] = seq
      advantages[row, cursor : cursor + n] = rng.normal()
      spans.append((row, cursor, cursor + n))
      cursor += n
      seq += 1
  shape = (rows, length)
  logp = -rng.uniform(0.05, 3.0, shape)
  old = logp + rng.normal(0, 0.3, shape)  # ratios from ~0.4 to ~2.5: both clip sides are hit
  rollout = old + rng.normal(0, 0.5, shape)
  ref = logp + rng.normal(0, 0.4, shape)
  return dict(logp=logp, old=old, rollout=rollout, ref=ref, mask=mask, seq_ids=seq_ids, adv=advantages,
              spans=spans)


CASES = {
    "one_row_mixed_lengths": [[1, 5, 3]],
    "two_rows_padded": [[4, 2], [7]],
    "single_tokens": [[1, 1, 1], [1, 1]],
    "long_and_short": [[12], [1, 3, 2]],
}


# ---- float64 numpy, from the formulas ----
def np_tis(b, algorithm):
  w = np.zeros_like(b["logp"])
  for row, s, e in b["spans"]:
    if algorithm == "grpo":
      w[row, s:e] = np.minimum(np.exp(b["old"][row, s:e] - b["rollout"][row, s:e]), CAP)
    else:
      w[row, s:e] = min(np.exp(np.mean(b["old"][row, s:e] - b["rollout"][row, s:e])), CAP)
  return w


def np_kl(logp, ref, kl_type):
  if kl_type == "k1":
    return logp - ref, np.ones_like(logp)
  d = ref - logp
  return np.exp(d) - d - 1, 1 - np.exp(d)  # value, d/dlogp


def np_loss(b, algorithm, aggregation, kl_coef=0.0, kl_type="k3", tis=True):
  """(loss, d loss / d logp [R, T]) in float64."""
  spans = b["spans"]
  n_tokens, n_seqs = sum(e - s for _, s, e in spans), len(spans)
  w = np_tis(b, algorithm) if tis else np.ones_like(b["logp"])
  loss, grad = 0.0, np.zeros_like(b["logp"])
  for row, s, e in spans:
    lp, old, a = b["logp"][row, s:e], b["old"][row, s:e], b["adv"][row, s]
    n = e - s
    if algorithm == "grpo":
      r = np.exp(lp - old)
      unclipped, clipped = r * a, np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH) * a
      per_token = -np.minimum(unclipped, clipped) * w[row, s:e]
      d_token = np.where(unclipped <= clipped, -r * a, 0.0) * w[row, s:e]
      scale = 1 / n_tokens if aggregation == "token_mean" else 1 / (n * n_seqs)
      loss += per_token.sum() * scale
      grad[row, s:e] += d_token * scale
    else:
      sr = np.exp(np.mean(lp - old))
      unclipped, clipped = sr * a, np.clip(sr, 1 - EPS_LOW, 1 + EPS_HIGH) * a
      per_seq = -min(unclipped, clipped) * w[row, s]
      d_seq = (-sr * a if unclipped <= clipped else 0.0) * w[row, s] / n  # d s / d logp_t = s / n
      scale = n / n_tokens if aggregation == "token_mean" else 1 / n_seqs
      loss += per_seq * scale
      grad[row, s:e] += d_seq * scale
    if kl_coef:
      k, dk = np_kl(lp, b["ref"][row, s:e], kl_type)
      scale = 1 / n_tokens if aggregation == "token_mean" else 1 / (n * n_seqs)
      loss += kl_coef * k.sum() * scale
      grad[row, s:e] += kl_coef * dk * scale
  return loss, grad


def ours(b, algorithm, aggregation, kl_coef=0.0, kl_type="k3", tis=True):
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  options = PolicyLossOptions(algorithm, EPS_LOW, EPS_HIGH, aggregation, kl_coef, kl_type)
  weights = losses.importance_weights(f32(b["old"]), f32(b["rollout"]), f32(b["mask"]), b["seq_ids"],
                                      CAP if tis else 0.0, algorithm)
  n_tokens, n_seqs = f32(b["mask"].sum()), f32(len(b["spans"]))

  def loss(logp):
    value, _ = losses.policy_loss(logp, f32(b["old"]), f32(b["adv"]), f32(b["mask"]), b["seq_ids"], weights,
                                  n_tokens, n_seqs, options, ref_logp=f32(b["ref"]) if kl_coef else None)
    return value

  value, grad = jax.value_and_grad(loss)(f32(b["logp"]))
  return float(value), np.asarray(grad, np.float64)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("algorithm,aggregation", [("grpo", "token_mean"), ("grpo", "sequence_mean"),
                                                   ("gspo", "sequence_mean"), ("gspo", "token_mean")])
def test_policy_loss_matches_float64_formulas(case, algorithm, aggregation):
  b = random_batch(sorted(CASES).index(case), CASES[case])
  want, want_grad = np_loss(b, algorithm, aggregation)
  got, got_grad = ours(b, algorithm, aggregation)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=2e-5, atol=1e-6)
  assert np.abs(want_grad).sum() > 0.01  # the case has gradient to compare


@pytest.mark.parametrize("kl_type", ["k1", "k3"])
@pytest.mark.parametrize("algorithm", ["grpo", "gspo"])
def test_kl_term_matches_float64_formulas(kl_type, algorithm):
  b = random_batch(7, CASES["two_rows_padded"])
  want, want_grad = np_loss(b, algorithm, "token_mean", kl_coef=0.3, kl_type=kl_type, tis=False)
  got, got_grad = ours(b, algorithm, "token_mean", kl_coef=0.3, kl_type=kl_type, tis=False)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=2e-5, atol=1e-6)


def test_clipping_is_active_in_the_cases():
  """The random ratios reach both clip bounds, so the tests above check the clipped branches too."""
  b = random_batch(3, CASES["long_and_short"])
  r = np.exp(b["logp"] - b["old"])[b["mask"] > 0]
  assert (r < 1 - EPS_LOW).any() and (r > 1 + EPS_HIGH).any()


@pytest.mark.parametrize("algorithm", ["grpo", "gspo"])
def test_importance_weights_match_float64_and_are_capped(algorithm):
  b = random_batch(11, CASES["one_row_mixed_lengths"])
  got = losses.importance_weights(jnp.float32(b["old"]), jnp.float32(b["rollout"]), jnp.float32(b["mask"]),
                                  b["seq_ids"], CAP, algorithm)
  want = np_tis(b, algorithm)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert np.asarray(got).max() <= CAP
  off = losses.importance_weights(jnp.float32(b["old"]), jnp.float32(b["rollout"]), jnp.float32(b["mask"]),
                                  b["seq_ids"], 0.0, algorithm)
  assert np.all(np.asarray(off) == 1.0)


def test_group_advantages_match_float64():
  rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0.5, 0.25, 1.0])
  got = losses.group_advantages(rewards, 4, normalize_std=True)
  grouped = rewards.reshape(3, 4)
  want = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-6)
  assert np.all(got[4:8] == 0)  # a group of equal rewards carries no signal
  centred = losses.group_advantages(rewards, 4, normalize_std=False)
  np.testing.assert_allclose(centred, (grouped - grouped.mean(1, keepdims=True)).reshape(-1), rtol=1e-6)


def test_mismatch_metrics_match_float64():
  b = random_batch(5, CASES["two_rows_padded"])
  got = jax.device_get(losses.mismatch_sums(jnp.float32(b["old"]), jnp.float32(b["rollout"]), jnp.float32(b["mask"])))
  m = b["mask"] > 0
  d = (b["old"] - b["rollout"])[m]
  np.testing.assert_allclose(got["abs_sum"], np.abs(d).sum(), rtol=1e-5)
  np.testing.assert_allclose(got["abs_max"], np.abs(d).max(), rtol=1e-6)
  np.testing.assert_allclose(got["rel_max"], (np.abs(d) / np.maximum(1.0, np.abs(b["rollout"][m]))).max(), rtol=1e-6)
  np.testing.assert_allclose(got["k3_sum"], (np.exp(d) - d - 1).sum(), rtol=1e-5)


def test_token_logprobs_match_float64_with_temperature():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (2, 5, 11))
  targets = rng.integers(0, 11, (2, 5))
  for temperature in (1.0, 0.7):
    x = logits / temperature
    want = x - np.log(np.exp(x).sum(-1, keepdims=True))
    want = np.take_along_axis(want, targets[..., None], -1)[..., 0]
    got = losses.token_logprobs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), targets, temperature)
    np.testing.assert_allclose(np.asarray(got), want, atol=0.05)  # bf16 logits in
    got32 = losses.token_logprobs(jnp.asarray(logits, jnp.float32), targets, temperature)
    np.testing.assert_allclose(np.asarray(got32), want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_are_bitwise_the_engines_for_the_same_logits():
  # One formulation on both sides, so the train/rollout mismatch measures the logits alone (x[t] - logsumexp(x)
  # rounds differently: ~1e-7 of the float32 mismatch came from that).
  from maxtext.inference.sampling import token_logprobs as engine_logprobs  # noqa: PLC0415

  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(0, 4, (3, 7, 50)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (3, 7)))
  ours = jax.jit(losses.token_logprobs)(logits, targets)
  theirs = jax.jit(lambda x, t: engine_logprobs(x, t, 0)[0])(logits, targets)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
