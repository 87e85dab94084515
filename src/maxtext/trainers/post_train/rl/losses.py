"""The RL objectives as pure functions of per-token arrays (docs/rl.md, ../shared/reference/rl.md).

Every array is [B, T] over packed training rows: `mask` is 1 on response tokens (the sampled ones), `seq_ids` numbers
the responses of the batch 0..S-1 (any id where mask is 0). Sums are normalised by totals passed in (`num_tokens`,
`num_sequences` of the whole optimizer step), so micro-batches of one step add up to the step's loss and gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from maxtext.trainers import cross_entropy


@dataclasses.dataclass(frozen=True)
class PolicyLossOptions:
  algorithm: str  # grpo | gspo
  eps_low: float  # ratio clipped below at 1 - eps_low
  eps_high: float  # and above at 1 + eps_high
  aggregation: str  # token_mean | sequence_mean
  kl_coef: float = 0.0
  kl_type: str = "k3"  # k1 | k3


def group_advantages(rewards: np.ndarray, group_size: int, normalize_std: bool, eps: float = 1e-6) -> np.ndarray:
  """rewards [N] (N = groups x group_size, a group's responses adjacent) -> advantages [N]: r - mean of the group,
  divided by (std of the group + eps) when normalize_std (GRPO). Population std, as torch.std(unbiased=False)."""
  grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)
  centred = grouped - grouped.mean(axis=1, keepdims=True)
  if normalize_std:
    centred = centred / (grouped.std(axis=1, keepdims=True) + eps)
  return centred.reshape(-1).astype(np.float32)


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[target]: logits [B, T, V] any dtype -> [B, T] float32.

  The formulation of the engine's log-probs (sampling.token_logprobs: (x - max) - log sum exp(x - max)), so equal
  logits give bitwise-equal log-probs on both sides. x[t] - logsumexp(x) rounds differently (the sum max + log S
  rounds first): that alone made a float32 train/rollout mismatch of ~1e-7 mean, 5e-7 max. The backward
  (cross_entropy.token_logprobs) writes d_logits once in the logits' dtype: no float32 [B, T, V] cotangent."""
  return cross_entropy.token_logprobs(logits, targets, float(temperature))


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kl_type: str) -> jax.Array:
  """Per-token estimate of KL(pi || ref) from tokens sampled by pi: k1 = logp - ref, k3 = e^(ref - logp) -
  (ref - logp) - 1 (non-negative, lower variance)."""
  if kl_type == "k1":
    return logp - ref_logp
  if kl_type == "k3":
    delta = ref_logp - logp
    return jnp.expm1(delta) - delta  # = e^delta - 1 - delta, without cancelling to 0 for small delta
  raise ValueError(f"kl_type must be k1 or k3, got {kl_type!r}")


def _segment_sum(values: jax.Array, seq_ids: jax.Array, num_segments: int) -> jax.Array:
  return jax.ops.segment_sum(values.reshape(-1), seq_ids.reshape(-1), num_segments=num_segments)


