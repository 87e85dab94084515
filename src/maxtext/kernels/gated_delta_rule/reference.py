"""Pure-jnp gated delta rule: the chunked form (training, prefill) and the token recurrence (decode).

Both are the oracles for the Pallas kernels and the CPU path. Layouts follow the model:
  q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv] with Hv a multiple of Hk (value head h reads key head h // (Hv // Hk));
  g (log-decay, <= 0), beta: [B, T, Hv]; state: [B, Hv, Dk, Dv], float32.
Per head, with S the [Dk, Dv] state:  S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxtext.kernels.gated_delta_rule.chunking import check_shapes, l2_normalize, merge_chunks, prepare_chunks
from maxtext.kernels.gated_delta_rule.inter_chunk import inter_chunk_forward

_HIGHEST = jax.lax.Precision.HIGHEST


def _prepare(q, k, v, g, beta, use_qk_l2norm):
  """float32, q/k normalised and repeated to the value heads, q scaled; all as [B, H, T, ...]."""
  num_key_heads, num_value_heads = q.shape[2], v.shape[2]
  if num_value_heads % num_key_heads:
    raise ValueError(f"value heads ({num_value_heads}) must be a multiple of key heads ({num_key_heads})")
  q, k, v, g, beta = (x.astype(jnp.float32) for x in (q, k, v, g, beta))
  if use_qk_l2norm:
    q, k = l2_normalize(q), l2_normalize(k)
  q = q * q.shape[-1] ** -0.5
  groups = num_value_heads // num_key_heads
  q, k = jnp.repeat(q, groups, axis=2), jnp.repeat(k, groups, axis=2)
  to_bhtd = lambda x: jnp.swapaxes(x, 1, 2)
  return to_bhtd(q), to_bhtd(k), to_bhtd(v), to_bhtd(g), to_bhtd(beta)


def _initial_state(initial_state, batch, heads, key_dim, value_dim):
  if initial_state is None:
    return jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
  expected = (batch, heads, key_dim, value_dim)
  if initial_state.shape != expected:
    raise ValueError(f"initial_state has shape {initial_state.shape}, expected {expected}")
  return initial_state.astype(jnp.float32)


def chunk_gated_delta_rule_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Chunked gated delta rule. Returns (o [B, T, Hv, Dv] in v's dtype, final state [B, Hv, Dk, Dv] float32).

  The intra-chunk algebra is chunking.py's; the chunk-to-chunk recurrence is a jnp scan that JAX differentiates.
  The chunk's triangular system is solved by the explicit inverse (blocked doubling, float32 matmuls at HIGHEST):
  XLA:CPU runs `solve_triangular` as a LAPACK call that blocks a shared pool thread while its batch runs on the
  same pool, which deadlocks a step on several forced host devices (tests/trainers/test_mesh_equivalence.py).
  """
  check_shapes(q, k, v, g, beta, initial_state, segment_ids)
  batch, length = q.shape[:2]
  heads, key_dim, value_dim = v.shape[2], k.shape[-1], v.shape[-1]
  state = _initial_state(initial_state, batch, heads, key_dim, value_dim)
  chunks = prepare_chunks(
      q, k, v, g, beta, segment_ids, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, scale=scale,
      solve="inverse",
  )
  result = inter_chunk_forward(*chunks, state)
  return merge_chunks(result.out, length).astype(v.dtype), result.final_state


def recurrent_gated_delta_rule_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    use_qk_l2norm: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Token-by-token gated delta rule (decode). Same arguments and results as the chunked form."""
  out_dtype = v.dtype
  batch = q.shape[0]
  q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
  heads, key_dim, value_dim = v.shape[1], k.shape[-1], v.shape[-1]
  state = _initial_state(initial_state, batch, heads, key_dim, value_dim)

  def step(state, token):
    q_t, k_t, v_t, g_t, beta_t = token  # [B, H, D] / [B, H]
    state = state * jnp.exp(g_t)[..., None, None]
    predicted = jnp.einsum("bhd,bhde->bhe", k_t, state, precision=_HIGHEST)
    delta = (v_t - predicted) * beta_t[..., None]
    state = state + k_t[..., :, None] * delta[..., None, :]
    return state, jnp.einsum("bhd,bhde->bhe", q_t, state, precision=_HIGHEST)

  time_major = lambda x: jnp.moveaxis(x, 2, 0)
  final_state, out = jax.lax.scan(step, state, tuple(time_major(x) for x in (q, k, v, g, beta)))
  return jnp.moveaxis(out, 0, 1).astype(out_dtype), final_state
