"""gpu_kernels.state_grad_kernel's reverse walk (with the fused forward's P) as one Mosaic GPU warpgroup per (value
block, value head, row): chunks in reverse, the state's gradient dh [Dk, BV] carried in float32 registers as two
[64, BV] wgmma accumulators, every product by wgmma, and the next chunk's inputs loaded by TMA into the other of two
shared-memory slots while this chunk computes.

Per chunk n (gpu_kernels.state_grad_kernel's algebra, no segment ids):
  dh_{n+1} -> d_states[n];  dv_new = P^T do + te (k dh);  d_keys = beta fs (T^T dv_new)
  dh_n = decay dh_{n+1} + q^T (s fs do) - k^T d_keys

Scope: no segment ids, the fused forward's P, C = 64, Dk = 128, BV | Dv, bf16 storage. PROTOTYPE: lowers for CUDA on
the CPU (jax 0.10.2 and 0.11.2), has run on no GPU, and gpu.py does not call it;
benchmarks/gated_delta_rule_mosaic_walk.py compares it with the Triton walk on the same arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from maxtext.kernels.gated_delta_rule.gpu_mosaic_backward import (ROW, WG, load, product, products, rows_of, tile,
                                                                transposed)

C = 64
SLOTS = 2  # input buffers: chunk n computes while chunk n - 1 lands


def reverse_walk(q: jax.Array, k: jax.Array, t: jax.Array, gc: jax.Array, beta: jax.Array, d_out: jax.Array,
                 scores: jax.Array, d_final: jax.Array, *, scale: float, groups: int,
                 block_v: int = 64) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Arrays as state_grad_kernel's with local_from_scores (q, k [B, T, Hk, Dk]; t, scores [B, Hv, N, C, C]; gc, beta
  float32 [B, Hv, T]; d_out [B, T, Hv, Dv]; d_final float32 [B, Hv, Dk, Dv]) -> (dv_new [B, T, Hv, Dv],
  d_states [B, Hv, N, Dk, Dv] in d_out's dtype, dh0 float32 [B, Hv, Dk, Dv])."""
  batch, length, heads, value_dim = d_out.shape
  key_dim = q.shape[-1]
  chunks = length // C
  bf16, f32 = jnp.bfloat16, jnp.float32
  half = key_dim // 2
  out_type = (jax.ShapeDtypeStruct((batch, length, heads, value_dim), d_out.dtype),
              jax.ShapeDtypeStruct((batch, heads, chunks, key_dim, value_dim), d_out.dtype),
              jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), f32))
  vecs = plgpu.SMEM((SLOTS, C), f32)
  slotted = lambda shape: tile((SLOTS, *shape))
  scratch = dict(
      q_s=slotted((C, key_dim)), k_s=slotted((C, key_dim)), t_s=slotted((C, C)), p_s=slotted((C, C)),
      do_s=slotted((C, block_v)), gc_s=vecs, beta_s=vecs, dh_s=tile((key_dim, block_v)), dvn_s=tile((C, block_v)),
      dkeys_s=tile((C, block_v)), dout_s=tile((C, block_v)), dh32_s=tile((key_dim, block_v), f32),
      landed=plgpu.Barrier(num_arrivals=7, num_barriers=SLOTS), initial=plgpu.Barrier(num_arrivals=1))

  def body(q_ref, k_ref, t_ref, gc_ref, beta_ref, do_ref, p_ref, dfinal_ref, dvn_ref, dstates_ref, dh0_ref,
           q_s, k_s, t_s, p_s, do_s, gc_s, beta_s, dh_s, dvn_s, dkeys_s, dout_s, dh32_s, landed, initial):
    vb, h, b = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("b")
    hk = lax.div(h, groups)
    cols = pl.ds(vb * block_v, block_v)
    key_halves = [pl.ds(0, half), pl.ds(half, half)]
    wide = (C, block_v)

    def issue(n, slot):
      tokens = pl.ds(n * C, C)
      for src, dst in ((q_ref.at[b, tokens, hk], q_s), (k_ref.at[b, tokens, hk], k_s), (t_ref.at[b, h, n], t_s),
                       (p_ref.at[b, h, n], p_s), (do_ref.at[b, tokens, h, cols], do_s),
                       (gc_ref.at[b, h, tokens], gc_s), (beta_ref.at[b, h, tokens], beta_s)):
        plgpu.copy_gmem_to_smem(src, dst.at[slot], landed.at[slot])

    issue(chunks - 1, 0)
    plgpu.copy_gmem_to_smem(dfinal_ref.at[b, h, :, cols], dh32_s, initial)
    plgpu.barrier_wait(initial)
    start = tuple(load(dh32_s.at[rows], WG) for rows in key_halves)  # dh as two [64, BV] accumulator tiles

    def step(i, dh):
      n = chunks - 1 - i
      slot = lax.rem(i, SLOTS)
      tokens = pl.ds(n * C, C)

      @pl.when(n > 0)
      def _prefetch():  # the other slot held chunk n + 1, whose last reader (a waited wgmma) is done
        issue(n - 1, SLOTS - 1 - slot)

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's stores no longer read dh_s, dvn_s
      for rows, dh_half in zip(key_halves, dh):
        dh_s.at[rows][...] = dh_half.astype(bf16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dh_s, dstates_ref.at[b, h, n, :, cols])
      plgpu.barrier_wait(landed.at[slot])

      gc_row, beta_row = load(gc_s.at[slot], ROW), load(beta_s.at[slot], ROW)
      gc_last = gc_s[slot, C - 1]
      fs, te = jnp.exp(gc_row), jnp.exp(gc_last - gc_row)
      local, k_dh = products((transposed(p_s.at[slot]), do_s.at[slot], wide), (k_s.at[slot], dh_s, wide))
      dvn_s[...] = (local + rows_of(te, wide) * k_dh).astype(bf16)
      dout_s[...] = (rows_of(scale * fs, wide) * load(do_s.at[slot], WG).astype(f32)).astype(bf16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dvn_s, dvn_ref.at[b, tokens, h, cols])
      # -d_keys = -beta fs (T^T dv_new), negated so that both state products accumulate
      dkeys_s[...] = (rows_of(-beta_row * fs, wide) * product(transposed(t_s.at[slot]), dvn_s, wide)).astype(bf16)
      plgpu.commit_smem()
      decay = jnp.exp(gc_last)
      new = []
      for rows, dh_half in zip(key_halves, dh):  # dh_n = decay dh + q^T (s fs do) - k^T d_keys, 64 key rows each
        def accumulate(acc, rows=rows):
          plgpu.wgmma(acc, transposed(q_s.at[slot].at[:, rows]), dout_s)
          plgpu.wgmma(acc, transposed(k_s.at[slot].at[:, rows]), dkeys_s)
        new.append(lax.optimization_barrier(pl.run_state(accumulate)(plgpu.ACC.init(decay * dh_half))))
      return tuple(new)

    final = lax.fori_loop(0, chunks, step, start)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for rows, dh_half in zip(key_halves, final):
      dh32_s.at[rows][...] = dh_half
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dh32_s, dh0_ref.at[b, h, :, cols])
    plgpu.wait_smem_to_gmem(0)

  kernel = plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=(value_dim // block_v, heads, batch),
                        grid_names=("v", "h", "b"), compiler_params=plgpu.CompilerParams(approx_math=True))
  return kernel(q, k, t, gc, beta, d_out, scores, d_final)
