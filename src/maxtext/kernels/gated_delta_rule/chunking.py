"""The parallel part of the chunked gated delta rule: everything that stays inside one chunk.

`prepare_chunks` turns the model's tensors into the inputs of the inter-chunk recurrence (inter_chunk.py);
`merge_chunks` turns its output back. Both are plain jnp, so JAX differentiates them; only the recurrence needs
hand-written kernels and a custom vjp.

Packed sequences (segment_ids) never leak state across documents: inside a chunk every token-pair term is masked to
the same segment, a token sees the carried state only if it belongs to the segment that state came from, and only
the chunk's last segment feeds the outgoing state. With contiguous segments this is exact, with no -inf tricks.
The initial state, when given, belongs to the first segment of each row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

_HIGHEST = jax.lax.Precision.HIGHEST
L2_NORM_EPS = 1e-6


class ChunkInputs(NamedTuple):
  """Inputs of the inter-chunk recurrence, [B, H, N, C, ...], float32 (H = value heads)."""

  q: jax.Array  # [B, H, N, C, Dk], scaled and decayed from the chunk start, zero where the carried state is unseen
  k: jax.Array  # [B, H, N, C, Dk], decayed to the chunk end, zero outside the chunk's last segment
  w: jax.Array  # [B, H, N, C, Dk], WY form: what the carried state predicts for each token's value
  u: jax.Array  # [B, H, N, C, Dv], WY form: the chunk's own corrected values
  intra: jax.Array  # [B, H, N, C, C], causal, same-segment q.k scores with decay
  decay: jax.Array  # [B, H, N], how much of the carried state survives the chunk


def reciprocal_l2_norm(x: jax.Array, eps: float = L2_NORM_EPS) -> jax.Array:
  """1 / sqrt(x.x + eps) over the last axis (removed): l2_normalize's factor."""
  return jax.lax.rsqrt(jnp.sum(x * x, axis=-1) + eps)


def l2_normalize(x: jax.Array, eps: float = L2_NORM_EPS) -> jax.Array:
  return x * reciprocal_l2_norm(x, eps)[..., None]


def _mm(spec: str, a: jax.Array, b: jax.Array, precision=_HIGHEST) -> jax.Array:
  return jnp.einsum(spec, a, b, precision=precision)


def _inverse_by_doubling(lower: jax.Array) -> jax.Array:
  """(I + lower)^-1 for strictly lower [..., C, C], C a power of two, by merging diagonal blocks pairwise.

  inv([[A, 0], [B, D]]) = [[inv(A), 0], [-inv(D) B inv(A), inv(D)]]: log2(C) rounds of batched products, all
  plain matmuls (no triangular solve kernel), as stable as blocked forward substitution.
  """
  *batch, size, _ = lower.shape
  blocks = jnp.ones((*batch, size, 1, 1), lower.dtype)  # inverses of the 1x1 diagonal blocks
  half = 1
  while half < size:
    pairs = size // (2 * half)
    lower_left = lower.reshape(*batch, pairs, 2, half, pairs, 2, half)[..., :, 1, :, :, 0, :]
    lower_left = jnp.moveaxis(jnp.diagonal(lower_left, axis1=-4, axis2=-2), -1, -3)  # [..., pairs, half, half]
    upper_inv, lower_inv = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
    merged = -_mm("...ij,...jk->...ik", lower_inv, _mm("...ij,...jk->...ik", lower_left, upper_inv))
    blocks = jnp.concatenate(
        [jnp.concatenate([upper_inv, jnp.zeros_like(upper_inv)], -1), jnp.concatenate([merged, lower_inv], -1)], -2
    )
    half *= 2
  return blocks[..., 0, :, :]


@jax.custom_vjp
def _unit_lower_inverse(lower: jax.Array) -> jax.Array:
  """(I + lower)^-1 for strictly lower [..., C, C]."""
  size = lower.shape[-1]
  if size & (size - 1):
    eye = jnp.broadcast_to(jnp.eye(size, dtype=lower.dtype), lower.shape)
    return solve_triangular(lower + eye, eye, lower=True, unit_diagonal=True)
  return _inverse_by_doubling(lower)


