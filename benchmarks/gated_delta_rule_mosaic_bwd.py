"""PROTOTYPE, not yet run on a GPU (written 2026-12-02 after the session's device time ran out; not in the
package): gpu_backward.chunk_grad_kernel's math as one Mosaic GPU warpgroup per (value head, chunk, row), every
input tile by TMA into shared memory (192 KB), every product by wgmma. The Triton kernel it would replace uses 255
registers with spills (benchmarks/kernel_registers.py) and is 1.45x the time of jax-linear-attention's warp-specialised
Mosaic GPU kernel (docs/benchmarks.md, issue 18, fifth session).

Scope: no segment ids, the fused forward's saved P, C = 64, Dk = Dv = 128, 16-bit storage. Same inputs and outputs
as chunk_grad_kernel (gpu.py's backward), so the two are compared and timed on the same random arrays.

CPU (lowering for CUDA only; it lowers with jax 0.10.2 and jax-cuda12-plugin 0.10.2, see kernel_registers.py):
  JAX_PLATFORMS=cpu PYTHONPATH=/tmp/cudasite:src python3 benchmarks/gated_delta_rule_mosaic_bwd.py --lower
GPU (errors against the Triton kernel, then ms of both at 1 x 4096, 1 x 16384, 8 x 4096; Hk 16, Hv 32, d 128):
  PYTHONPATH=src:benchmarks python3 benchmarks/gated_delta_rule_mosaic_bwd.py
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

C = 64
WG = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per tile row
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per tile column


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


def rows_of(vec, shape):
  return lax.broadcast_in_dim(vec, shape, [0])


def cols_of(vec, shape):
  return lax.broadcast_in_dim(vec, shape, [1])


def chunk_grads(q, k, v, gc, beta, t, states, d_states, d_out, v_new, dv_new, scores, *, scale: float,
                groups: int):
  """Arrays as chunk_grad_kernel's; returns (dq, dk, dv, dgc, dbeta) as it does."""
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
      cc_s=tile((C, C)), dqk_s=tile((C, C)), gc_s=vec, beta_s=vec, sum_s=vec, dgc_o=vec, dbeta_o=vec,
      loaded=plgpu.Barrier(num_arrivals=12))

  def body(q_ref, k_ref, v_ref, gc_ref, beta_ref, t_ref, h_ref, dh_ref, do_ref, vn_ref, dvn_ref, p_ref,
           dq_ref, dk_ref, dv_ref, dgc_ref, dbeta_ref, q_s, k_s, v_s, do_s, vn_s, dvn_s, h_s, dh_s, t_s, p_s, cc_s,
           dqk_s, gc_s, beta_s, sum_s, dgc_o, dbeta_o, loaded):
    h, n, b = lax.axis_index("h"), lax.axis_index("n"), lax.axis_index("b")
    hk = lax.div(h, groups)
    tokens = pl.ds(n * C, C)
    for src, dst in ((q_ref.at[b, tokens, hk], q_s), (k_ref.at[b, tokens, hk], k_s), (v_ref.at[b, tokens, h], v_s),
                     (do_ref.at[b, tokens, h], do_s), (vn_ref.at[b, tokens, h], vn_s),
                     (dvn_ref.at[b, tokens, h], dvn_s), (h_ref.at[b, h, n], h_s), (dh_ref.at[b, h, n], dh_s),
                     (t_ref.at[b, h, n], t_s), (p_ref.at[b, h, n], p_s), (gc_ref.at[b, h, tokens], gc_s),
                     (beta_ref.at[b, h, tokens], beta_s)):
      plgpu.copy_gmem_to_smem(src, dst, loaded)
    plgpu.barrier_wait(loaded)

    square, narrow = (C, C), (C, half)
    blocks = [pl.ds(0, half), pl.ds(half, half)]
    gc_row, gc_col = plgpu.load(gc_s, (), layout=ROW), plgpu.load(gc_s, (), layout=COL)
    beta_row = plgpu.load(beta_s, (), layout=ROW)
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
      kh = product(k_s, h_s.at[:, blk], narrow)
      r = product(plgpu.transpose_ref(t_s, (1, 0)), dvn_s.at[:, blk], narrow)
      vals = plgpu.load(v_s.at[:, blk], (), layout=WG).astype(f32)
      part_beta, part_bw = (r * vals).sum(axis=1), -(r * kh).sum(axis=1)
      d_beta = part_beta if d_beta is None else d_beta + part_beta
      d_bw = part_bw if d_bw is None else d_bw + part_bw
      v_s.at[:, blk][...] = (rows_of(beta_row, narrow) * (vals - rows_of(fs, narrow) * kh)).astype(bf16)
    plgpu.commit_smem()
    d_scores = product(do_s, plgpu.transpose_ref(vn_s, (1, 0)), square)  # do v_new^T
    d_t = product(dvn_s, plgpu.transpose_ref(v_s, (1, 0)), square)  # dv_new x^T
    cc_s[...] = product(d_t.astype(bf16), plgpu.transpose_ref(t_s, (1, 0)), square).astype(bf16)  # dT T^T
    plgpu.commit_smem()
    d_a = jnp.where(rows > cols, -product(plgpu.transpose_ref(t_s, (1, 0)), cc_s, square), 0.0)
    kk_gamma = product(k_s, plgpu.transpose_ref(k_s, (1, 0)), square) * gamma
    dbeta_o[...] = d_beta + d_bw * fs + (d_a * kk_gamma).sum(axis=1)
    d_a_pairs = d_a * rows_of(beta_row, square) * kk_gamma
    d_kk = (d_a * rows_of(beta_row, square) * gamma).astype(bf16)
    d_qk = (d_scores * (scale * gamma)).astype(bf16)
    d_pairs = d_scores * plgpu.load(p_s, (), layout=WG).astype(f32) + d_a_pairs
    sum_s[...] = d_pairs.sum(axis=0)  # column sums, read back one per row
    cc_s[...] = d_kk
    dqk_s[...] = d_qk
    plgpu.commit_smem()
    dgc = d_bw * bw + d_pairs.sum(axis=1) - plgpu.load(sum_s, (), layout=ROW)

    # dq = s fs (do h^T) + dP' k, by key halves; do's tile then holds dq.
    d_q_state, dq = None, []
    for kb in blocks:
      q_state = product(do_s, plgpu.transpose_ref(h_s.at[kb], (1, 0)), narrow)
      part = (q_state * plgpu.load(q_s.at[:, kb], (), layout=WG).astype(f32)).sum(axis=1)
      d_q_state = part if d_q_state is None else d_q_state + part
      dq.append(product(d_qk, k_s.at[:, kb], narrow, init=rows_of(scale * fs, narrow) * q_state).astype(bf16))
    for kb, dq_half in zip(blocks, dq):
      do_s.at[:, kb][...] = dq_half
    # w_state = dv_new h^T replaces x in v's tile.
    for kb in blocks:
      v_s.at[:, kb][...] = product(dvn_s, plgpu.transpose_ref(h_s.at[kb], (1, 0)), narrow).astype(bf16)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(do_s, dq_ref.at[b, tokens, h])
    # dk = te (v_new dh^T) - bw T^T w_state + dP'^T q + (dA' + dA'^T) k, by key halves; v_new's tile then holds dk.
    d_te, dk = None, []
    for kb in blocks:
      k_state = product(vn_s, plgpu.transpose_ref(dh_s.at[kb], (1, 0)), narrow)
      part = rows_of(te, narrow) * k_state
      d_te_part = te * (k_state * plgpu.load(k_s.at[:, kb], (), layout=WG).astype(f32)).sum(axis=1)
      d_te = d_te_part if d_te is None else d_te + d_te_part
      part = part - rows_of(bw, narrow) * product(plgpu.transpose_ref(t_s, (1, 0)), v_s.at[:, kb], narrow)
      part = product(plgpu.transpose_ref(dqk_s, (1, 0)), q_s.at[:, kb], narrow, init=part)
      part = product(d_kk, k_s.at[:, kb], narrow, init=part)
      dk.append(product(plgpu.transpose_ref(cc_s, (1, 0)), k_s.at[:, kb], narrow, init=part).astype(bf16))
    for kb, dk_half in zip(blocks, dk):
      vn_s.at[:, kb][...] = dk_half
    # dv = beta T^T dv_new (r again: holding it through the phases would cost its registers); dv_new's tile holds it.
    dv = [(rows_of(beta_row, narrow) * product(plgpu.transpose_ref(t_s, (1, 0)), dvn_s.at[:, blk], narrow)
           ).astype(bf16) for blk in blocks]
    for blk, dv_half in zip(blocks, dv):
      dvn_s.at[:, blk][...] = dv_half
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(vn_s, dk_ref.at[b, tokens, h])
    plgpu.copy_smem_to_gmem(dvn_s, dv_ref.at[b, tokens, h])

    # The last token's share: sum(d_te) and the state's decay, decay sum(h dh).
    d_decay_rows = None
    for blk in blocks:  # 64 state rows at a time
      part = (plgpu.load(h_s.at[blk], (), layout=WG).astype(f32)
              * plgpu.load(dh_s.at[blk], (), layout=WG).astype(f32)).sum(axis=1)
      plgpu.commit_smem()  # every thread has read sum_s before it is written again
      sum_s[...] = part
      plgpu.commit_smem()
      total = plgpu.load(sum_s, (), layout=COL).sum()
      d_decay_rows = total if d_decay_rows is None else d_decay_rows + total
    plgpu.commit_smem()
    sum_s[...] = d_te
    plgpu.commit_smem()
    d_te_total = plgpu.load(sum_s, (), layout=COL).sum()
    is_last = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=ROW) == C - 1
    dgc = dgc + scale * fs * d_q_state - d_te + jnp.where(is_last, d_te_total + d_decay_rows * decay, 0.0)
    dgc_o[...] = dgc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dgc_o, dgc_ref.at[b, h, tokens])
    plgpu.copy_smem_to_gmem(dbeta_o, dbeta_ref.at[b, h, tokens])
    plgpu.wait_smem_to_gmem(0)

  kernel = plgpu.kernel(body, out_type=out_shape, scratch_types=scratch, grid=(heads, chunks, batch),
                        grid_names=("h", "n", "b"))
  return kernel(q, k, v, gc, beta, t, states, d_states, d_out, v_new, dv_new, scores)


