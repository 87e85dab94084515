"""gpu_backward.chunk_grad_kernel's math as one Mosaic GPU warpgroup per (value head, chunk, row)
(ChunkedLaunch(chunk_grads_mosaic=1); chunk_grads_two_warpgroups splits each chunk between two): every input tile
by TMA into shared memory (192 KB), every product by wgmma, independent products issued together with one wait.
Same inputs and outputs as the Triton kernel.

Scope (`applies`): no segment ids, the fused forward's saved P, C = 64, Dk = Dv = 128, 16-bit storage, compiled
(Mosaic GPU has no interpret mode for TMA copies, so CI cannot run it; its test is the device test, passed on an
H200 on 2026-12-02). Measured alone on an H200 (2026-12-02, docs/benchmarks.md, eighth session,
benchmarks/gated_delta_rule_mosaic_bwd.py; Hk 16, Hv 32, d 128, bf16) at 1 x 4096 / 1 x 16384 / 8 x 4096: two
warpgroups 0.181 / 0.674 / 1.337 ms (no spills; gpu.py's default), one 0.216 / 0.815 / 1.698 (504 bytes of spills,
benchmarks/mosaic_registers.py), the Triton kernel 0.255 / 0.989 / 1.969.

With the forward's algebra (gpu.py; gpu_backward.py's docstring): x = beta (v - fs (k h)) overwrites v's tile after
phase 1, and each output tile reuses an input tile whose last reader is done (dq in do's, dk in v_new's, dv in
dv_new's).
"""

from __future__ import annotations

import functools
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


def accumulate(pairs, init):
  """init + the sum of a @ b over pairs in float32, by wgmma into one accumulator (a: shared-memory ref or 16-bit
  registers in the wgmma layout; b: shared memory). The barrier keeps reads of the result after the wgmma wait."""
  def body(acc):
    for a, b in pairs:
      plgpu.wgmma(acc, a, b)
  return lax.optimization_barrier(pl.run_state(body)(plgpu.ACC.init(init)))


def product(a, b, shape, init=None):
  """init + a @ b in float32 (operands as accumulate's)."""
  return products((a, b, shape))[0] if init is None else accumulate([(a, b)], init)


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


def applies(*, chunk: int, key_dim: int, value_dim: int, dtypes, segmented: bool, with_scores: bool,
            interpret: bool) -> bool:
  """Whether chunk_grads covers this backward (the module docstring's scope): dtypes are the storage dtype and
  q's and v's as the kernels receive them, all bfloat16 (the tiles are). gpu.py runs the Triton kernel else."""
  return (chunk == C and key_dim == value_dim == 128 and all(jnp.dtype(d) == jnp.bfloat16 for d in dtypes)
          and not segmented and with_scores and not interpret)


def _output_types(q: jax.Array, v: jax.Array) -> tuple[jax.ShapeDtypeStruct, ...]:
  """(dq, dk, dv, dgc, dbeta) as chunk_grad_kernel returns them: dq, dk per value head."""
  batch, length, heads, dim = v.shape
  tokens = lambda dtype: jax.ShapeDtypeStruct((batch, length, heads, dim), dtype)
  per_head = jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)
  return tokens(q.dtype), tokens(q.dtype), tokens(v.dtype), per_head, per_head


def _input_tiles(dim: int) -> dict:
  """The shared-memory tiles every form loads (gc twice: one load cannot take the row and the column layouts, and
  Mosaic merges identical loads), plus the two [C, C] work tiles; then each form's own scratch follows."""
  vec = plgpu.SMEM((C,), jnp.float32)
  return dict(q_s=tile((C, dim)), k_s=tile((C, dim)), v_s=tile((C, dim)), do_s=tile((C, dim)), vn_s=tile((C, dim)),
              dvn_s=tile((C, dim)), h_s=tile((dim, dim)), dh_s=tile((dim, dim)), t_s=tile((C, C)), p_s=tile((C, C)),
              cc_s=tile((C, C)), dqk_s=tile((C, C)), gc_s=vec, gcc_s=vec, beta_s=vec)


