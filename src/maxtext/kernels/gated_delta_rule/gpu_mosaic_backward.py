"""gpu_backward.chunk_grad_kernel's math as one Mosaic GPU warpgroup per (value head, chunk, row)
(ChunkedLaunch(chunk_grads_mosaic=True)): every input tile by TMA into shared memory (192 KB), every product by
wgmma, independent products issued together with one wait. Same inputs and outputs as the Triton kernel.

Scope (`applies`): no segment ids, the fused forward's saved P, C = 64, Dk = Dv = 128, 16-bit storage, compiled
(Mosaic GPU has no interpret mode for TMA copies, so CI cannot run it; its test is the device test). Measured on an
H200 (2026-12-02, docs/benchmarks.md, benchmarks/gated_delta_rule_mosaic_bwd.py): 0.235 / 0.889 / 1.788 ms against
the Triton kernel's 0.255 / 0.990 / 1.970 at 1 x 4096 / 1 x 16384 / 8 x 4096 (Hk 16, Hv 32, d 128, bf16).

With the forward's algebra (gpu.py; gpu_backward.py's docstring): x = beta (v - fs (k h)) overwrites v's tile after
phase 1, and each output tile reuses an input tile whose last reader is done (dq in do's, dk in v_new's, dv in
dv_new's).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

C = 64
WG = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per tile row
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per tile column


# jax 0.10 takes load's index apart from the ref; 0.11 deprecates that (the ref carries it).
_LOAD_NEEDS_INDEX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def load(ref, layout):
  """A shared-memory ref's whole contents into registers in `layout`."""
  return plgpu.load(ref, (), layout=layout) if _LOAD_NEEDS_INDEX else plgpu.load(ref, layout=layout)


def transposed(ref):
  """A 2-D shared-memory ref read as its transpose (wgmma operands)."""
  return ref.T


def tile(shape, dtype=jnp.bfloat16):
  """A shared-memory tile swizzled for TMA and wgmma."""
  swizzle = plgpu.find_swizzle(shape[-1] * jnp.dtype(dtype).itemsize * 8)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)))


def product(a, b, shape, init=None):
  """init + a @ b in float32 (a: shared-memory ref or 16-bit registers in the wgmma layout; b: shared memory).
  The barrier keeps reads of the result after the wgmma wait."""
  if init is None:
    def scoped(acc):
      plgpu.wgmma(acc, a, b)
      return acc[...]
    out = pl.run_scoped(scoped, plgpu.ACC(shape, jnp.float32))
  else:
    def body(acc):
      plgpu.wgmma(acc, a, b)
    out = pl.run_state(body)(plgpu.ACC.init(init))
  return lax.optimization_barrier(out)


def products(*specs):
  """Independent float32 products a @ b, (a, b, shape) each, issued together with one wait for all, so that the
  tensor cores start the next while the previous drains."""
  def scoped(*accs):
    for acc, (a, b, _) in zip(accs, specs):
      plgpu.wgmma(acc, a, b)
    return tuple(acc[...] for acc in accs)
  out = pl.run_scoped(scoped, *(plgpu.ACC(shape, jnp.float32) for _, _, shape in specs))
  return lax.optimization_barrier(out)


def rows_of(vec, shape):
  return lax.broadcast_in_dim(vec, shape, [0])


def cols_of(vec, shape):
  return lax.broadcast_in_dim(vec, shape, [1])


def applies(*, chunk: int, key_dim: int, value_dim: int, store, segmented: bool, with_scores: bool,
            interpret: bool) -> bool:
  """Whether chunk_grads covers this backward (the module docstring's scope); gpu.py runs the Triton kernel else."""
  return (chunk == C and key_dim == value_dim == 128 and jnp.dtype(store) == jnp.bfloat16 and not segmented
          and with_scores and not interpret)