def random_inputs(batch=1, length=4096, key_heads=16, heads=32, dim=128, seed=0):
  keys = jax.random.split(jax.random.key(seed), 12)
  chunks = length // C
  bf = jnp.bfloat16
  normal = lambda key, shape, s=1.0: (s * jax.random.normal(key, shape)).astype(bf)
  gc = jnp.cumsum(-0.05 * jax.random.uniform(keys[3], (batch, heads, chunks, C)), axis=-1).reshape(batch, heads, -1)
  beta = jax.random.uniform(keys[4], (batch, heads, length))
  tri = jnp.tril(jnp.ones((C, C)), -1)
  t = (jnp.eye(C) + 0.1 * tri * jax.random.normal(keys[5], (batch, heads, chunks, C, C))).astype(bf)
  p = (0.1 * jnp.tril(jnp.ones((C, C))) * jax.random.normal(keys[11], (batch, heads, chunks, C, C))).astype(bf)
  keys_shape, values_shape = (batch, length, key_heads, dim), (batch, length, heads, dim)
  states_shape = (batch, heads, chunks, dim, dim)
  q, k = normal(keys[0], keys_shape, dim**-0.5), normal(keys[1], keys_shape, dim**-0.5)
  states, d_states = normal(keys[6], states_shape, 0.1), normal(keys[7], states_shape, 0.1)
  d_out, v_new, dv_new = (normal(keys[i], values_shape) for i in (8, 9, 10))
  return q, k, normal(keys[2], values_shape), gc, beta, t, states, d_states, d_out, v_new, dv_new, p


