"""Speculative sampling: drafts drawn from the MTP head's distribution q, verified against the model's p so that the
emitted tokens are distributed exactly as plain sampling from p (Leviathan et al. 2023, Chen et al. 2023).

Per row and round, with drafts d_1..d_k drawn from q_1..q_k and the verification pass's p_0..p_k (p_j predicts the
token after d_j, d_0 being the row's newest token): draft j is accepted with probability min(1, p_(j-1)(d_j) /
q_j(d_j)), in order, up to the first rejection; after a rejection at j the next token is drawn from
norm(max(p_(j-1) - q_j, 0)), after k acceptances from p_k. p and q are the processed distributions
(sampling.distribution: temperature, top-k, top-p, min-p), so a greedy row (one-hot p and q) reproduces greedy
decoding. Fixed shapes throughout: every row returns k + 1 token slots and the count of valid ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxtext.inference.sampling import BatchSampling, distribution

# fold_in tags of a round's random streams (after fold_in(request key, step)); drafts take _DRAFT + their index.
_ACCEPT, _RESIDUAL, _DRAFT = 1, 2, 3


def round_keys(sampling: BatchSampling, step: jax.Array) -> jax.Array:
  """[B] keys of one round: fold_in(request key, step), so a request's draws do not depend on its batch mates."""
  steps = jnp.broadcast_to(jnp.asarray(step), sampling.keys.shape)
  return jax.vmap(jax.random.fold_in)(sampling.keys, steps)


def _tagged(keys: jax.Array, tag: int) -> jax.Array:
  return jax.vmap(lambda key: jax.random.fold_in(key, tag))(keys)


def draw_draft(logits: jax.Array, sampling: BatchSampling, keys: jax.Array, index: int,
               filtered: bool) -> tuple[jax.Array, jax.Array]:
  """Draft `index` of a round from the MTP logits [B, V] -> (token [B] int32, q [B, V] it was drawn from)."""
  q = distribution(logits, sampling, filtered=filtered)
  token = jax.vmap(jax.random.categorical)(_tagged(keys, _DRAFT + index), jnp.log(q))
  return token.astype(jnp.int32), q


def target_distributions(logits: jax.Array, sampling: BatchSampling, filtered: bool) -> jax.Array:
  """Verification logits [B, k + 1, V] -> p [B, k + 1, V] (each position processed with its row's settings)."""
  per_position = lambda x: distribution(x, sampling, filtered=filtered)
  return jax.vmap(per_position, in_axes=1, out_axes=1)(logits)


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
  """What the token after a rejected draft is drawn from: max(p - q, 0) [B, V] (unnormalised; the draw normalises).
  A rejection has probability 0 where p = q, but rounding can still leave it all zero: p itself then."""
  rest = jnp.maximum(p - q, 0.0)
  return jnp.where(jnp.sum(rest, axis=-1, keepdims=True) > 0, rest, p)


def accept_and_correct(drafts: jax.Array, q: jax.Array, p: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """drafts [B, k] drawn from q [B, k, V]; p [B, k + 1, V]; keys [B] -> (accepted drafts [B] in 0..k, tokens
  [B, k + 1]: the accepted drafts, then the corrected or bonus token at index `accepted`; later slots are 0)."""
  batch, k = drafts.shape
  u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_tagged(keys, _ACCEPT))  # [B, k] in [0, 1)
  p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
  q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  # u < p / q without dividing: q(d) > 0 for a drawn draft; p(d) = 0 (a token p never draws) always rejects.
  accepted = jnp.sum(jnp.cumprod(u * q_draft < p_draft, axis=1), axis=1).astype(jnp.int32)
  at = accepted[:, None, None]
  p_next = jnp.take_along_axis(p, at, axis=1)[:, 0]  # [B, V]
  # After k acceptances there is no draft to correct for: q of "draft k + 1" is 0, so the residual is p_k itself.
  q_next = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1), at, axis=1)[:, 0]
  corrected = jax.vmap(jax.random.categorical)(_tagged(keys, _RESIDUAL), jnp.log(residual(p_next, q_next)))
  corrected = corrected.astype(jnp.int32)
  slots = jnp.arange(k + 1)[None, :]
  padded = jnp.concatenate([drafts, jnp.zeros((batch, 1), jnp.int32)], axis=1)
  tokens = jnp.where(slots < accepted[:, None], padded, jnp.where(slots == accepted[:, None], corrected[:, None], 0))
  return accepted, tokens
