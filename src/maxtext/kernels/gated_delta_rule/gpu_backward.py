"""The fused per-chunk backward of gpu.py (ChunkedLaunch(fused_backward=True)): one kernel, `chunk_grad_kernel`,
in place of gpu_kernels.output_grad_kernel + wy_grad_kernel, so dw, the partial dk and the partial dgc never go
through HBM and q, k, the chunk's states, T and the gates are read by one program per (chunk, value head, row).

It runs after the reverse walk (state_grad_kernel: dv_new and dh_{n+1}). With the forward's algebra (gpu.py), the
state h = h_n, dh = dL/dh_{n+1}, du = dv_new and x = beta (v - fs (k h)) (so that v_new = T x):
  dT = dv_new x^T                       (= dw (beta fs k)^T + du (beta v)^T with dw = -dv_new h^T: dw is never formed)
  r = T^T dv_new;  dv = beta r;  dbeta_u = sum_v(r v);  d(beta fs)_i = -sum_v(r (k h))_i
  dA = -T^T dT T^T on A's strictly lower support
  dq = s fs (do h^T) + dP' k;  dk = te (v_new dh^T) - beta fs T^T (dv_new h^T) + dP'^T q + (dA' + dA'^T) k
with dP' = s Gamma * (do v_new^T) and dA' = beta Gamma * dA. Two phases, each a loop over value blocks of BV columns:
1. every [C, C] matrix (do v_new^T, dT, then dA) and the vectors, and dv (it needs all of the key dim only
   through k h);
2. a loop over key blocks of BK columns: three [C, BK] accumulators do h^T, v_new dh^T and dv_new h^T, then dq and
   dk of those columns (T^T once per key block, rather than r = T^T dv_new again per value block). With BK = Dk
   (ChunkedLaunch.grad_block_k) phase 1 accumulates them instead, reading the states once, at the price of three
   [C, Dk] float32 tiles live through it.
Register use (this kernel's TTIR compiled for sm_90 by Triton 3.9 on a CPU host, ptxas -v; jaxlib's Triton may
differ): with Python-unrolled blocks the compiler kept several blocks' loads live and spilled 2.1 KB per thread at
4 warps; as loops, nothing at 8 warps with BK x BV = 64 x 32, 20 B at 4 warps with 32 x 32 (80 B with segments),
~0.2 KB at 4 warps with 64 x 64, ~0.6 KB with BK = Dk (8 warps). The pair terms of dgc come from the forward's
saved P = s Gamma * (q k^T) when the fused forward ran (else from q k^T here); te's from te sum_k((v_new dh^T) k).
(An earlier form accumulated te v_new dh^T - r_bw h^T in one tile and took te's term as the difference of two sums:
the bf16 interpret test's dg error rose from the unfused kernels' 3.5e-3 to 5.3e-3.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.gpu_inverse import iotas
from maxtext.kernels.gated_delta_rule.gpu_kernels import _f32, _gates, _split_refs


def chunk_grad_kernel(*refs, chunk: int, groups: int, block_k: int, block_v: int, scale: float, segmented: bool,
                      with_scores: bool, mm, heads_fastest: bool = False):
  """One (chunk, value head, row): dq, dk (this value head's share), dv, dgc and dbeta (module docstring).

  heads_fastest: the grid is (value head, chunk, row), so that the value heads of one key head, which read the same
  q and k rows, run next to each other.
  """
  count = 12 if with_scores else 11
  ins, seg_refs, outs = _split_refs(refs, count, segmented)
  q_ref, k_ref, v_ref, gc_ref, beta_ref, t_ref, states_ref, dstates_ref, do_ref, v_new_ref, dv_new_ref = ins[:11]
  dq_ref, dk_ref, dv_ref, dgc_ref, dbeta_ref = outs
  n, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  if heads_fastest:
    n, h = h, n
  hk = h // groups
  tokens = pl.ds(n * chunk, chunk)
  key_dim, value_dim = k_ref.shape[-1], v_ref.shape[-1]
  single_pass = block_k == key_dim
  gates = _gates(gc_ref, seg_refs, b, h, tokens, chunk, pairs=False)  # the pair decays after phase 1: fewer live
  fs, te = gates.from_start, gates.to_end
  beta = beta_ref[b, h, tokens]
  bw = beta * fs
  t = t_ref[b, h, n]
  k = k_ref[b, tokens, hk, :]  # [C, Dk] as stored
  operand = lambda x: x.astype(t_ref.dtype)  # [C, C] dot operands live across the key blocks: the storage dtype
  # Loops, not unrolled Python: unrolled, the compiler kept every block's loads live at once and spilled.
  value_block = lambda i: pl.ds(pl.multiple_of(i * block_v, block_v), block_v)
  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)

  def state_terms(keys, vcols, state, do, v_new, dv_new):
    """This (key block, value block)'s shares of do h^T, v_new dh^T, dv_new h^T and sum(h dh)."""
    d_state = dstates_ref[b, h, n, keys, vcols]  # [BK, BV]
    return (mm(do, state, trans_b=True), mm(v_new, d_state, trans_b=True), mm(dv_new, state, trans_b=True),
            jnp.sum(_f32(state) * _f32(d_state)))

  def phase1(i, carry):  # the chunk's [C, C] gradients and dv (single_pass: the key-block terms too)
    d_scores, d_t, d_beta, d_bw, sums = carry
    vcols = value_block(i)
    do, v_new, dv_new = (x[b, tokens, h, vcols] for x in (do_ref, v_new_ref, dv_new_ref))  # [C, BV]
    v = _f32(v_ref[b, tokens, h, vcols])
    state = states_ref[b, h, n, :, vcols]  # [Dk, BV]
    kh = mm(k, state)  # [C, BV]
    d_scores += mm(do, v_new, trans_b=True)  # do v_new^T
    d_t += mm(dv_new, beta[:, None] * (v - fs[:, None] * kh), trans_b=True)  # dv_new x^T
    r = mm(t, dv_new, trans_a=True)  # [C, BV]
    dv_ref[b, tokens, h, vcols] = (beta[:, None] * r).astype(dv_ref.dtype)
    if single_pass:
      sums = tuple(a + x for a, x in zip(sums, state_terms(slice(None), vcols, state, do, v_new, dv_new)))
    return d_scores, d_t, d_beta + jnp.sum(r * v, axis=1), d_bw - jnp.sum(r * kh, axis=1), sums

  sums = (*[zeros(chunk, key_dim)] * 3, zeros()) if single_pass else ()
  d_scores, d_t, d_beta, d_bw, sums = jax.lax.fori_loop(
      0, value_dim // block_v, phase1, (zeros(chunk, chunk), zeros(chunk, chunk), zeros(chunk), zeros(chunk), sums))

  rows, cols = iotas(chunk)
  d_a = jnp.where(rows > cols, -mm(t, mm(d_t, t, trans_b=True), trans_a=True), 0.0)
  gamma = _gates(gc_ref, seg_refs, b, h, tokens, chunk).gamma
  kk_gamma = mm(k, k, trans_b=True) * gamma
  dbeta_ref[b, h, tokens] = d_beta + d_bw * fs + jnp.sum(d_a * kk_gamma, axis=1)
  d_a_pairs = d_a * beta[:, None] * kk_gamma  # d/dgc_i of A_ij is A_ij, of gc_j -A_ij
  d_kk = d_a * beta[:, None] * gamma  # through A = beta Gamma * (k k^T)
  d_qk = d_scores * (scale * gamma)  # through P = s Gamma * (q k^T)
  if with_scores:
    d_pairs = d_scores * _f32(ins[11][b, h, n]) + d_a_pairs  # likewise for P
  else:
    d_pairs = d_qk * mm(q_ref[b, tokens, hk, :], k, trans_b=True) + d_a_pairs
  dgc = d_bw * bw + jnp.sum(d_pairs, axis=1) - jnp.sum(d_pairs, axis=0)
  d_qk, d_sym = operand(d_qk), operand(d_kk + d_kk.T)

  def phase2(j, carry):  # dq, dk of one key block
    d_q_state, d_te, d_decay = carry
    keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    q_kb, k_kb = q_ref[b, tokens, hk, keys], k_ref[b, tokens, hk, keys]  # [C, BK]
    if single_pass:
      q_state, k_state, w_state, d_decay = sums
    else:
      def accumulate(i, acc):
        vcols = value_block(i)
        loads = (x[b, tokens, h, vcols] for x in (do_ref, v_new_ref, dv_new_ref))
        return tuple(a + x for a, x in zip(acc, state_terms(keys, vcols, states_ref[b, h, n, keys, vcols], *loads)))
      q_state, k_state, w_state, d_decay = jax.lax.fori_loop(
          0, value_dim // block_v, accumulate, (*[zeros(chunk, block_k)] * 3, d_decay))
    k_acc = te[:, None] * k_state - bw[:, None] * mm(t, w_state, trans_a=True)  # T^T (dv_new h^T) = r h^T
    dq = (scale * fs)[:, None] * q_state + mm(d_qk, k_kb)
    dq_ref[b, tokens, h, keys] = dq.astype(dq_ref.dtype)
    dk = k_acc + mm(d_qk, q_kb, trans_a=True) + mm(d_sym, k_kb)
    dk_ref[b, tokens, h, keys] = dk.astype(dk_ref.dtype)
    return (d_q_state + jnp.sum(q_state * _f32(q_kb), axis=1), d_te + te * jnp.sum(k_state * _f32(k_kb), axis=1),
            d_decay)

  d_q_state, d_te, d_decay = jax.lax.fori_loop(0, key_dim // block_k, phase2, (zeros(chunk), zeros(chunk), zeros()))

  # h_{n+1} = decay h + k^T (te v_new), te = exp(gc_last - gc): d te_i reaches gc_i negated and gc_last summed.
  dgc = dgc + scale * fs * d_q_state - d_te
  dgc_ref[b, h, tokens] = dgc + jnp.where(gates.is_last, jnp.sum(d_te) + d_decay * gates.decay, 0.0)