LOAD_BARRIERS = dict(first=plgpu.Barrier(num_arrivals=8), rest=plgpu.Barrier(num_arrivals=5))


def _issue_loads(ins, scratch: dict, *, b, h, n, hk) -> None:
  """TMA copies of one chunk's inputs: phase 1's tiles behind `first`, the rest behind `rest`, so that phase 1
  starts while they land. ins: the kernel's input refs in chunk_grads' argument order; scratch: by name."""
  q_ref, k_ref, v_ref, gc_ref, beta_ref, t_ref, h_ref, dh_ref, do_ref, vn_ref, dvn_ref, p_ref = ins
  names = ("q_s", "k_s", "v_s", "do_s", "vn_s", "dvn_s", "h_s", "dh_s", "t_s", "p_s", "gc_s", "gcc_s", "beta_s")
  q_s, k_s, v_s, do_s, vn_s, dvn_s, h_s, dh_s, t_s, p_s, gc_s, gcc_s, beta_s = (scratch[name] for name in names)
  first, rest = scratch["first"], scratch["rest"]
  tokens = pl.ds(n * C, C)
  for src, dst in ((k_ref.at[b, tokens, hk], k_s), (h_ref.at[b, h, n], h_s), (t_ref.at[b, h, n], t_s),
                   (dvn_ref.at[b, tokens, h], dvn_s), (v_ref.at[b, tokens, h], v_s),
                   (gc_ref.at[b, h, tokens], gc_s), (gc_ref.at[b, h, tokens], gcc_s),
                   (beta_ref.at[b, h, tokens], beta_s)):
    plgpu.copy_gmem_to_smem(src, dst, first)
  for src, dst in ((q_ref.at[b, tokens, hk], q_s), (do_ref.at[b, tokens, h], do_s), (vn_ref.at[b, tokens, h], vn_s),
                   (p_ref.at[b, h, n], p_s), (dh_ref.at[b, h, n], dh_s)):
    plgpu.copy_gmem_to_smem(src, dst, rest)