def triton_chunk_grads(*args, scale, groups):
  """gpu.py's fused-backward call of chunk_grad_kernel (its default launch) on the same arrays."""
  from maxtext.kernels.gated_delta_rule import gpu_backward
  from maxtext.kernels.gated_delta_rule.gpu import ChunkedLaunch
  from maxtext.kernels.gated_delta_rule.gpu_precision import matmul_mode
  from maxtext.kernels.triton_compat import TritonParams
  launch = ChunkedLaunch()
  q, v = args[0], args[2]
  batch, length, heads, dim = v.shape
  _, store, mm = matmul_mode((q, v), None, False)
  struct = lambda *shape, dtype=store: jax.ShapeDtypeStruct(shape, dtype)
  kernel = functools.partial(gpu_backward.chunk_grad_kernel, segmented=False, chunk=C, groups=groups,
                             block_k=launch.grad_block_k, block_v=launch.grad_block_v, scale=scale, with_scores=True,
                             mm=mm, heads_fastest=launch.grad_heads_fastest)
  grid = (heads, length // C, batch) if launch.grad_heads_fastest else (length // C, heads, batch)
  return pl.pallas_call(kernel, grid=grid, name="gdr_chunk_bwd",
                        out_shape=(struct(batch, length, heads, dim), struct(batch, length, heads, dim),
                                   struct(batch, length, heads, dim), struct(batch, heads, length, dtype=jnp.float32),
                                   struct(batch, heads, length, dtype=jnp.float32)),
                        compiler_params=TritonParams(num_warps=launch.grad_warps, num_stages=launch.grad_stages))(*args)


def main() -> None:
  scale, groups = 128**-0.5, 2
  if "--lower" in sys.argv:
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_inputs(length=256, key_heads=2,
                                                                                          heads=4))
    lowered = jax.jit(functools.partial(chunk_grads, scale=scale, groups=groups)).trace(*args).lower(
        lowering_platforms=("cuda",))
    print("lowered:", len(lowered.as_text()), "characters")
    return
  from gated_delta_rule import errors  # benchmarks/
  from timing import time_jax
  for batch, length in ((1, 4096), (1, 16384), (8, 4096)):
    args = random_inputs(batch, length)
    ours = jax.jit(functools.partial(chunk_grads, scale=scale, groups=groups))
    triton = jax.jit(functools.partial(triton_chunk_grads, scale=scale, groups=groups))
    got, want = ours(*args), triton(*args)
    worst = [errors(a, b)[0] for a, b in zip(got, want)]  # max|a-b| / max|b|
    print(f"{batch}x{length} error vs triton (dq, dk, dv, dgc, dbeta): " + ", ".join(f"{e:.1e}" for e in worst))
    print(f"{batch}x{length} ms: mosaic {time_jax(ours, *args):.3f}  triton {time_jax(triton, *args):.3f}", flush=True)


if __name__ == "__main__":
  main()
