"""The fused forward of gpu.py (ChunkedLaunch(fused_forward=True)): two kernels instead of three.

`prep_kernel` (parallel over chunks) forms each chunk's WY inverse T and its output score matrix
P = s Gamma * (q k^T) (both [C, C]; and w = T (beta fs k) for the walk that reads it). `walk_output_kernel`
(one program per value block, value head and row) then does everything that touches the state in one pass:
  x = beta (v - fs (k h_n));  v_new = T x;  o = s fs (q h_n) + P v_new;  h_{n+1} = decay h_n + k^T (te v_new)
(v_new = T (beta v) - T (beta fs k) h_n = u - w h_n of gpu.py's docstring.) So u, the output kernel and, for a
forward alone (prefill), the [B, Hv, N, Dk, Dv] state history are never written. Gates and segment masks as in
gpu_kernels.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.chunking import l2_normalize, reciprocal_l2_norm
from maxtext.kernels.gated_delta_rule.gpu_inverse import gated_chunk, key_head_products
from maxtext.kernels.gated_delta_rule.gpu_kernels import _f32, _gates, _split_refs, chunk_inverse


def prep_kernel(*refs, chunk: int, groups: int, scale: float, segmented: bool, with_w: bool, mm, inv_mm,
                inverse_block: int | None = None, per_key_head: bool = False, outputs: str = "tp",
                normalizes: bool = False):
  """One (chunk, value head, row): T, P and (with_w) w; inverse_block: T and P by blocks (gpu_inverse.py).

  per_key_head (with inverse_block): one program per (chunk, key head, row) forms the gate-free k k^T and q k^T
  blocks once and serves the key head's `groups` value heads from them, instead of each value head forming them.
  outputs (with inverse_block): "tp" both; "t" T (and w) alone, "p" P alone: two launches of lighter programs
  (ChunkedLaunch.prep_split), whose outputs are then T (and w), or P.
  normalizes (with outputs="t", not per_key_head): q, k are the raw ones; the keys are l2-normalised here (in
  float32, rounded to k's dtype) before k k^T, and the program of each key head's first value head writes the
  chunk's reciprocal norms 1 / sqrt(x.x + eps) of q and of k ([B, Hk, T] float32, the last two outputs), by which the
  walk scales its products of the raw q, k (ChunkedLaunch.walk_normalizes_qk).
  """
  (q_ref, k_ref, gc_ref, beta_ref), seg_refs, outs = _split_refs(refs, 4, segmented)
  n, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  if inverse_block is not None:
    want_t, want_p = "t" in outputs, "p" in outputs
    if normalizes and (want_p or per_key_head):
      raise ValueError("prep_kernel: normalizes needs outputs='t' and one program per value head")
    t_ref, p_ref = (outs[0] if want_t else None), (outs[int(want_t)] if want_p else None)
    w_ref = outs[int(want_t) + int(want_p)] if with_w else None
    key_head = h if per_key_head else h // groups  # per_key_head: program axis 1 counts key heads
    products = key_head_products(q_ref if want_p else None, k_ref, b, key_head, n, chunk=chunk,
                                 block=inverse_block, mm=mm, with_kk=want_t,
                                 normalize_to=k_ref.dtype if normalizes else None)
    if normalizes:
      _store_reciprocal_norms(q_ref, products, outs[-2:], b, key_head, first=h % groups == 0)
    for head in [h * groups + g for g in range(groups)] if per_key_head else [h]:
      c = gated_chunk(products, gc_ref, beta_ref, seg_refs, b, head, inv_mm=inv_mm, scale=scale)
      if want_t:
        c.store(t_ref, (b, head, n), c.t)
      if want_p:
        c.store(p_ref, (b, head, n), c.p)
      if with_w and want_t:
        w = c.apply([(beta * fs)[:, None] * _f32(k) for beta, fs, k in zip(c.beta, c.from_start, c.k)], mm)
        for span, w_i in zip(c.tokens, w):
          w_ref[b, span, head, :] = w_i.astype(w_ref.dtype)
    return
  if outputs != "tp":
    raise ValueError("prep_kernel: T and P in separate launches need inverse_block")
  t_ref, p_ref = outs[:2]
  tokens = pl.ds(n * chunk, chunk)
  k, beta, gates, t = chunk_inverse(k_ref, gc_ref, beta_ref, seg_refs, chunk=chunk, groups=groups, mm=mm,
                                    inv_mm=inv_mm)
  t_ref[b, h, n] = t.astype(t_ref.dtype)
  p_ref[b, h, n] = (mm(q_ref[b, tokens, h // groups, :], k, trans_b=True) * (scale * gates.gamma)).astype(p_ref.dtype)
  if with_w:
    outs[2][b, tokens, h, :] = mm(t, (beta * gates.from_start)[:, None] * k).astype(outs[2].dtype)


def _store_reciprocal_norms(q_ref, products, norms, b, key_head, *, first):
  """The chunk's reciprocal norms of q (read here) and of k (the products' own) into norms = (of q, of k)
  [B, Hk, T], by the first of the key head's value-head programs only."""
  q_norms, k_norms = norms

  @pl.when(first)
  def _():
    for span, k_norm in zip(products.tokens, products.k_norms):
      q_norms[b, key_head, span] = reciprocal_l2_norm(q_ref[b, span, key_head, :].astype(jnp.float32))
      k_norms[b, key_head, span] = k_norm