def _unit_lower_inverse_forward(lower):
  inverse = _unit_lower_inverse(lower)
  return inverse, inverse


def _unit_lower_inverse_backward(inverse, d_inverse):
  # d(A^-1) = -A^-1 dA A^-1, so dL = -A^-T dT A^-T, kept on L's strictly lower support.
  d_lower = -_mm("...ji,...jk->...ik", inverse, _mm("...ij,...kj->...ik", d_inverse, inverse))
  return (jnp.tril(d_lower, -1),)


_unit_lower_inverse.defvjp(_unit_lower_inverse_forward, _unit_lower_inverse_backward)


def _solve_unit_lower(lower: jax.Array, rhs: jax.Array, method: str, precision) -> jax.Array:
  """(I + lower)^-1 rhs: by a triangular solve, or (method 'inverse') as the explicit inverse times rhs."""
  if method == "solve_triangular":
    system = lower + jnp.eye(lower.shape[-1], dtype=lower.dtype)
    return solve_triangular(system, rhs, lower=True, unit_diagonal=True)
  if method == "inverse":
    return _mm("...ij,...jd->...id", _unit_lower_inverse(lower), rhs, precision)
  raise ValueError(f"unknown triangular solve method '{method}': choose 'solve_triangular' or 'inverse'")


def check_shapes(q, k, v, g, beta, initial_state, segment_ids) -> None:
  """Raise a ValueError naming the first argument whose shape does not fit q's."""
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"q and k must both be [B, T, Hk, Dk]; got q {q.shape}, k {k.shape}")
  batch, length, key_heads, key_dim = q.shape
  if v.ndim != 4 or v.shape[:2] != (batch, length) or v.shape[2] % key_heads:
    raise ValueError(f"v must be [{batch}, {length}, Hv, Dv] with Hv a multiple of {key_heads}; got {v.shape}")
  value_heads, value_dim = v.shape[2:]
  for name, x in (("g", g), ("beta", beta)):
    if x.shape != (batch, length, value_heads):
      raise ValueError(f"{name} must be [{batch}, {length}, {value_heads}]; got {x.shape}")
  if initial_state is not None and initial_state.shape != (batch, value_heads, key_dim, value_dim):
    raise ValueError(
        f"initial_state must be [{batch}, {value_heads}, {key_dim}, {value_dim}]; got {initial_state.shape}"
    )
  if segment_ids is not None and segment_ids.shape != (batch, length):
    raise ValueError(f"segment_ids must be [{batch}, {length}]; got {segment_ids.shape}")


