"""The kernel bodies of gpu.py (math and layouts in its docstring): Pallas-Triton programs over whole-array refs,
one per (chunk, value head, row) for the parallel kernels and per (value block, value head, row) for the walks.

Every kernel takes its inputs, then the three Segments refs when the call is segmented, then its outputs; `mm`
is gpu_precision.dot in the call's precision.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.gpu_inverse import blocked_chunk, iotas, unit_lower_inverse


class Segments(NamedTuple):
  """Per-token segment masks [B, T]: the id (int32), carried and in_last (float32, see the module docstring)."""

  ids: jax.Array
  carried: jax.Array
  in_last: jax.Array


# ------------------------------------------------------------------------------------------- in-kernel math


class _Gates(NamedTuple):
  gamma: jax.Array | None  # [C, C], zero off the causal same-segment pairs
  from_start: jax.Array  # fs [C]
  to_end: jax.Array  # te [C]
  decay: jax.Array  # scalar
  is_last: jax.Array  # [C] bool, the chunk's last row


def _gates(gc_ref, seg_refs, b, h, tokens, chunk: int, pairs: bool = True) -> _Gates:
  """The decays of one (row, value head, chunk) from its cumulative log decays and segment masks.

  pairs=False (the sequential walks, which never use them) leaves out the [C, C] pair decays: gamma is None.
  """
  gc = gc_ref[b, h, tokens]
  is_last = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
  gc_last = jnp.sum(jnp.where(is_last, gc, 0.0))
  gamma = None
  if pairs:
    rows, cols = iotas(chunk)
    mask = rows >= cols
    if seg_refs is not None:
      seg = seg_refs.ids[b, tokens]
      mask = mask & (seg[:, None] == seg[None, :])
    gamma = jnp.exp(jnp.where(mask, gc[:, None] - gc[None, :], -jnp.inf))  # masked before exp: nothing overflows
  from_start, to_end, decay = jnp.exp(gc), jnp.exp(gc_last - gc), jnp.exp(gc_last)
  if seg_refs is not None:
    carried = seg_refs.carried[b, tokens]
    from_start = from_start * carried
    to_end = to_end * seg_refs.in_last[b, tokens]
    decay = decay * jnp.sum(jnp.where(is_last, carried, 0.0))
  return _Gates(gamma, from_start, to_end, decay, is_last)


def _split_refs(refs, count: int, segmented: bool):
  """(first `count` refs, Segments of refs or None, the rest)."""
  head, rest = refs[:count], refs[count:]
  if not segmented:
    return head, None, rest
  return head, Segments(*rest[:3]), rest[3:]


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ forward


def chunk_inverse(k_ref, gc_ref, beta_ref, seg_refs, *, chunk: int, groups: int, mm, inv_mm):
  """This program's (chunk n, value head h, row b): its keys (f32), beta, gates and WY inverse T [C, C]."""
  n, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tokens = pl.ds(n * chunk, chunk)
  rows, cols = iotas(chunk)
  k = _f32(k_ref[b, tokens, h // groups, :])
  beta = beta_ref[b, h, tokens]
  gates = _gates(gc_ref, seg_refs, b, h, tokens, chunk)
  a = jnp.where(rows > cols, beta[:, None] * mm(k, k, trans_b=True) * gates.gamma, 0.0)
  return k, beta, gates, unit_lower_inverse(a, rows, cols, inv_mm)


def wy_kernel(*refs, chunk: int, groups: int, segmented: bool, mm, inv_mm, inverse_block: int | None = None):
  """One (chunk, value head, row): w = T (beta fs k), u = T (beta v) and T itself (inverse_block: gpu_inverse.py)."""
  (k_ref, v_ref, gc_ref, beta_ref), seg_refs, (w_ref, u_ref, t_ref) = _split_refs(refs, 4, segmented)
  n, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  if inverse_block is not None:
    c = blocked_chunk(None, k_ref, gc_ref, beta_ref, seg_refs, chunk=chunk, groups=groups, block=inverse_block,
                      mm=mm, inv_mm=inv_mm)
    w = c.apply([(beta * fs)[:, None] * _f32(k) for beta, fs, k in zip(c.beta, c.from_start, c.k)], mm)
    u = c.apply([beta[:, None] * _f32(v_ref[b, span, h, :]) for beta, span in zip(c.beta, c.tokens)], mm)
    for span, w_i, u_i in zip(c.tokens, w, u):
      w_ref[b, span, h, :] = w_i.astype(w_ref.dtype)
      u_ref[b, span, h, :] = u_i.astype(u_ref.dtype)
    c.store(t_ref, (b, h, n), c.t)
    return
  tokens = pl.ds(n * chunk, chunk)
  k, beta, gates, t = chunk_inverse(k_ref, gc_ref, beta_ref, seg_refs, chunk=chunk, groups=groups, mm=mm,
                                    inv_mm=inv_mm)
  w_ref[b, tokens, h, :] = mm(t, (beta * gates.from_start)[:, None] * k).astype(w_ref.dtype)
  u_ref[b, tokens, h, :] = mm(t, beta[:, None] * _f32(v_ref[b, tokens, h, :])).astype(u_ref.dtype)
  t_ref[b, h, n] = t.astype(t_ref.dtype)


def state_kernel(*refs, chunk: int, groups: int, num_chunks: int, block_v: int, segmented: bool, mm):
  """One (value block, value head, row): walks the chunks carrying its [Dk, BV] float32 state slice."""
  (k_ref, w_ref, u_ref, gc_ref, h0_ref), seg_refs, (final_ref, states_ref, v_new_ref) = _split_refs(
      refs, 5, segmented)
  vb, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(vb * block_v, block_v)

  def step(n, state):  # state: [Dk, BV], entering chunk n
    tokens = pl.ds(n * chunk, chunk)
    states_ref[b, h, n, :, cols] = state.astype(states_ref.dtype)
    v_new = _f32(u_ref[b, tokens, h, cols]) - mm(w_ref[b, tokens, h, :], state)  # [C, BV]
    v_new_ref[b, tokens, h, cols] = v_new.astype(v_new_ref.dtype)
    gates = _gates(gc_ref, seg_refs, b, h, tokens, chunk, pairs=False)
    update = mm(k_ref[b, tokens, h // groups, :], gates.to_end[:, None] * v_new, trans_a=True)
    return gates.decay * state + update

  final_ref[b, h, :, cols] = jax.lax.fori_loop(0, num_chunks, step, h0_ref[b, h, :, cols])


def output_kernel(*refs, chunk: int, groups: int, scale: float, segmented: bool, mm):
  """One (chunk, value head, row): o = s fs (q h_n) + s (Gamma * q k^T) v_new."""
  (q_ref, k_ref, gc_ref, states_ref, v_new_ref), seg_refs, (o_ref,) = _split_refs(refs, 5, segmented)
  n, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tokens = pl.ds(n * chunk, chunk)
  q, k = q_ref[b, tokens, h // groups, :], k_ref[b, tokens, h // groups, :]
  gates = _gates(gc_ref, seg_refs, b, h, tokens, chunk)
  scores = mm(q, k, trans_b=True) * (scale * gates.gamma)
  out = (scale * gates.from_start)[:, None] * mm(q, states_ref[b, h, n]) + mm(scores, v_new_ref[b, tokens, h, :])
  o_ref[b, tokens, h, :] = out.astype(o_ref.dtype)


# ----------------------------------------------------------------------------------------------- backward


def local_dv_kernel(*refs, chunk: int, groups: int, scale: float, segmented: bool, mm):
  """One (chunk, value head, row): the chunk-local part of dv_new, (s Gamma * q k^T)^T do."""
  (q_ref, k_ref, gc_ref, do_ref), seg_refs, (dv_ref,) = _split_refs(refs, 4, segmented)
  n, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tokens = pl.ds(n * chunk, chunk)
  gates = _gates(gc_ref, seg_refs, b, h, tokens, chunk)
  scores = mm(q_ref[b, tokens, h // groups, :], k_ref[b, tokens, h // groups, :], trans_b=True)
  scores = scores * (scale * gates.gamma)
  dv_ref[b, tokens, h, :] = mm(scores, do_ref[b, tokens, h, :], trans_a=True).astype(dv_ref.dtype)


def state_grad_kernel(*refs, chunk: int, groups: int, num_chunks: int, block_v: int, scale: float,
                      segmented: bool, mm, local_from_scores: bool = False):
  """One (value block, value head, row), chunks in reverse: dv_new and dh_{n+1} = dL/dh_{n+1} per chunk, dh0.

  The chunk-local part of dv_new is read from local_dv_kernel's output, or (local_from_scores) formed here as
  P^T do from the fused forward's saved P [B, Hv, N, C, C] (gpu_fused.py), which saves that kernel. The state's
  gradient passes back through v_new = u - w h_n as w^T dv_new = k^T (beta fs (T^T dv_new)): T [C, C] and the key
  rows already loaded stand in for w [C, Dk], which the forward then never stores (fewer bytes per chunk here,
  where every program streams its chunks' rows).
  """
  (q_ref, k_ref, t_ref, gc_ref, beta_ref, do_ref, dv_local_ref, dfinal_ref), seg_refs, outs = _split_refs(
      refs, 8, segmented)
  dv_new_ref, dstates_ref, dh0_ref = outs
  vb, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(vb * block_v, block_v)
  hk = h // groups

  def step(i, dh):  # dh: [Dk, BV], the gradient of the state leaving chunk n
    n = num_chunks - 1 - i
    tokens = pl.ds(n * chunk, chunk)
    dstates_ref[b, h, n, :, cols] = dh.astype(dstates_ref.dtype)
    gates = _gates(gc_ref, seg_refs, b, h, tokens, chunk, pairs=False)
    if local_from_scores:
      local = mm(dv_local_ref[b, h, n], do_ref[b, tokens, h, cols], trans_a=True)
    else:
      local = _f32(dv_local_ref[b, tokens, h, cols])
    k = k_ref[b, tokens, hk, :]
    dv_new = local + gates.to_end[:, None] * mm(k, dh)
    dv_new_ref[b, tokens, h, cols] = dv_new.astype(dv_new_ref.dtype)
    d_out = (scale * gates.from_start)[:, None] * _f32(do_ref[b, tokens, h, cols])
    d_keys = (beta_ref[b, h, tokens] * gates.from_start)[:, None] * mm(t_ref[b, h, n], dv_new, trans_a=True)
    return gates.decay * dh + mm(q_ref[b, tokens, hk, :], d_out, trans_a=True) - mm(k, d_keys, trans_a=True)

  dh0_ref[b, h, :, cols] = jax.lax.fori_loop(0, num_chunks, step, dfinal_ref[b, h, :, cols])


def output_grad_kernel(*refs, chunk: int, groups: int, heads: int, block_k: int, block_v: int, scale: float,
                        segmented: bool, mm):
  """One (key block, chunk, row * value head): the gradients through o and the state update, on BK key columns.

  Writes those columns of dq, of this value head's share of dk (without the WY system's part) and of
  dw = -dv_new h_n^T, and this key block's share of dgc (from fs, te, decay and the pair decays of o: each is a
  sum over the key dim, so the key blocks' shares add up). Key blocks keep the three [C, BK] accumulators in
  registers (one program for the whole key dim spilled).
  """
  ins, seg_refs, outs = _split_refs(refs, 8, segmented)
  q_ref, k_ref, gc_ref, states_ref, dstates_ref, do_ref, v_new_ref, dv_new_ref = ins
  dq_ref, dk_ref, dw_ref, dgc_ref = outs
  kb, n, bh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  b, h = bh // heads, bh % heads
  tokens, keys = pl.ds(n * chunk, chunk), pl.ds(kb * block_k, block_k)
  q, k = _f32(q_ref[b, tokens, h // groups, keys]), _f32(k_ref[b, tokens, h // groups, keys])  # [C, BK]
  value_dim = do_ref.shape[-1]
  gates = _gates(gc_ref, seg_refs, b, h, tokens, chunk)

  q_state = jnp.zeros((chunk, block_k), jnp.float32)  # do h_n^T
  k_state = jnp.zeros((chunk, block_k), jnp.float32)  # v_new dh^T
  dw = jnp.zeros((chunk, block_k), jnp.float32)  # -dv_new h_n^T
  d_scores = jnp.zeros((chunk, chunk), jnp.float32)  # do v_new^T (every key block forms it: it needs no keys)
  d_decay = jnp.zeros((), jnp.float32)
  for start in range(0, value_dim, block_v):  # static: at most a few value blocks
    vcols = pl.ds(start, block_v)
    state, d_state = states_ref[b, h, n, keys, vcols], dstates_ref[b, h, n, keys, vcols]  # [BK, BV]
    do, v_new, dv_new = (x[b, tokens, h, vcols] for x in (do_ref, v_new_ref, dv_new_ref))  # [C, BV]
    q_state += mm(do, state, trans_b=True)
    k_state += mm(v_new, d_state, trans_b=True)
    dw -= mm(dv_new, state, trans_b=True)
    d_scores += mm(do, v_new, trans_b=True)
    d_decay += jnp.sum(_f32(state) * _f32(d_state))
  dw_ref[b, tokens, h, keys] = dw.astype(dw_ref.dtype)

  # o = s fs (q h) + P v_new with P = s Gamma * (q k^T);  h_{n+1} = decay h + k^T (te v_new).
  fs, te = gates.from_start, gates.to_end
  d_qk = d_scores * (scale * gates.gamma)
  dq_ref[b, tokens, h, keys] = ((scale * fs)[:, None] * q_state + mm(d_qk, k)).astype(dq_ref.dtype)
  dk_ref[b, tokens, h, keys] = (te[:, None] * k_state + mm(d_qk, q, trans_a=True)).astype(dk_ref.dtype)
  d_pairs = d_qk * mm(q, k, trans_b=True)  # d/dgc_i of P_ij is P_ij, of gc_j -P_ij
  d_te = jnp.sum(k_state * k, axis=1) * te
  dgc = scale * fs * jnp.sum(q_state * q, axis=1) + jnp.sum(d_pairs, axis=1) - jnp.sum(d_pairs, axis=0) - d_te
  dgc_ref[kb, b, h, tokens] = dgc + jnp.where(gates.is_last, jnp.sum(d_te) + d_decay * gates.decay, 0.0)


def wy_grad_kernel(*refs, chunk: int, groups: int, key_blocks: int, segmented: bool, mm):
  """One (chunk, value head, row): through w = T (beta fs k) and u = T (beta v), du = dv_new.

  d(rhs) = T^T d(out), dT = d(out) rhs^T, dA = -T^T dT T^T on A's strictly lower support. Adds to the dk and dgc
  of output_grad_kernel; writes dv and dbeta.
  """
  ins, seg_refs, outs = _split_refs(refs, 9, segmented)
  k_ref, v_ref, gc_ref, beta_ref, t_ref, dw_ref, du_ref, dk_in_ref, dgc_in_ref = ins
  dk_ref, dv_ref, dgc_ref, dbeta_ref = outs
  n, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tokens = pl.ds(n * chunk, chunk)
  rows, cols = iotas(chunk)
  k = _f32(k_ref[b, tokens, h // groups, :])
  gates = _gates(gc_ref, seg_refs, b, h, tokens, chunk)
  beta = beta_ref[b, h, tokens]
  t = _f32(t_ref[b, h, n])
  bw = beta * gates.from_start
  dw, du, v = dw_ref[b, tokens, h, :], du_ref[b, tokens, h, :], _f32(v_ref[b, tokens, h, :])
  d_t = mm(dw, bw[:, None] * k, trans_b=True) + mm(du, beta[:, None] * v, trans_b=True)
  d_rhs_u = mm(t, du, trans_a=True)  # [C, Dv]
  dv_ref[b, tokens, h, :] = (beta[:, None] * d_rhs_u).astype(dv_ref.dtype)
  dbeta = jnp.sum(d_rhs_u * v, axis=1)
  d_rhs_w = mm(t, dw, trans_a=True)  # [C, Dk]
  d_bw = jnp.sum(d_rhs_w * k, axis=1)
  d_a = jnp.where(rows > cols, -mm(t, mm(d_t, t, trans_b=True), trans_a=True), 0.0)
  kk_gamma = mm(k, k, trans_b=True) * gates.gamma
  d_kk = d_a * beta[:, None] * gates.gamma
  dk = _f32(dk_in_ref[b, tokens, h, :]) + bw[:, None] * d_rhs_w + mm(d_kk, k) + mm(d_kk, k, trans_a=True)
  dk_ref[b, tokens, h, :] = dk.astype(dk_ref.dtype)
  d_a_pairs = d_a * beta[:, None] * kk_gamma  # dA * A
  dgc = d_bw * bw + jnp.sum(d_a_pairs, axis=1) - jnp.sum(d_a_pairs, axis=0)
  for kb in range(key_blocks):  # the output-gradient kernel's shares
    dgc += dgc_in_ref[kb, b, h, tokens]
  dgc_ref[b, h, tokens] = dgc
  dbeta_ref[b, h, tokens] = dbeta + d_bw * gates.from_start + jnp.sum(d_a * kk_gamma, axis=1)
