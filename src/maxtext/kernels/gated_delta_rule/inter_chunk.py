"""The sequential part of the chunked gated delta rule: carrying the state from chunk to chunk.

Everything inside one chunk is parallel and lives in jnp (chunking.py); what remains is this recurrence over the
chunks of each (batch, value head), the part the Pallas kernels (tpu.py, gpu.py) implement. This file is its
jnp reference, forward and backward, and the contract those kernels follow.

Per (batch b, value head h), chunk n, with h_n the [Dk, Dv] state entering chunk n (h_0 = initial state):
  v_new_n = u_n - w_n @ h_n                        # [C, Dv]
  o_n     = q_n @ h_n + intra_n @ v_new_n          # [C, Dv]
  h_{n+1} = decay_n * h_n + k_n^T @ v_new_n        # [Dk, Dv]
Inputs (any float dtype; math in float32):
  q, k, w: [B, H, N, C, Dk]   u: [B, H, N, C, Dv]   intra: [B, H, N, C, C]   decay: [B, H, N]   h0: [B, H, Dk, Dv]
Forward returns (o [B, H, N, C, Dv] f32, h_final [B, H, Dk, Dv] f32, states [B, H, N, Dk, Dv] f32 (h_n),
v_new [B, H, N, C, Dv] f32); the last two are the residuals the backward pass reads.
Backward walks the chunks in reverse with dh = dL/dh_{n+1} (starting from dL/dh_final):
  dv_new = intra^T @ do + k @ dh;  dq = do @ h_n^T;  dk = v_new @ dh^T;  dw = -dv_new @ h_n^T;  du = dv_new
  dintra = do @ v_new^T;  ddecay = sum(h_n * dh);  dh <- decay * dh + q^T @ do - w^T @ dv_new
and returns (dq, dk, dw, du, dintra, ddecay, dh0), all float32. (The GPU kernels may store out, states, v_new and
the gradients of the chunk inputs in a 16-bit input dtype: see gpu.py.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


class ForwardResult(NamedTuple):
  out: jax.Array  # [B, H, N, C, Dv]
  final_state: jax.Array  # [B, H, Dk, Dv]
  states: jax.Array  # [B, H, N, Dk, Dv], the state entering each chunk
  v_new: jax.Array  # [B, H, N, C, Dv]


class BackwardResult(NamedTuple):
  dq: jax.Array
  dk: jax.Array
  dw: jax.Array
  du: jax.Array
  dintra: jax.Array
  ddecay: jax.Array
  dh0: jax.Array


def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _chunk_major(x: jax.Array) -> jax.Array:
  return jnp.moveaxis(x.astype(jnp.float32), 2, 0)


def inter_chunk_forward(q, k, w, u, intra, decay, h0) -> ForwardResult:
  """jnp reference of the forward recurrence (see the module docstring)."""

  def step(state, chunk):
    q_n, k_n, w_n, u_n, intra_n, decay_n = chunk
    v_new = u_n - _mm("bhcd,bhde->bhce", w_n, state)
    out = _mm("bhcd,bhde->bhce", q_n, state) + _mm("bhcs,bhse->bhce", intra_n, v_new)
    next_state = decay_n[..., None, None] * state + _mm("bhcd,bhce->bhde", k_n, v_new)
    return next_state, (out, state, v_new)

  final_state, (out, states, v_new) = jax.lax.scan(
      step, h0.astype(jnp.float32), tuple(_chunk_major(x) for x in (q, k, w, u, intra, decay))
  )
  to_bhn = lambda x: jnp.moveaxis(x, 0, 2)
  return ForwardResult(to_bhn(out), final_state, to_bhn(states), to_bhn(v_new))


def inter_chunk_backward(q, k, w, intra, decay, states, v_new, d_out, d_final_state) -> BackwardResult:
  """jnp reference of the backward recurrence (see the module docstring)."""

  def step(dh, chunk):
    q_n, k_n, w_n, intra_n, decay_n, h_n, v_new_n, do_n = chunk
    dv_new = _mm("bhsc,bhse->bhce", intra_n, do_n) + _mm("bhcd,bhde->bhce", k_n, dh)
    dq = _mm("bhce,bhde->bhcd", do_n, h_n)
    dk = _mm("bhce,bhde->bhcd", v_new_n, dh)
    dw = -_mm("bhce,bhde->bhcd", dv_new, h_n)
    dintra = _mm("bhce,bhse->bhcs", do_n, v_new_n)
    ddecay = jnp.sum(h_n * dh, axis=(-2, -1))
    dh_prev = decay_n[..., None, None] * dh + _mm("bhcd,bhce->bhde", q_n, do_n) - _mm("bhcd,bhce->bhde", w_n, dv_new)
    return dh_prev, (dq, dk, dw, dv_new, dintra, ddecay)

  chunks = tuple(_chunk_major(x) for x in (q, k, w, intra, decay, states, v_new, d_out))
  dh0, grads = jax.lax.scan(step, d_final_state.astype(jnp.float32), chunks, reverse=True)
  return BackwardResult(*(jnp.moveaxis(x, 0, 2) for x in grads), dh0)
