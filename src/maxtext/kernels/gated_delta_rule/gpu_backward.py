"""The fused per-chunk backward of gpu.py (ChunkedLaunch(fused_backward=True)): one kernel, `chunk_grad_kernel`,
in place of gpu_kernels.output_grad_kernel + wy_grad_kernel, so dw, the partial dk and the partial dgc never go
through HBM and q, k, the chunk's states, T and the gates are read by one program per (chunk, value head, row).

It runs after the reverse walk (state_grad_kernel: dv_new and dh_{n+1}). With the forward's algebra (gpu.py), the
state h = h_n, dh = dL/dh_{n+1}, du = dv_new and x = beta (v - fs (k h)) (so that v_new = T x):
  dT = dv_new x^T                       (= dw (beta fs k)^T + du (beta v)^T with dw = -dv_new h^T: dw is never formed)
  r = T^T dv_new;  dv = beta r;  dbeta_u = sum_v(r v);  d(beta fs)_i = -sum_v(r (k h))_i
  dA = -T^T dT T^T on A's strictly lower support
  dq = s fs (do h^T) + dP' k;  dk = te (v_new dh^T) - (beta fs r) h^T + dP'^T q + (dA' + dA'^T) k
with dP' = s Gamma * (do v_new^T) and dA' = beta Gamma * dA. Two phases, both over value blocks of BV columns:
1. every [C, C] matrix (do v_new^T, dT, then dA) and the vectors, and dv (it needs all of the key dim only
   through k h);
2. per key block of BK columns, the two [C, BK] accumulators do h^T and te v_new dh^T - (beta fs r) h^T, then dq
   and dk of those columns (r recomputed per value block: one C x C x BV product, cheaper than keeping it).
So at most two [C, BK] and four [C, C] float32 tiles are live (gpu.py's note: one kernel that kept every [C, Dk]
gradient live spilled). The pair terms of dgc come from the forward's saved P = s Gamma * (q k^T) when the fused
forward ran (else from q k^T here), and d te from the key blocks' sum_k(dk_acc k) less (beta fs) d(beta fs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.gpu_inverse import iotas
from maxtext.kernels.gated_delta_rule.gpu_kernels import _f32, _gates, _split_refs


def chunk_grad_kernel(*refs, chunk: int, groups: int, block_k: int, block_v: int, scale: float, segmented: bool,
                      with_scores: bool, mm):
  """One (chunk, value head, row): dq, dk (this value head's share), dv, dgc and dbeta (module docstring)."""
  count = 12 if with_scores else 11
  ins, seg_refs, outs = _split_refs(refs, count, segmented)
  q_ref, k_ref, v_ref, gc_ref, beta_ref, t_ref, states_ref, dstates_ref, do_ref, v_new_ref, dv_new_ref = ins[:11]
  dq_ref, dk_ref, dv_ref, dgc_ref, dbeta_ref = outs
  n, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  hk = h // groups
  tokens = pl.ds(n * chunk, chunk)
  key_dim, value_dim = k_ref.shape[-1], v_ref.shape[-1]
  rows, cols = iotas(chunk)
  gates = _gates(gc_ref, seg_refs, b, h, tokens, chunk)
  fs, te = gates.from_start, gates.to_end
  beta = beta_ref[b, h, tokens]
  bw = beta * fs
  t = t_ref[b, h, n]
  k = k_ref[b, tokens, hk, :]  # [C, Dk] as stored

  # Phase 1: the chunk's [C, C] gradients and dv, by value blocks.
  d_scores = jnp.zeros((chunk, chunk), jnp.float32)  # do v_new^T
  d_t = jnp.zeros((chunk, chunk), jnp.float32)  # dv_new x^T
  d_beta = jnp.zeros((chunk,), jnp.float32)
  d_bw = jnp.zeros((chunk,), jnp.float32)
  for start in range(0, value_dim, block_v):  # static: a few value blocks
    vcols = pl.ds(start, block_v)
    do, v_new, dv_new = (x[b, tokens, h, vcols] for x in (do_ref, v_new_ref, dv_new_ref))  # [C, BV]
    v = _f32(v_ref[b, tokens, h, vcols])
    kh = mm(k, states_ref[b, h, n, :, vcols])  # [C, BV]
    d_scores += mm(do, v_new, trans_b=True)
    d_t += mm(dv_new, beta[:, None] * (v - fs[:, None] * kh), trans_b=True)
    r = mm(t, dv_new, trans_a=True)  # [C, BV]
    dv_ref[b, tokens, h, vcols] = (beta[:, None] * r).astype(dv_ref.dtype)
    d_beta += jnp.sum(r * v, axis=1)
    d_bw -= jnp.sum(r * kh, axis=1)

  d_a = jnp.where(rows > cols, -mm(t, mm(d_t, t, trans_b=True), trans_a=True), 0.0)
  kk_gamma = mm(k, k, trans_b=True) * gates.gamma
  d_kk = d_a * beta[:, None] * gates.gamma  # through A = beta Gamma * (k k^T)
  d_qk = d_scores * (scale * gates.gamma)  # through P = s Gamma * (q k^T)
  if with_scores:
    d_pairs = d_scores * _f32(ins[11][b, h, n])  # d/dgc_i of P_ij is P_ij, of gc_j -P_ij
  else:
    d_pairs = d_qk * mm(q_ref[b, tokens, hk, :], k, trans_b=True)
  d_a_pairs = d_a * beta[:, None] * kk_gamma  # likewise for A
  dgc = (d_bw * bw + jnp.sum(d_pairs + d_a_pairs, axis=1) - jnp.sum(d_pairs + d_a_pairs, axis=0))
  dbeta_ref[b, h, tokens] = d_beta + d_bw * fs + jnp.sum(d_a * kk_gamma, axis=1)

  # Phase 2: dq, dk by key blocks.
  d_q_state = jnp.zeros((chunk,), jnp.float32)  # sum_k((do h^T) q)
  d_k_acc = jnp.zeros((chunk,), jnp.float32)  # sum_k(dk_acc k) = d te / te ... + bw d_bw (docstring)
  d_decay = jnp.zeros((), jnp.float32)
  for kstart in range(0, key_dim, block_k):
    keys = pl.ds(kstart, block_k)
    q_kb, k_kb = q_ref[b, tokens, hk, keys], k_ref[b, tokens, hk, keys]  # [C, BK]
    q_state = jnp.zeros((chunk, block_k), jnp.float32)  # do h^T
    k_acc = jnp.zeros((chunk, block_k), jnp.float32)  # te v_new dh^T - (beta fs r) h^T
    for start in range(0, value_dim, block_v):
      vcols = pl.ds(start, block_v)
      state, d_state = states_ref[b, h, n, keys, vcols], dstates_ref[b, h, n, keys, vcols]  # [BK, BV]
      do, v_new, dv_new = (x[b, tokens, h, vcols] for x in (do_ref, v_new_ref, dv_new_ref))
      r = mm(t, dv_new, trans_a=True)
      q_state += mm(do, state, trans_b=True)
      k_acc += mm(te[:, None] * _f32(v_new), d_state, trans_b=True) - mm(bw[:, None] * r, state, trans_b=True)
      d_decay += jnp.sum(_f32(state) * _f32(d_state))
    dq = (scale * fs)[:, None] * q_state + mm(d_qk, k_kb)
    dq_ref[b, tokens, h, keys] = dq.astype(dq_ref.dtype)
    dk = k_acc + mm(d_qk, q_kb, trans_a=True) + mm(d_kk, k_kb) + mm(d_kk, k_kb, trans_a=True)
    dk_ref[b, tokens, h, keys] = dk.astype(dk_ref.dtype)
    d_q_state += jnp.sum(q_state * _f32(q_kb), axis=1)
    d_k_acc += jnp.sum(k_acc * _f32(k_kb), axis=1)

  # h_{n+1} = decay h + k^T (te v_new), te = exp(gc_last - gc): d te_i reaches gc_i negated and gc_last summed.
  d_te = d_k_acc - bw * d_bw
  dgc = dgc + scale * fs * d_q_state - d_te
  dgc_ref[b, h, tokens] = dgc + jnp.where(gates.is_last, jnp.sum(d_te) + d_decay * gates.decay, 0.0)
