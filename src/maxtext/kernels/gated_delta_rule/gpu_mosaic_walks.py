"""The chunk walks as Mosaic GPU kernels, one warpgroup per (64 value columns, value head, row): the state (or its
gradient) [Dk, BV] carried in float32 registers as two [64, BV] wgmma accumulators, every product by wgmma, and the
next chunk's inputs loaded by TMA into the other of two shared-memory slots while this chunk computes.

forward_walk: gpu_fused.walk_output_kernel without w. Per chunk n, with the state h entering it:
  h -> states[n];  x = beta (v - fs (k h));  v_new = T x;  o = s fs (q h) + P v_new
  h' = decay h + k^T (te v_new)
reverse_walk: gpu_kernels.state_grad_kernel with the fused forward's P. Per chunk n, in reverse:
  dh_{n+1} -> d_states[n];  dv_new = P^T do + te (k dh);  d_keys = beta fs (T^T dv_new)
  dh_n = decay dh_{n+1} + q^T (s fs do) - k^T d_keys

Scope: no segment ids, C = 64, Dk = 128, 64 | Dv, bf16 storage, compiled (no interpret mode; device tests passed on an
H200 on 2026-12-02). Measured alone there (benchmarks/gated_delta_rule_mosaic_walks.py, docs/benchmarks.md) at 1 x
4096 / 1 x 16384 / 8 x 4096: the reverse walk 0.123 / 0.467 / 0.609 ms against the Triton walk's 0.143 / 0.546 /
0.804 (gpu.py's default: ChunkedLaunch.reverse_walk_mosaic), the forward walk 0.130 / 0.495 / 0.730 against 0.123 /
0.469 / 0.638 (ChunkedLaunch.forward_walk_mosaic, off).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from maxtext.kernels.gated_delta_rule.gpu_mosaic_backward import (ROW, WG, accumulate, load, product, products,
                                                                rows_of, tile, transposed)

C = 64
SLOTS = 2  # input buffers: chunk n computes while chunk n - 1 lands


def applies(*, chunk: int, key_dim: int, value_dim: int, dtypes, segmented: bool, interpret: bool) -> bool:
  """The module docstring's scope: dtypes are the storage dtype and q's and v's as the kernels receive them. The
  reverse walk also needs the fused forward's P (gpu.py checks)."""
  return (chunk == C and key_dim == 128 and value_dim % 64 == 0
          and all(jnp.dtype(d) == jnp.bfloat16 for d in dtypes) and not segmented and not interpret)


def _slotted(shape, dtype=jnp.bfloat16):
  return tile((SLOTS, *shape), dtype)


def _read_carry(src, staging, landed, halves) -> tuple:
  """A float32 [Dk, BV] state from HBM into two [64, BV] accumulator tiles, through a swizzled staging tile."""
  plgpu.copy_gmem_to_smem(src, staging, landed)
  plgpu.barrier_wait(landed)
  return tuple(load(staging.at[rows], WG) for rows in halves)