def chunk_grads(q: jax.Array, k: jax.Array, v: jax.Array, gc: jax.Array, beta: jax.Array, t: jax.Array,
                states: jax.Array, d_states: jax.Array, d_out: jax.Array, v_new: jax.Array, dv_new: jax.Array,
                scores: jax.Array, *, scale: float, groups: int) -> tuple[jax.Array, ...]:
  """Arrays as chunk_grad_kernel's (bf16 but gc and beta, float32 [B, Hv, T]); returns (dq, dk, dv, dgc, dbeta) as
  it does, dq and dk per value head."""
  batch, length, heads, dim = v.shape
  bf16, f32 = jnp.bfloat16, jnp.float32
  half = dim // 2
  vec = plgpu.SMEM((C,), f32)
  scratch = _input_tiles(dim) | dict(sum_s=vec, dgc_o=vec, dbeta_o=vec) | LOAD_BARRIERS

  def body(*refs, **scratch):  # Pallas passes the scratch by name
    ins, (dq_ref, dk_ref, dv_ref, dgc_ref, dbeta_ref) = refs[:12], refs[12:]
    q_s, k_s, v_s, do_s, vn_s, dvn_s, h_s, dh_s, t_s, p_s, cc_s, dqk_s, gc_s, gcc_s, beta_s = (
        scratch[name] for name in _input_tiles(dim))
    sum_s, dgc_o, dbeta_o, first, rest = (scratch[name] for name in ("sum_s", "dgc_o", "dbeta_o", "first", "rest"))
    h, n, b = lax.axis_index("h"), lax.axis_index("n"), lax.axis_index("b")
    tokens = pl.ds(n * C, C)
    _issue_loads(ins, scratch, b=b, h=h, n=n, hk=lax.div(h, groups))
    plgpu.barrier_wait(first)

    square, narrow = (C, C), (C, half)
    blocks = [pl.ds(0, half), pl.ds(half, half)]
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
    d_a = d_a * rows_of(beta_row, square)
    cc_s[...] = (d_a * gamma).astype(bf16)  # dKK: each [C, C] value goes to shared memory as soon as it is whole
    d_pairs = d_a * kk_gamma
    dqk_s[...] = (d_scores * (scale * gamma)).astype(bf16)  # dQK
    d_pairs = d_pairs + d_scores * load(p_s, WG).astype(f32)
    sum_s[...] = d_pairs.sum(axis=0)  # column sums, read back one per row
    plgpu.commit_smem()
    dgc = d_bw * bw + d_pairs.sum(axis=1) - load(sum_s, ROW)

    # dq = s fs (do h^T) + dP' k, by key halves; do's tile then holds dq.
    d_q_state, dq = None, []
    q_states = products(*((do_s, transposed(h_s.at[kb]), narrow) for kb in blocks))
    for kb, q_state in zip(blocks, q_states):
      part = (q_state * load(q_s.at[:, kb], WG).astype(f32)).sum(axis=1)
      d_q_state = part if d_q_state is None else d_q_state + part
      dq.append(product(dqk_s, k_s.at[:, kb], narrow, init=rows_of(scale * fs, narrow) * q_state).astype(bf16))
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
      part = product(cc_s, k_s.at[:, kb], narrow, init=part)
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

  kernel = plgpu.kernel(body, out_type=_output_types(q, v), scratch_types=scratch, grid=(heads, length // C, batch),
                        grid_names=("h", "n", "b"), compiler_params=plgpu.CompilerParams(approx_math=True))
  return kernel(q, k, v, gc, beta, t, states, d_states, d_out, v_new, dv_new, scores)




def chunk_grads_two_warpgroups(q: jax.Array, k: jax.Array, v: jax.Array, gc: jax.Array, beta: jax.Array,
                               t: jax.Array, states: jax.Array, d_states: jax.Array, d_out: jax.Array,
                               v_new: jax.Array, dv_new: jax.Array, scores: jax.Array, *, scale: float,
                               groups: int) -> tuple[jax.Array, ...]:
  """chunk_grads with two warpgroups per chunk, each taking one half of the value columns (phase 1, dv) and of the
  key columns (dq, dk), and one side of the [C, C] work: warpgroup 0 do v_new^T and P; warpgroup 1 dT, dA and k k^T.
  They meet at four barriers: x complete, the [C, C] tiles written, every reader of do / dv_new / v_new done (their
  tiles then take dq / dv / dk), and the vectors' partial sums written. Cross-warp sums (column sums, totals) use
  Pallas' one reduction scratch of the CTA, so the two warpgroups never take them at the same time: warpgroup 1's
  column sums wait for warpgroup 0's, and the totals are warpgroup 0's alone at the end."""
  batch, length, heads, dim = v.shape
  bf16, f32 = jnp.bfloat16, jnp.float32
  half = dim // 2
  vec = plgpu.SMEM((C,), f32)
  per_group = plgpu.SMEM((2, C), f32)
  meet = lambda arrivals=2: plgpu.Barrier(num_arrivals=arrivals)
  scratch = _input_tiles(dim) | dict(
      cols_p=per_group, dgc_p=per_group, dbeta_p=per_group, dte_p=per_group, hdh_p=per_group, dgc_o=vec,
      dbeta_o=vec) | LOAD_BARRIERS | dict(x_ready=meet(), cols_0=meet(1), squares=meet(), readers_done=meet(),
                                          sums=meet())

  def body(*refs, **scratch):  # Pallas passes the scratch by name
    ins, (dq_ref, dk_ref, dv_ref, dgc_ref, dbeta_ref) = refs[:12], refs[12:]
    q_s, k_s, v_s, do_s, vn_s, dvn_s, h_s, dh_s, t_s, p_s, cc_s, dqk_s, gc_s, gcc_s, beta_s = (
        scratch[name] for name in _input_tiles(dim))
    cols_p, dgc_p, dbeta_p, dte_p, hdh_p, dgc_o, dbeta_o = (
        scratch[name] for name in ("cols_p", "dgc_p", "dbeta_p", "dte_p", "hdh_p", "dgc_o", "dbeta_o"))
    first, rest, x_ready, cols_0, squares, readers_done, sums = (
        scratch[name] for name in ("first", "rest", "x_ready", "cols_0", "squares", "readers_done", "sums"))
    h, n, b = lax.axis_index("h"), lax.axis_index("n"), lax.axis_index("b")
    group = lax.axis_index("wg")
    tokens = pl.ds(n * C, C)
    pl.when(group == 0)(lambda: _issue_loads(ins, scratch, b=b, h=h, n=n, hk=lax.div(h, groups)))

    def work(w: int):
      square, narrow = (C, C), (C, half)
      own = pl.ds(w * half, half)  # this warpgroup's value columns, then key columns, then state rows
      plgpu.barrier_wait(first)
      gc_row, gc_col = load(gc_s, ROW), load(gcc_s, COL)
      beta_row = load(beta_s, ROW)
      gc_last = gc_s[C - 1]
      fs, te = jnp.exp(gc_row), jnp.exp(gc_last - gc_row)
      bw = beta_row * fs
      rows = plgpu.broadcasted_iota(jnp.int32, square, 0, layout=WG)
      cols = plgpu.broadcasted_iota(jnp.int32, square, 1, layout=WG)
      gamma = jnp.exp(jnp.where(rows >= cols, rows_of(gc_row, square) - cols_of(gc_col, square), -jnp.inf))

      # Phase 1 on this warpgroup's value columns: k h, r = T^T dv_new; x = beta (v - fs (k h)) replaces v.
      kh, r = products((k_s, h_s.at[:, own], narrow), (transposed(t_s), dvn_s.at[:, own], narrow))
      vals = load(v_s.at[:, own], WG).astype(f32)
      d_beta, d_bw = (r * vals).sum(axis=1), -(r * kh).sum(axis=1)
      v_s.at[:, own][...] = (rows_of(beta_row, narrow) * (vals - rows_of(fs, narrow) * kh)).astype(bf16)
      plgpu.commit_smem()
      plgpu.barrier_arrive(x_ready)
      plgpu.barrier_wait(x_ready)
      plgpu.barrier_wait(rest)

      if w == 0:  # dP' = s Gamma * (do v_new^T) into dqk_s; the pair terms d_scores * P
        d_scores = product(do_s, transposed(vn_s), square)
        dqk_s[...] = (d_scores * (scale * gamma)).astype(bf16)
        pairs = d_scores * load(p_s, WG).astype(f32)
        cols_p.at[0][...] = pairs.sum(axis=0)
        plgpu.barrier_arrive(cols_0)
      else:  # dT = dv_new x^T, dA = -T^T dT T^T (strictly lower), k k^T; dA' = beta Gamma * dA into cc_s
        d_t, kk = products((dvn_s, transposed(v_s), square), (k_s, transposed(k_s), square))
        cc_s[...] = product(d_t.astype(bf16), transposed(t_s), square).astype(bf16)
        plgpu.commit_smem()
        d_a = jnp.where(rows > cols, -product(transposed(t_s), cc_s, square), 0.0)
        kk_gamma = kk * gamma
        d_beta = d_beta + (d_a * kk_gamma).sum(axis=1)
        pairs = d_a * rows_of(beta_row, square) * kk_gamma
        cc_s[...] = (d_a * rows_of(beta_row, square) * gamma).astype(bf16)
        plgpu.barrier_wait(cols_0)
        cols_p.at[1][...] = pairs.sum(axis=0)
      d_pair_rows = pairs.sum(axis=1)
      plgpu.commit_smem()
      plgpu.barrier_arrive(squares)
      plgpu.barrier_wait(squares)

      # This warpgroup's key columns: dq = s fs (do h^T) + dP' k; dk = te (v_new dh^T) - bw T^T (dv_new h^T)
      # + dP'^T q + (dA' + dA'^T) k; and its value columns of dv = beta T^T dv_new.
      q_state, w_state, k_state = products((do_s, transposed(h_s.at[own]), narrow),
                                           (dvn_s, transposed(h_s.at[own]), narrow),
                                           (vn_s, transposed(dh_s.at[own]), narrow))
      plgpu.barrier_arrive(readers_done)  # this warpgroup no longer reads the whole do, dv_new, v_new tiles
      v_s.at[:, own][...] = w_state.astype(bf16)
      d_q_state = (q_state * load(q_s.at[:, own], WG).astype(f32)).sum(axis=1)
      d_te = te * (k_state * load(k_s.at[:, own], WG).astype(f32)).sum(axis=1)
      plgpu.commit_smem()
      dq = product(dqk_s, k_s.at[:, own], narrow, init=rows_of(scale * fs, narrow) * q_state)
      state_part, dv = products((transposed(t_s), v_s.at[:, own], narrow),
                                (transposed(t_s), dvn_s.at[:, own], narrow))
      part = rows_of(te, narrow) * k_state - rows_of(bw, narrow) * state_part
      part = product(transposed(dqk_s), q_s.at[:, own], narrow, init=part)
      part = product(cc_s, k_s.at[:, own], narrow, init=part)
      dk = product(transposed(cc_s), k_s.at[:, own], narrow, init=part)
      plgpu.barrier_wait(readers_done)
      do_s.at[:, own][...] = dq.astype(bf16)
      vn_s.at[:, own][...] = dk.astype(bf16)
      dvn_s.at[:, own][...] = (rows_of(beta_row, narrow) * dv).astype(bf16)

      # The vectors: this warpgroup's partial sums (its value / key columns, its side of the pairs, its state rows).
      hdh_p.at[w][...] = (load(h_s.at[own], WG).astype(f32) * load(dh_s.at[own], WG).astype(f32)).sum(axis=1)
      dte_p.at[w][...] = d_te
      dgc_p.at[w][...] = d_bw * bw + d_pair_rows + scale * fs * d_q_state - d_te
      dbeta_p.at[w][...] = d_beta + d_bw * fs
      plgpu.commit_smem()
      plgpu.barrier_arrive(sums)
      plgpu.barrier_wait(sums)
      if w == 0:
        total = lambda ref: load(ref.at[0], COL).sum() + load(ref.at[1], COL).sum()
        last_token = total(dte_p) + jnp.exp(gc_last) * total(hdh_p)
        is_last = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=ROW) == C - 1
        dgc_o[...] = (load(dgc_p.at[0], ROW) + load(dgc_p.at[1], ROW) - load(cols_p.at[0], ROW)
                      - load(cols_p.at[1], ROW) + jnp.where(is_last, last_token, 0.0))
        dbeta_o[...] = load(dbeta_p.at[0], ROW) + load(dbeta_p.at[1], ROW)
        plgpu.commit_smem()
        for src, dst in ((do_s, dq_ref.at[b, tokens, h]), (vn_s, dk_ref.at[b, tokens, h]),
                         (dvn_s, dv_ref.at[b, tokens, h]), (dgc_o, dgc_ref.at[b, h, tokens]),
                         (dbeta_o, dbeta_ref.at[b, h, tokens])):
          plgpu.copy_smem_to_gmem(src, dst)
        plgpu.wait_smem_to_gmem(0)

    for w in (0, 1):
      pl.when(group == w)(functools.partial(work, w))

  kernel = plgpu.kernel(body, out_type=_output_types(q, v), scratch_types=scratch, grid=(heads, length // C, batch),
                        grid_names=("h", "n", "b"), num_threads=2, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(approx_math=True))
  return kernel(q, k, v, gc, beta, t, states, d_states, d_out, v_new, dv_new, scores)


KERNELS = {1: chunk_grads, 2: chunk_grads_two_warpgroups}  # by warpgroups per chunk (ChunkedLaunch.chunk_grads_mosaic)