def sequence_means(values: jax.Array, mask: jax.Array, seq_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean of `values` over each response's masked tokens [S], tokens per response [S]); S = B * T (static)."""
  num_segments = mask.size
  lengths = _segment_sum(mask, seq_ids, num_segments)
  sums = _segment_sum(values * mask, seq_ids, num_segments)
  return sums / jnp.maximum(lengths, 1.0), lengths


def _aggregate(per_token: jax.Array, mask, seq_ids, aggregation: str, num_tokens, num_sequences) -> jax.Array:
  """token_mean: sum over masked tokens / num_tokens; sequence_mean: sum over responses of their token mean /
  num_sequences."""
  if aggregation == "token_mean":
    return jnp.sum(per_token * mask) / num_tokens
  if aggregation == "sequence_mean":
    means, lengths = sequence_means(per_token, mask, seq_ids)
    return jnp.sum(jnp.where(lengths > 0, means, 0.0)) / num_sequences
  raise ValueError(f"aggregation must be token_mean or sequence_mean, got {aggregation!r}")


def importance_weights(old_logp: jax.Array, rollout_logp: jax.Array, mask: jax.Array, seq_ids: jax.Array, cap: float,
                       algorithm: str) -> jax.Array:
  """Truncated importance sampling weights [B, T] for the train/rollout mismatch (constants, no gradient):
  grpo: min(pi_old / pi_rollout, cap) per token; gspo: min(exp(mean_t(logp_old - logp_rollout)), cap) per
  response, repeated on its tokens. cap 0: all ones."""
  if cap == 0:
    return jnp.ones_like(old_logp)
  log_ratio = (old_logp - rollout_logp) * mask
  if algorithm == "gspo":
    means, _ = sequence_means(log_ratio, mask, seq_ids)
    log_ratio = means[seq_ids]
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_ratio), cap) * mask)


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    seq_ids: jax.Array,
    is_weights: jax.Array,
    num_tokens: jax.Array,
    num_sequences: jax.Array,
    options: PolicyLossOptions,
    ref_logp: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metric sums) of the clipped objective (+ kl_coef x KL to ref_logp when given).

  grpo: per token -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) x w, rho = exp(logp - old), aggregated as
  options.aggregation. gspo: per response s = exp(mean_t(logp - old)), -min(s A, clip(s, ...) A) x w;
  token_mean weighs each response by its length / num_tokens, sequence_mean by 1 / num_sequences.
  Metric sums (divide by the step's totals): clipped tokens or responses, sum of ratios, KL sum per token; and the
  largest |ratio - 1| (exactly 0 on a step's first update when the old log-probs are the trainer's own).
  """
  mask = mask.astype(jnp.float32)
  low, high = 1.0 - options.eps_low, 1.0 + options.eps_high
  if options.algorithm == "grpo":
    ratio = jnp.exp(logp - old_logp)
    unclipped, clipped = ratio * advantages, jnp.clip(ratio, low, high) * advantages
    per_token = -jnp.minimum(unclipped, clipped) * is_weights
    loss = _aggregate(per_token, mask, seq_ids, options.aggregation, num_tokens, num_sequences)
    clip_count = jnp.sum((clipped < unclipped) * mask)
    ratio_sum = jnp.sum(ratio * mask)
    ratio_deviation = jnp.max(jnp.abs(ratio - 1.0) * mask)
  elif options.algorithm == "gspo":
    log_ratio, lengths = sequence_means(logp - old_logp, mask, seq_ids)
    seq_adv, _ = sequence_means(advantages, mask, seq_ids)
    seq_w, _ = sequence_means(is_weights, mask, seq_ids)
    ratio = jnp.exp(log_ratio)
    unclipped, clipped = ratio * seq_adv, jnp.clip(ratio, low, high) * seq_adv
    per_seq = -jnp.minimum(unclipped, clipped) * seq_w
    present = lengths > 0
    if options.aggregation == "token_mean":
      loss = jnp.sum(jnp.where(present, per_seq * lengths, 0.0)) / num_tokens
    else:
      loss = jnp.sum(jnp.where(present, per_seq, 0.0)) / num_sequences
    clip_count = jnp.sum((clipped < unclipped) * present)
    ratio_sum = jnp.sum(jnp.where(present, ratio, 0.0))
    ratio_deviation = jnp.max(jnp.where(present, jnp.abs(ratio - 1.0), 0.0))
  else:
    raise ValueError(f"algorithm must be grpo or gspo, got {options.algorithm!r}")
  sums = {"clipped": clip_count, "ratio": ratio_sum, "ratio_deviation_max": ratio_deviation}
  if ref_logp is not None:
    kl = kl_estimate(logp, ref_logp, options.kl_type)
    kl_loss = _aggregate(kl, mask, seq_ids, options.aggregation, num_tokens, num_sequences)
    loss = loss + options.kl_coef * kl_loss
    sums["kl"] = jnp.sum(kl * mask)
  return loss, sums


def mismatch_sums(train_logp: jax.Array, rollout_logp: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Train/rollout mismatch over response tokens: sum and max of |logp_train - logp_rollout|, its max relative to
  max(1, |logp_rollout|) (float32 rounding grows with the log-prob's magnitude: an unlikely token's -40 carries 32x
  the rounding of a likely one's -1) and the sum of k3 KL(rollout || train) = e^(train - rollout) - (train - rollout)
  - 1 (samples come from the rollout)."""
  mask = mask.astype(jnp.float32)
  delta = train_logp - rollout_logp
  return {
      "abs_sum": jnp.sum(jnp.abs(delta) * mask),
      "abs_max": jnp.max(jnp.abs(delta) * mask),
      "rel_max": jnp.max(jnp.abs(delta) * mask / jnp.maximum(1.0, jnp.abs(rollout_logp))),
      "k3_sum": jnp.sum((jnp.expm1(delta) - delta) * mask),
  }