def _write_carry(carry, staging, dst, halves) -> None:
  """The two accumulator tiles back to HBM through the staging tile, after every earlier store has read its tile."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  for rows, part in zip(halves, carry):
    staging.at[rows][...] = part
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(staging, dst)
  plgpu.wait_smem_to_gmem(0)


def _stage_carry(carry, tile_ref, halves) -> None:
  """The carry in 16 bits into a swizzled tile (a wgmma operand and the history's store), once the last chunk's
  stores no longer read the staging tiles."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  for rows, part in zip(halves, carry):
    tile_ref.at[rows][...] = part.astype(tile_ref.dtype)
  plgpu.commit_smem()


def _launch(body, out_type, scratch, *, value_dim: int, block_v: int, heads: int, batch: int):
  """One warpgroup per (value block, value head, row)."""
  return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=(value_dim // block_v, heads, batch),
                      grid_names=("v", "h", "b"), compiler_params=plgpu.CompilerParams(approx_math=True))


def forward_walk(q: jax.Array, k: jax.Array, v: jax.Array, gc: jax.Array, beta: jax.Array, t: jax.Array,
                 scores: jax.Array, h0: jax.Array, *, scale: float, groups: int, save: bool = True,
                 block_v: int = 64) -> tuple[jax.Array, ...]:
  """Arrays as walk_output_kernel's without w (q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; gc, beta float32 [B, Hv, T];
  t, scores [B, Hv, N, C, C]; h0 float32 [B, Hv, Dk, Dv]) -> (o [B, T, Hv, Dv] in v's dtype, final state float32,
  and with save the state entering each chunk [B, Hv, N, Dk, Dv] and v_new [B, T, Hv, Dv], in v's dtype)."""
  batch, length, heads, value_dim = v.shape
  key_dim = q.shape[-1]
  chunks = length // C
  bf16, f32 = jnp.bfloat16, jnp.float32
  half = key_dim // 2
  out_type = (jax.ShapeDtypeStruct((batch, length, heads, value_dim), v.dtype),
              jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), f32))
  if save:
    out_type += (jax.ShapeDtypeStruct((batch, heads, chunks, key_dim, value_dim), v.dtype),
                 jax.ShapeDtypeStruct((batch, length, heads, value_dim), v.dtype))
  vecs = plgpu.SMEM((SLOTS, C), f32)
  scratch = dict(
      q_s=_slotted((C, key_dim)), k_s=_slotted((C, key_dim)), v_s=_slotted((C, block_v)), t_s=_slotted((C, C)),
      p_s=_slotted((C, C)), gc_s=vecs, beta_s=vecs, h_s=tile((key_dim, block_v)), x_s=tile((C, block_v)),
      vn_s=tile((C, block_v)), o_s=tile((C, block_v)), h32_s=tile((key_dim, block_v), f32),
      landed=plgpu.Barrier(num_arrivals=7, num_barriers=SLOTS), initial=plgpu.Barrier(num_arrivals=1))

  def body(*refs, q_s, k_s, v_s, t_s, p_s, gc_s, beta_s, h_s, x_s, vn_s, o_s, h32_s, landed, initial):
    q_ref, k_ref, v_ref, gc_ref, beta_ref, t_ref, p_ref, h0_ref = refs[:8]
    o_ref, final_ref, *saved = refs[8:]
    vb, h, b = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("b")
    hk = lax.div(h, groups)
    cols = pl.ds(vb * block_v, block_v)
    key_halves = [pl.ds(0, half), pl.ds(half, half)]
    wide = (C, block_v)

    def issue(n, slot):
      tokens = pl.ds(n * C, C)
      for src, dst in ((q_ref.at[b, tokens, hk], q_s), (k_ref.at[b, tokens, hk], k_s),
                       (v_ref.at[b, tokens, h, cols], v_s), (t_ref.at[b, h, n], t_s), (p_ref.at[b, h, n], p_s),
                       (gc_ref.at[b, h, tokens], gc_s), (beta_ref.at[b, h, tokens], beta_s)):
        plgpu.copy_gmem_to_smem(src, dst.at[slot], landed.at[slot])

    issue(0, 0)
    start = _read_carry(h0_ref.at[b, h, :, cols], h32_s, initial, key_halves)

    def step(n, state):
      slot = lax.rem(n, SLOTS)
      tokens = pl.ds(n * C, C)

      @pl.when(n + 1 < chunks)
      def _prefetch():  # the other slot held chunk n - 1, whose last reader (a waited wgmma) is done
        issue(n + 1, SLOTS - 1 - slot)

      _stage_carry(state, h_s, key_halves)
      if save:
        plgpu.copy_smem_to_gmem(h_s, saved[0].at[b, h, n, :, cols])
      plgpu.barrier_wait(landed.at[slot])

      gc_row, beta_row = load(gc_s.at[slot], ROW), load(beta_s.at[slot], ROW)
      gc_last = gc_s[slot, C - 1]
      fs, te = jnp.exp(gc_row), jnp.exp(gc_last - gc_row)
      k_h, q_h = products((k_s.at[slot], h_s, wide), (q_s.at[slot], h_s, wide))
      values = load(v_s.at[slot], WG).astype(f32)
      x_s[...] = (rows_of(beta_row, wide) * (values - rows_of(fs, wide) * k_h)).astype(bf16)
      plgpu.commit_smem()
      v_new = product(t_s.at[slot], x_s, wide)
      vn_s[...] = v_new.astype(bf16)
      plgpu.commit_smem()
      if save:
        plgpu.copy_smem_to_gmem(vn_s, saved[1].at[b, tokens, h, cols])
      o_s[...] = product(p_s.at[slot], vn_s, wide, init=rows_of(scale * fs, wide) * q_h).astype(o_s.dtype)
      x_s[...] = (rows_of(te, wide) * v_new).astype(bf16)  # te v_new, for the state's update
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, tokens, h, cols])
      decay = jnp.exp(gc_last)
      return tuple(accumulate([(transposed(k_s.at[slot].at[:, rows]), x_s)], decay * part)
                   for rows, part in zip(key_halves, state))

    _write_carry(lax.fori_loop(0, chunks, step, start), h32_s, final_ref.at[b, h, :, cols], key_halves)

  kernel = _launch(body, out_type, scratch, value_dim=value_dim, block_v=block_v, heads=heads, batch=batch)
  return kernel(q, k, v, gc, beta, t, scores, h0)


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
  scratch = dict(
      q_s=_slotted((C, key_dim)), k_s=_slotted((C, key_dim)), t_s=_slotted((C, C)), p_s=_slotted((C, C)),
      do_s=_slotted((C, block_v)), gc_s=vecs, beta_s=vecs, dh_s=tile((key_dim, block_v)), dvn_s=tile((C, block_v)),
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
    start = _read_carry(dfinal_ref.at[b, h, :, cols], dh32_s, initial, key_halves)

    def step(i, dh):
      n = chunks - 1 - i
      slot = lax.rem(i, SLOTS)
      tokens = pl.ds(n * C, C)

      @pl.when(n > 0)
      def _prefetch():  # the other slot held chunk n + 1, whose last reader (a waited wgmma) is done
        issue(n - 1, SLOTS - 1 - slot)

      _stage_carry(dh, dh_s, key_halves)
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
      # dh_n = decay dh + q^T (s fs do) - k^T d_keys, 64 key rows per accumulator
      return tuple(accumulate([(transposed(q_s.at[slot].at[:, rows]), dout_s),
                               (transposed(k_s.at[slot].at[:, rows]), dkeys_s)], decay * part)
                   for rows, part in zip(key_halves, dh))

    _write_carry(lax.fori_loop(0, chunks, step, start), dh32_s, dh0_ref.at[b, h, :, cols], key_halves)

  kernel = _launch(body, out_type, scratch, value_dim=value_dim, block_v=block_v, heads=heads, batch=batch)
  return kernel(q, k, t, gc, beta, d_out, scores, d_final)
