"""Pure-jnp gated delta rule: the chunked form (training, prefill) and the token recurrence (decode).

Both are the oracles for the Pallas kernels and the CPU path. Layouts follow the model:
  q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv] with Hv a multiple of Hk (value head h reads key head h // (Hv // Hk));
  g (log-decay, <= 0), beta: [B, T, Hv]; state: [B, Hv, Dk, Dv], float32.
Per head, with S the [Dk, Dv] state:  S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

_HIGHEST = jax.lax.Precision.HIGHEST
L2_NORM_EPS = 1e-6


def l2_normalize(x: jax.Array, eps: float = L2_NORM_EPS) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


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
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Chunked gated delta rule. Returns (o [B, T, Hv, Dv] in v's dtype, final state [B, Hv, Dk, Dv] float32)."""
  out_dtype = v.dtype
  batch, length = q.shape[:2]
  q, k, v, g, beta = _prepare(q, k, v, g, beta, use_qk_l2norm)
  heads, key_dim, value_dim = v.shape[1], k.shape[-1], v.shape[-1]
  state = _initial_state(initial_state, batch, heads, key_dim, value_dim)

  # Padding with g = 0, beta = 0 rows leaves both outputs and state unchanged.
  pad = (-length) % chunk_size
  pad_time = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
  q, k, v, g, beta = (pad_time(x) for x in (q, k, v, g, beta))
  num_chunks = (length + pad) // chunk_size
  chunked = lambda x: x.reshape(batch, heads, num_chunks, chunk_size, *x.shape[3:])
  q, k, v, g, beta = (chunked(x) for x in (q, k, v, g, beta))  # [B, H, N, C, ...]

  g_cum = jnp.cumsum(g, axis=-1)  # [B, H, N, C]
  causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
  # decay[i, j] = exp(g_cum_i - g_cum_j) for i >= j; masked before exp so no overflow on the upper triangle.
  decay = jnp.exp(jnp.where(causal, g_cum[..., :, None] - g_cum[..., None, :], -jnp.inf))
  k_beta = k * beta[..., None]
  strictly_lower = jnp.tril(jnp.einsum("bhncd,bhnsd->bhncs", k_beta, k, precision=_HIGHEST) * decay, -1)
  system = strictly_lower + jnp.eye(chunk_size, dtype=jnp.float32)
  # (I + L) U = beta V  and  (I + L) W = beta exp(g_cum) K: the WY form of the chunk's delta-rule updates.
  rhs = jnp.concatenate([v * beta[..., None], k_beta * jnp.exp(g_cum)[..., None]], axis=-1)
  solved = solve_triangular(system, rhs, lower=True, unit_diagonal=True)
  u, w = solved[..., :value_dim], solved[..., value_dim:]
  intra = jnp.einsum("bhncd,bhnsd->bhncs", q, k, precision=_HIGHEST) * decay
  q_decayed = q * jnp.exp(g_cum)[..., None]
  k_to_end = k * jnp.exp(g_cum[..., -1:] - g_cum)[..., None]
  chunk_decay = jnp.exp(g_cum[..., -1])[..., None, None]  # [B, H, N, 1, 1]

  def step(state, chunk):
    u_n, w_n, q_n, k_n, intra_n, decay_n = chunk
    v_new = u_n - jnp.einsum("bhcd,bhde->bhce", w_n, state, precision=_HIGHEST)
    out = jnp.einsum("bhcd,bhde->bhce", q_n, state, precision=_HIGHEST)
    out = out + jnp.einsum("bhcs,bhse->bhce", intra_n, v_new, precision=_HIGHEST)
    state = state * decay_n + jnp.einsum("bhcd,bhce->bhde", k_n, v_new, precision=_HIGHEST)
    return state, out

  chunk_major = lambda x: jnp.moveaxis(x, 2, 0)
  final_state, out = jax.lax.scan(
      step, state, tuple(chunk_major(x) for x in (u, w, q_decayed, k_to_end, intra, chunk_decay))
  )
  out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, num_chunks * chunk_size, value_dim)[:, :, :length]
  return jnp.swapaxes(out, 1, 2).astype(out_dtype), final_state


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