def walk_output_kernel(*refs, chunk: int, groups: int, num_chunks: int, block_v: int, scale: float,
                       segmented: bool, save: bool, with_w: bool, mm, scores_inside: bool = False,
                       norms: bool = False):
  """One (value block, value head, row): walks the chunks carrying its [Dk, BV] float32 state; writes o, the
  final state and (save) the state entering each chunk and v_new, for the backward.

  with_w: v_new = T (beta v) - w h_n from prep_kernel's w (two dependent products per chunk on the state's path,
  w h_n and k^T v_new, as gpu_kernels.state_kernel) rather than T (beta (v - fs (k h_n))) (three).
  scores_inside: P = s Gamma * (q k^T) formed here from the chunk's q, k tiles (off the state's path) instead of
  read from prep_kernel (no P input then: a forward alone, whose backward would need P saved, skips its launch).
  norms (with scores_inside, without with_w): q, k are the raw ones and the last two inputs their reciprocal norms
  rq, rk [B, Hk, T] (prep_kernel's normalizes); each product of q or k is scaled by them (ChunkedLaunch.
  walk_normalizes_qk): k h by rk's rows, the update's k^T by rk on te, q h by rq, q k^T by rq's rows and rk's columns.
  """
  if norms and (with_w or not scores_inside):
    raise ValueError("walk_output_kernel: norms needs scores_inside and no w")
  ins, seg_refs, outs = _split_refs(refs, 8 + with_w - scores_inside + 2 * norms, segmented)
  q_ref, k_ref, v_ref, gc_ref, beta_ref, t_ref = ins[:6]
  p_ref, h0_ref = (None, ins[6]) if scores_inside else ins[6:8]
  w_ref = ins[8 - scores_inside] if with_w else None
  rq_ref, rk_ref = ins[-2:] if norms else (None, None)
  o_ref, final_ref = outs[:2]
  vb, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(vb * block_v, block_v)
  hk = h // groups

  def step(n, state):  # state: [Dk, BV], entering chunk n
    tokens = pl.ds(n * chunk, chunk)
    if save:
      outs[2][b, h, n, :, cols] = state.astype(outs[2].dtype)
    gates = _gates(gc_ref, seg_refs, b, h, tokens, chunk, pairs=scores_inside)
    k = k_ref[b, tokens, hk, :]
    q = q_ref[b, tokens, hk, :]
    beta = beta_ref[b, h, tokens]
    # the raw q, k's reciprocal norms (norms), else ones: the kernel's q, k are normalised already
    rq, rk = (rq_ref[b, hk, tokens], rk_ref[b, hk, tokens]) if norms else (1.0, 1.0)
    if with_w:
      v_new = mm(t_ref[b, h, n], beta[:, None] * _f32(v_ref[b, tokens, h, cols])) - mm(w_ref[b, tokens, h, :], state)
    else:
      x = beta[:, None] * (_f32(v_ref[b, tokens, h, cols]) - (gates.from_start * rk)[:, None] * mm(k, state))
      v_new = mm(t_ref[b, h, n], x)  # [C, BV]
    if save:
      outs[3][b, tokens, h, cols] = v_new.astype(outs[3].dtype)
    if scores_inside:
      qk = mm(q, k, trans_b=True) * rq[:, None] * rk[None, :] if norms else mm(q, k, trans_b=True)
      scores = qk * (scale * gates.gamma)
    else:
      scores = p_ref[b, h, n]
    out = (scale * gates.from_start * rq)[:, None] * mm(q, state) + mm(scores, v_new)
    o_ref[b, tokens, h, cols] = out.astype(o_ref.dtype)
    return gates.decay * state + mm(k, (gates.to_end * rk)[:, None] * v_new, trans_a=True)

  final_ref[b, h, :, cols] = jax.lax.fori_loop(0, num_chunks, step, h0_ref[b, h, :, cols])


def scores_kernel(*refs, chunk: int, groups: int, scale: float, segmented: bool, mm, normalizes: bool = False):
  """One (chunk, key head, row): P = s Gamma * (q k^T) [C, C] of each of the key head's value heads, from one
  whole-tile q k^T (ChunkedLaunch.scores_warps). prep_kernel's P (outputs="p") forms q k^T by [b, b] blocks in every
  value head's program, the shape its one-warp launch suits; this program is launched with more warps, so that the
  product runs as one tensor-core tile, and shares it across the group.

  normalizes: q, k are the raw ones (in the kernels' operand dtype); the chunk's rows are l2-normalised here in
  float32 and rounded to that dtype (as gpu.kernel_qk does under XLA), written as the two outputs after P for the T
  launch and the walk, and P is formed from them: the norm's read of q, k is P's (ChunkedLaunch.prefill_scores_norm).
  """
  (q_ref, k_ref, gc_ref), seg_refs, outs = _split_refs(refs, 3, segmented)
  n, hk, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tokens = pl.ds(n * chunk, chunk)
  q, k = q_ref[b, tokens, hk, :], k_ref[b, tokens, hk, :]
  if normalizes:
    q, k = (l2_normalize(_f32(x)).astype(target.dtype) for x, target in ((q, outs[1]), (k, outs[2])))
    outs[1][b, tokens, hk, :] = q
    outs[2][b, tokens, hk, :] = k
  qk = mm(q, k, trans_b=True)
  for head in [hk * groups + g for g in range(groups)]:
    gamma = _gates(gc_ref, seg_refs, b, head, tokens, chunk).gamma
    outs[0][b, head, n] = (qk * (scale * gamma)).astype(outs[0].dtype)