def chunk_grads(q: jax.Array, k: jax.Array, v: jax.Array, gc: jax.Array, beta: jax.Array, t: jax.Array,
                states: jax.Array, d_states: jax.Array, d_out: jax.Array, v_new: jax.Array, dv_new: jax.Array,
                scores: jax.Array, *, scale: float, groups: int) -> tuple[jax.Array, ...]:
  """Arrays as chunk_grad_kernel's (bf16 but gc and beta, float32 [B, Hv, T]); returns (dq, dk, dv, dgc, dbeta) as
  it does, dq and dk per value head."""
  batch, length, heads, dim = v.shape
  chunks = length // C
  bf16, f32 = jnp.bfloat16, jnp.float32
  half = dim // 2
  out_shape = (jax.ShapeDtypeStruct((batch, length, heads, dim), q.dtype),
               jax.ShapeDtypeStruct((batch, length, heads, dim), q.dtype),
               jax.ShapeDtypeStruct((batch, length, heads, dim), v.dtype),
               jax.ShapeDtypeStruct((batch, heads, length), f32),
               jax.ShapeDtypeStruct((batch, heads, length), f32))
  vec = plgpu.SMEM((C,), f32)
  scratch = dict(
      q_s=tile((C, dim)), k_s=tile((C, dim)), v_s=tile((C, dim)), do_s=tile((C, dim)), vn_s=tile((C, dim)),
      dvn_s=tile((C, dim)), h_s=tile((dim, dim)), dh_s=tile((dim, dim)), t_s=tile((C, C)), p_s=tile((C, C)),
      cc_s=tile((C, C)), dqk_s=tile((C, C)), gc_s=vec, gcc_s=vec, beta_s=vec, sum_s=vec, dgc_o=vec, dbeta_o=vec,
      first=plgpu.Barrier(num_arrivals=8), rest=plgpu.Barrier(num_arrivals=5))

  def body(q_ref, k_ref, v_ref, gc_ref, beta_ref, t_ref, h_ref, dh_ref, do_ref, vn_ref, dvn_ref, p_ref,
           dq_ref, dk_ref, dv_ref, dgc_ref, dbeta_ref, q_s, k_s, v_s, do_s, vn_s, dvn_s, h_s, dh_s, t_s, p_s, cc_s,
           dqk_s, gc_s, gcc_s, beta_s, sum_s, dgc_o, dbeta_o, first, rest):
    h, n, b = lax.axis_index("h"), lax.axis_index("n"), lax.axis_index("b")
    hk = lax.div(h, groups)
    tokens = pl.ds(n * C, C)
    # Phase 1's tiles behind one barrier, the rest behind another: phase 1 starts while they land.
    for src, dst in ((k_ref.at[b, tokens, hk], k_s), (h_ref.at[b, h, n], h_s), (t_ref.at[b, h, n], t_s),
                     (dvn_ref.at[b, tokens, h], dvn_s), (v_ref.at[b, tokens, h], v_s),
                     (gc_ref.at[b, h, tokens], gc_s), (gc_ref.at[b, h, tokens], gcc_s),
                     (beta_ref.at[b, h, tokens], beta_s)):
      plgpu.copy_gmem_to_smem(src, dst, first)
    for src, dst in ((q_ref.at[b, tokens, hk], q_s), (do_ref.at[b, tokens, h], do_s), (vn_ref.at[b, tokens, h], vn_s),
                     (p_ref.at[b, h, n], p_s), (dh_ref.at[b, h, n], dh_s)):
      plgpu.copy_gmem_to_smem(src, dst, rest)
    plgpu.barrier_wait(first)

    square, narrow = (C, C), (C, half)
    blocks = [pl.ds(0, half), pl.ds(half, half)]
    # Two copies of gc: one load cannot take both layouts (Mosaic merges identical loads).
    gc_row, gc_col = load(gc_s, ROW), load(gcc_s, COL)
    beta_row = load(beta_s, ROW)
    gc_last = gc_s[C - 1]
    fs, te = jnp.exp(gc_row), jnp.exp(gc_last - gc_row)
    decay = jnp.exp(gc_last)
    bw = beta_row * fs
    rows = plgpu.broadcasted_iota(jnp.int32, square, 0, layout=WG)
    cols = plgpu.broadcasted_iota(jnp.int32, square, 1, layout=WG)
    gamma = jnp.exp(jnp.where(rows >= cols, rows_of(gc_row, square) - cols_of(gc_col, square), -jnp.inf))

    # Phase 1, by value halves: k h, r = T^T dv_new and their row sums; x = beta (v - fs (k h)) replaces v.
    d_beta = d_bw = None
    for blk in blocks:
      kh, r = products((k_s, h_s.at[:, blk], narrow), (transposed(t_s), dvn_s.at[:, blk], narrow))
      vals = load(v_s.at[:, blk], WG).astype(f32)
      part_beta, part_bw = (r * vals).sum(axis=1), -(r * kh).sum(axis=1)
      d_beta = part_beta if d_beta is None else d_beta + part_beta
      d_bw = part_bw if d_bw is None else d_bw + part_bw
      v_s.at[:, blk][...] = (rows_of(beta_row, narrow) * (vals - rows_of(fs, narrow) * kh)).astype(bf16)
    plgpu.commit_smem()
    plgpu.barrier_wait(rest)
    # do v_new^T, dv_new x^T, k k^T
    d_scores, d_t, kk = products((do_s, transposed(vn_s), square),
                                 (dvn_s, transposed(v_s), square),
                                 (k_s, transposed(k_s), square))
    cc_s[...] = product(d_t.astype(bf16), transposed(t_s), square).astype(bf16)  # dT T^T
    plgpu.commit_smem()
    d_a = jnp.where(rows > cols, -product(transposed(t_s), cc_s, square), 0.0)
    kk_gamma = kk * gamma
    dbeta_o[...] = d_beta + d_bw * fs + (d_a * kk_gamma).sum(axis=1)
    d_a_pairs = d_a * rows_of(beta_row, square) * kk_gamma
    d_kk = (d_a * rows_of(beta_row, square) * gamma).astype(bf16)
    d_qk = (d_scores * (scale * gamma)).astype(bf16)
    d_pairs = d_scores * load(p_s, WG).astype(f32) + d_a_pairs
    sum_s[...] = d_pairs.sum(axis=0)  # column sums, read back one per row
    cc_s[...] = d_kk
    dqk_s[...] = d_qk
    plgpu.commit_smem()
    dgc = d_bw * bw + d_pairs.sum(axis=1) - load(sum_s, ROW)

    # dq = s fs (do h^T) + dP' k, by key halves; do's tile then holds dq.
    d_q_state, dq = None, []
    q_states = products(*((do_s, transposed(h_s.at[kb]), narrow) for kb in blocks))
    for kb, q_state in zip(blocks, q_states):
      part = (q_state * load(q_s.at[:, kb], WG).astype(f32)).sum(axis=1)
      d_q_state = part if d_q_state is None else d_q_state + part
      dq.append(product(d_qk, k_s.at[:, kb], narrow, init=rows_of(scale * fs, narrow) * q_state).astype(bf16))
    for kb, dq_half in zip(blocks, dq):
      do_s.at[:, kb][...] = dq_half
    # w_state = dv_new h^T replaces x in v's tile.
    w_states = products(*((dvn_s, transposed(h_s.at[kb]), narrow) for kb in blocks))
    for kb, w_state in zip(blocks, w_states):
      v_s.at[:, kb][...] = w_state.astype(bf16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(do_s, dq_ref.at[b, tokens, h])
    # dk = te (v_new dh^T) - bw T^T w_state + dP'^T q + (dA' + dA'^T) k, by key halves; v_new's tile then holds dk.
    d_te, dk = None, []
    k_states = products(*((vn_s, transposed(dh_s.at[kb]), narrow) for kb in blocks))
    for kb, k_state in zip(blocks, k_states):
      part = rows_of(te, narrow) * k_state
      d_te_part = te * (k_state * load(k_s.at[:, kb], WG).astype(f32)).sum(axis=1)
      d_te = d_te_part if d_te is None else d_te + d_te_part
      part = part - rows_of(bw, narrow) * product(transposed(t_s), v_s.at[:, kb], narrow)
      part = product(transposed(dqk_s), q_s.at[:, kb], narrow, init=part)
      part = product(d_kk, k_s.at[:, kb], narrow, init=part)
      dk.append(product(transposed(cc_s), k_s.at[:, kb], narrow, init=part).astype(bf16))
    for kb, dk_half in zip(blocks, dk):
      vn_s.at[:, kb][...] = dk_half
    # dv = beta T^T dv_new (r again: holding it through the phases would cost its registers); dv_new's tile holds it.
    dv = [(rows_of(beta_row, narrow) * r).astype(bf16)
          for r in products(*((transposed(t_s), dvn_s.at[:, blk], narrow) for blk in blocks))]
    for blk, dv_half in zip(blocks, dv):
      dvn_s.at[:, blk][...] = dv_half
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(vn_s, dk_ref.at[b, tokens, h])
    plgpu.copy_smem_to_gmem(dvn_s, dv_ref.at[b, tokens, h])

    # The last token's share: sum(d_te) and the state's decay, decay sum(h dh).
    d_decay_rows = None
    for blk in blocks:  # 64 state rows at a time
      part = (load(h_s.at[blk], WG).astype(f32)
              * load(dh_s.at[blk], WG).astype(f32)).sum(axis=1)
      plgpu.commit_smem()  # every thread has read sum_s before it is written again
      sum_s[...] = part
      plgpu.commit_smem()
      total = load(sum_s, COL).sum()
      d_decay_rows = total if d_decay_rows is None else d_decay_rows + total
    plgpu.commit_smem()
    sum_s[...] = d_te
    plgpu.commit_smem()
    d_te_total = load(sum_s, COL).sum()
    is_last = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=ROW) == C - 1
    dgc = dgc + scale * fs * d_q_state - d_te + jnp.where(is_last, d_te_total + d_decay_rows * decay, 0.0)
    dgc_o[...] = dgc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dgc_o, dgc_ref.at[b, h, tokens])
    plgpu.copy_smem_to_gmem(dbeta_o, dbeta_ref.at[b, h, tokens])
    plgpu.wait_smem_to_gmem(0)

  kernel = plgpu.kernel(body, out_type=out_shape, scratch_types=scratch, grid=(heads, chunks, batch),
                        grid_names=("h", "n", "b"), compiler_params=plgpu.CompilerParams(approx_math=True))
  return kernel(q, k, v, gc, beta, t, states, d_states, d_out, v_new, dv_new, scores)


