"""Per-token cross-entropy -log softmax(logits)[target] and log-probs log softmax(logits / temperature)[target],
each with a hand-written backward.

Autodiff of `logsumexp(logits.astype(f32)) - logits[target]` builds the logits' cotangent in float32 and then
converts it to the logits' dtype for the LM head's GEMMs: at a vocabulary of ~150k that is two full [B, T, V]
float32 passes over memory (~1.8 ms per 4k tokens on an H200) for a tensor that is consumed in bf16 (in RL, with
~64 x 769 tokens, the float32 cotangent alone is ~30 GB). The backwards here write d_logits once, in the logits' own
dtype, computed in float32 from the logits (saved as they came) and the float32 softmax statistics [B, T]:
(softmax - onehot(target)) * g for the cross-entropy, (onehot(target) - softmax(logits / temperature)) * g /
temperature for the log-probs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _softmax_statistics(logits_f32: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(row max [B, T], sum of exp(logits - max) [B, T]), float32; the steps of jax.nn.logsumexp, so the loss rounds
  as it did when computed with it. (jax.nn.log_softmax takes the same steps without the finite-max guard, which
  selects the max itself on every row with a finite max, and yields NaN on the others either way.)"""
  row_max = jnp.max(logits_f32, axis=-1)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  exp_sum = jnp.sum(jnp.exp(logits_f32 - row_max[..., None]), axis=-1)
  return row_max, exp_sum


def _target_values(values: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.take_along_axis(values, targets[..., None], axis=-1)[..., 0]


def _scaled_f32(logits: jax.Array, temperature: float) -> jax.Array:
  """logits / temperature in float32, by the same ops in the forward and the backward (so they round alike)."""
  logits_f32 = logits.astype(jnp.float32)
  return logits_f32 if temperature == 1.0 else logits_f32 / temperature


def _softmax_minus_onehot(logits, targets, row_max, exp_sum, scale, temperature: float) -> jax.Array:
  """(softmax(logits / temperature) - onehot(target)) * scale, in float32 and cast once to the logits' dtype, in
  one elementwise pass over [B, T, V]; scale [B, T] f32. The float32 terms are the ones autodiff of logsumexp forms
  (exp(x - max) * (scale / sum)), so they round alike."""
  unnormalised = jnp.exp(_scaled_f32(logits, temperature) - row_max[..., None])
  vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
  target_scale = jnp.where(vocab == targets[..., None], scale[..., None], 0.0)
  return (unnormalised * (scale / exp_sum)[..., None] - target_scale).astype(logits.dtype)


# Residuals of both functions: the logits in their own dtype (the LM head's output, alive for its backward anyway),
# never a float32 copy, and the normaliser as (max, sum) rather than max + log(sum): exp(x - max) / sum keeps the
# float32 relative error of every probability at a few ulps, while exp(x - log_normaliser) inherits the rounding of
# log_normaliser (|x| ~ 30 -> ~1e-6 relative), which shows up as extra bf16 roundings of d_logits.


@jax.custom_vjp
def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits [B, T, V] any float dtype, targets [B, T] int -> -log softmax(logits)[target] [B, T] float32."""
  return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
  logits_f32 = logits.astype(jnp.float32)
  row_max, exp_sum = _softmax_statistics(logits_f32)
  log_normaliser = jnp.log(exp_sum) + row_max
  return log_normaliser - _target_values(logits_f32, targets), (logits, targets, row_max, exp_sum)


def _cross_entropy_bwd(residuals, g):
  logits, targets, row_max, exp_sum = residuals  # [B, T, V] as given, [B, T] int, [B, T] f32, [B, T] f32
  return _softmax_minus_onehot(logits, targets, row_max, exp_sum, g, 1.0), None  # integer targets: no cotangent


token_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
  """logits [B, T, V] any float dtype, targets [B, T] int, temperature a Python float -> log softmax(logits /
  temperature)[target] [B, T] float32.

  The value is bitwise that of jax.nn.log_softmax(logits.astype(f32) / temperature)[target]: the same ops,
  (x[t] - max) - log sum exp(x - max), which is also how the inference engine computes its log-probs
  (sampling.token_logprobs), so equal logits give equal log-probs on both sides."""
  return _logprobs_fwd(logits, targets, temperature)[0]


def _logprobs_fwd(logits, targets, temperature):
  scaled = _scaled_f32(logits, temperature)
  row_max, exp_sum = _softmax_statistics(scaled)
  logp = (_target_values(scaled, targets) - row_max) - jnp.log(exp_sum)
  return logp, (logits, targets, row_max, exp_sum)


def _logprobs_bwd(temperature, residuals, g):
  logits, targets, row_max, exp_sum = residuals  # [B, T, V] as given, [B, T] int, [B, T] f32, [B, T] f32
  # d logp / d logits = (onehot - softmax(logits / temperature)) / temperature.
  d_logits = _softmax_minus_onehot(logits, targets, row_max, exp_sum, -g / temperature, temperature)
  return d_logits, None


token_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)