def _to_chunks(x: jax.Array, chunk_size: int, pad_value=0) -> jax.Array:
  """[B, T, H, ...] -> [B, H, N, C, ...], padding T up to a multiple of chunk_size."""
  batch, length = x.shape[:2]
  pad = (-length) % chunk_size
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
  x = x.reshape(batch, (length + pad) // chunk_size, chunk_size, *x.shape[2:])
  return jnp.moveaxis(x, 3, 1) if x.ndim > 3 else x


def token_segment_masks(segment_ids: jax.Array, chunk_size: int):
  """(segment ids, carried, in_last_segment), each [B, N, C], for [B, T] ids padded up to whole chunks.

  carried: the token belongs to the segment of the state entering its chunk (each row's first segment for the
  first chunk); in_last_segment: to its chunk's last segment. Padding continues the last segment; padded tokens
  carry beta = 0 and k = 0, so they change nothing.
  """
  batch, length = segment_ids.shape
  padded = jnp.pad(segment_ids, [(0, 0), (0, (-length) % chunk_size)], mode="edge")
  seg = padded.reshape(batch, -1, chunk_size)
  previous_last = jnp.concatenate([seg[:, :1, :1], seg[:, :-1, -1:]], axis=1)  # segment of the carried state
  return seg, seg == previous_last, seg == seg[..., -1:]


def _segment_masks(segment_ids: jax.Array | None, chunk_size: int):
  """(same_segment [B, 1, N, C, C], carried [B, 1, N, C], in_last_segment [B, 1, N, C]) or Nones."""
  if segment_ids is None:
    return None, None, None
  seg, carried, in_last_segment = token_segment_masks(segment_ids, chunk_size)
  same_segment = seg[..., :, None] == seg[..., None, :]
  return same_segment[:, None], carried[:, None], in_last_segment[:, None]


def prepare_chunks(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    solve: str = "solve_triangular",
    precision=_HIGHEST,
) -> ChunkInputs:
  """Model layouts (q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]) -> ChunkInputs.

  solve: how the chunk's unit lower triangular system is solved, 'solve_triangular' or 'inverse' (the explicit
  inverse by blocked doubling times the right-hand sides: matmuls only, which GPUs run far faster than batched
  triangular solves). precision: of the q.k, k.k and inverse-times-rhs products (HIGHEST: true float32).
  """
  batch, length, key_heads, key_dim = q.shape
  value_heads = v.shape[2]
  q, k, v, g, beta = (x.astype(jnp.float32) for x in (q, k, v, g, beta))
  if use_qk_l2norm:
    q, k = l2_normalize(q), l2_normalize(k)
  q = q * (key_dim**-0.5 if scale is None else scale)
  # Decays and betas are per value head, so everything below is too; the normalised q, k are shared by a group.
  groups = value_heads // key_heads
  q, k = jnp.repeat(q, groups, axis=2), jnp.repeat(k, groups, axis=2)
  q, k, v, g, beta = (_to_chunks(x, chunk_size) for x in (q, k, v, g, beta))  # [B, H, N, C, ...]
  same_segment, carried, in_last_segment = _segment_masks(segment_ids, chunk_size)

  g_cum = jnp.cumsum(g, axis=-1)  # [B, H, N, C]
  pair_mask = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
  if same_segment is not None:
    pair_mask = pair_mask & same_segment
  # decay[i, j] = exp(g_cum_i - g_cum_j) <= 1 on kept pairs; masked before exp so nothing overflows.
  pair_decay = jnp.exp(jnp.where(pair_mask, g_cum[..., :, None] - g_cum[..., None, :], -jnp.inf))
  k_beta = k * beta[..., None]
  strictly_lower = jnp.tril(_mm("bhncd,bhnsd->bhncs", k_beta, k, precision) * pair_decay, -1)
  from_start = jnp.exp(g_cum)
  to_end = jnp.exp(g_cum[..., -1:] - g_cum)
  chunk_decay = jnp.exp(g_cum[..., -1])
  if carried is not None:
    from_start = from_start * carried
    to_end = to_end * in_last_segment
    chunk_decay = chunk_decay * carried[..., -1]
  # (I + L) U = beta V and (I + L) W = beta exp(g_cum) K: the WY form of the chunk's delta-rule updates.
  value_dim = v.shape[-1]
  rhs = jnp.concatenate([v * beta[..., None], k_beta * from_start[..., None]], axis=-1)
  solved = _solve_unit_lower(strictly_lower, rhs, solve, precision)
  return ChunkInputs(
      q=q * from_start[..., None],
      k=k * to_end[..., None],
      w=solved[..., value_dim:],
      u=solved[..., :value_dim],
      intra=_mm("bhncd,bhnsd->bhncs", q, k, precision) * pair_decay,
      decay=chunk_decay,
  )


def merge_chunks(out: jax.Array, length: int) -> jax.Array:
  """[B, H, N, C, Dv] -> [B, T, H, Dv], dropping the padding."""
  batch, heads, num_chunks, chunk_size, value_dim = out.shape
  out = out.reshape(batch, heads, num_chunks * chunk_size, value_dim)[:, :, :length]
  return jnp.swapaxes(out, 1, 2)
