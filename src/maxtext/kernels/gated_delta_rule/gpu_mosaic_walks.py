"""The chunk walks as Mosaic GPU kernels, one or two warpgroups per CTA, each warpgroup carrying the state (or its
gradient) for 64 value columns of one value head and row: [Dk, 64] in float32 registers as two [64, 64] wgmma
accumulators, every product by wgmma, and the next chunk's inputs loaded by TMA into the other of two shared-memory
slots while this chunk computes. Two warpgroups (ChunkedLaunch.forward_walk_mosaic / reverse_walk_mosaic = 2; one
CTA per value head for Dv = 128) share every load but v's / do's columns: q, k, T and P reach shared memory once
per chunk instead of once per 64 columns; warpgroup 0 issues them, and a barrier per slot tells it that both are
done reading the slot it refills.

forward_walk: gpu_fused.walk_output_kernel without w. Per chunk n, with the state h entering it:
  h -> states[n];  x = beta (v - fs (k h));  v_new = T x;  o = s fs (q h) + P v_new  (P read, or formed here)
  h' = decay h + k^T (te v_new)
reverse_walk: gpu_kernels.state_grad_kernel with the fused forward's P. Per chunk n, in reverse:
  dh_{n+1} -> d_states[n];  dv_new = P^T do + te (k dh);  d_keys = beta fs (T^T dv_new)
  dh_n = decay dh_{n+1} + q^T (s fs do) - k^T d_keys

gpu_mosaic_roles.py splits the forward walk's program by role between warpgroups instead.

Scope: no segment ids, C = 64, Dk = 128, 64 | Dv (128 | Dv for two warpgroups), bf16 storage, compiled (no interpret
mode; device tests of both forms passed on an H200 on 2026-12-02). One warpgroup, alone there
(benchmarks/gated_delta_rule_mosaic_walks.py) at 1 x 4096 / 1 x 16384 / 8 x 4096: the reverse walk 0.123 / 0.467 /
0.609 ms against the Triton walk's 0.143 / 0.546 / 0.804, the forward walk 0.130 / 0.495 / 0.730 against 0.123 /
0.469 / 0.638. Two warpgroups, in the op at 8 x 4096: forward walk 0.562 ms (Triton 0.681), reverse walk 0.475 (one
warpgroup 0.607); at B = 1 (32 CTAs) they lose. gpu.walk_warpgroups picks the form (docs/benchmarks.md). A
forward alone forms P in the walk (scores None): at 8 x 4096 the forward 0.77 ms against 0.85 with P's launch
(tenth session; device tests of one and two warpgroups passed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from maxtext.kernels.gated_delta_rule.gpu_mosaic_backward import (COL, ROW, WG, accumulate, cols_of, load, product,
                                                                products, rows_of, tile, transposed)

C = 64
SLOTS = 2  # input buffers: chunk n computes while chunk n - 1 lands
COLUMNS = 64  # value columns of one warpgroup's state


def applies(*, chunk: int, key_dim: int, value_dim: int, dtypes, segmented: bool, interpret: bool,
            warpgroups: int = 1) -> bool:
  """The module docstring's scope: dtypes are the storage dtype and q's and v's as the kernels receive them. The
  reverse walk also needs the fused forward's P (gpu.py checks)."""
  return (chunk == C and key_dim == 128 and value_dim % (COLUMNS * warpgroups) == 0
          and all(jnp.dtype(d) == jnp.bfloat16 for d in dtypes) and not segmented and not interpret)


def slotted(shape, dtype=jnp.bfloat16):
  return tile((SLOTS, *shape), dtype)


class StateCarry:
  """The float32 [Dk, 64] state of each warpgroup between HBM and two [64, 64] accumulator tiles, through one [64,
  64] staging tile a key half at a time. With two warpgroups they take the staging tile in turn (three barriers
  hand it over: after warpgroup 0's read, after warpgroup 1's read, after warpgroup 0's write)."""

  def __init__(self, staging, initial, handover, warpgroups: int, key_dim: int, transposed: bool = False):
    self.staging, self.initial, self.handover, self.warpgroups = staging, initial, handover, warpgroups
    self.halves = [pl.ds(0, key_dim // 2), pl.ds(key_dim // 2, key_dim // 2)]
    # the state's transpose [64, Dk] (gpu_mosaic_roles.py's transposed chain): the halves are column blocks
    self.part = (lambda ref, keys: ref.at[:, keys]) if transposed else (lambda ref, keys: ref.at[keys])

  @staticmethod
  def scratch(warpgroups: int) -> dict:
    handover = {} if warpgroups == 1 else dict(handover=plgpu.Barrier(num_arrivals=1, num_barriers=3))
    return dict(staging=tile((C, COLUMNS), jnp.float32),
                initial=plgpu.Barrier(num_arrivals=1, num_barriers=warpgroups)) | handover

  def read(self, src, w: int) -> tuple:
    if w == 1:
      plgpu.barrier_wait(self.handover.at[0])
    parts = []
    for rows in self.halves:
      plgpu.copy_gmem_to_smem(self.part(src, rows), self.staging, self.initial.at[w])
      plgpu.barrier_wait(self.initial.at[w])
      parts.append(load(self.staging, WG))
      plgpu.commit_smem()  # every thread has read the staging tile before the next copy lands in it
    if self.warpgroups == 2:
      plgpu.barrier_arrive(self.handover.at[w])
    return tuple(parts)

  def write(self, carry, dst, w: int) -> None:
    if self.warpgroups == 2:
      plgpu.barrier_wait(self.handover.at[1 if w == 0 else 2])
    for rows, part in zip(self.halves, carry):
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the staging tile's previous store has read it
      self.staging[...] = part
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(self.staging, self.part(dst, rows))
    plgpu.wait_smem_to_gmem(0)
    if self.warpgroups == 2 and w == 0:
      plgpu.barrier_arrive(self.handover.at[2])


def _stage_carry(carry, tile_ref, halves) -> None:
  """The carry in 16 bits into a swizzled tile (a wgmma operand and the history's store), once the last chunk's
  stores no longer read the staging tiles."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  for rows, part in zip(halves, carry):
    tile_ref.at[rows][...] = part.astype(tile_ref.dtype)
  plgpu.commit_smem()


def next_carry(carry, pairs_of_rows, decay, halves, consumed=None) -> tuple:
  """decay x carry + the products pairs_of_rows(rows) gives for each 64-row half (one accumulator each); then, with
  two warpgroups, `consumed` (this chunk's slot) learns that this warpgroup no longer reads the slot."""
  carry = tuple(accumulate(pairs_of_rows(rows), decay * part) for rows, part in zip(halves, carry))
  if consumed is not None:
    plgpu.barrier_arrive(consumed)
  return carry


def launch_kernel(body, out_type, scratch, *, name: str, value_dim: int, warpgroups: int, heads: int, batch: int,
            columns: int | None = None):
  """A CTA of `warpgroups` warpgroups per (`columns` value columns, by default 64 x warpgroups; value head, row);
  body(w) is warpgroup w's program; name names the kernel (profiles, dumps)."""
  columns = columns or COLUMNS * warpgroups
  grid = dict(grid=(value_dim // columns, heads, batch), grid_names=("v", "h", "b"))
  if warpgroups == 1:
    def kernel_body(*refs, **scratch_refs):
      body(0, *refs, **scratch_refs)
    threads = {}
  else:
    def kernel_body(*refs, **scratch_refs):
      group = lax.axis_index("wg")
      for w in range(warpgroups):
        pl.when(group == w)(functools.partial(body, w, *refs, **scratch_refs))
    threads = dict(num_threads=warpgroups, thread_name="wg")
  kernel_body.__name__ = kernel_body.__qualname__ = f"{name}_{warpgroups}wg"
  return plgpu.kernel(kernel_body, out_type=out_type, scratch_types=scratch, **grid, **threads,
                      compiler_params=plgpu.CompilerParams(approx_math=True))


def _per_warpgroup(shape, warpgroups: int) -> tuple:
  """One swizzled bf16 tile per warpgroup, as separate refs (a static index into one ref does not lower in jax
  0.11)."""
  return tuple(tile(shape) for _ in range(warpgroups))


def _slot_handover(warpgroups: int) -> dict:
  """With two warpgroups, `consumed[s]`: both are done reading slot s, so warpgroup 0 (which issues every load) may
  fill it again."""
  return {} if warpgroups == 1 else dict(consumed=plgpu.Barrier(num_arrivals=warpgroups, num_barriers=SLOTS))


def _prefetch(n, slot, *, chunks: int, w: int, issue, consumed, forward: bool) -> None:
  """Warpgroup 0 issues chunk n's successor (n + 1 forward, n - 1 in reverse) into the other slot, which held the
  chunk before n: its readers are done (one warpgroup, consumed None: its own waited wgmma; two: `consumed`)."""
  if w != 0:
    return
  following = n + 1 if forward else n - 1
  has_following = following < chunks if forward else following >= 0
  other = SLOTS - 1 - slot

  @pl.when(has_following)
  def _issue():
    if consumed is not None:
      pl.when(n != (0 if forward else chunks - 1))(lambda: plgpu.barrier_wait(consumed.at[other]))
    issue(following, other)


def output_scores(qk, gc_row, gc_col, scale: float):
  """P = s Gamma * (q k^T) in bf16 from the float32 q k^T and gc in the row and column layouts."""
  square = (C, C)
  # the causal mask from two index vectors (whole [C, C] iotas would stay live across the loop)
  causal = (rows_of(plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=ROW), square)
            >= cols_of(plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=COL), square))
  gamma = jnp.exp(jnp.where(causal, rows_of(gc_row, square) - cols_of(gc_col, square), -jnp.inf))
  return (qk * (scale * gamma)).astype(jnp.bfloat16)


def forward_walk(q: jax.Array, k: jax.Array, v: jax.Array, gc: jax.Array, beta: jax.Array, t: jax.Array,
                 scores: jax.Array | None, h0: jax.Array, *, scale: float, groups: int, save: bool = True,
                 warpgroups: int = 1) -> tuple[jax.Array, ...]:
  """Arrays as walk_output_kernel's without w (q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; gc, beta float32 [B, Hv, T];
  t, scores [B, Hv, N, C, C]; h0 float32 [B, Hv, Dk, Dv]) -> (o [B, T, Hv, Dv] in v's dtype, final state float32,
  and with save the state entering each chunk [B, Hv, N, Dk, Dv] and v_new [B, T, Hv, Dv], in v's dtype).
  warpgroups: 1 or 2 per CTA, each carrying 64 value columns; two share every load but v's. scores None: each
  warpgroup forms P = s Gamma * (q k^T) from the q, k tiles it has (one more wgmma a chunk, off the state's path)
  instead of loading the prep's (a forward alone: ChunkedLaunch.prefill_scores_in_walk)."""
  batch, length, heads, value_dim = v.shape
  key_dim = q.shape[-1]
  chunks = length // C
  bf16, f32 = jnp.bfloat16, jnp.float32
  block = COLUMNS * warpgroups
  out_type = (jax.ShapeDtypeStruct((batch, length, heads, value_dim), v.dtype),
              jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), f32))
  if save:
    out_type += (jax.ShapeDtypeStruct((batch, heads, chunks, key_dim, value_dim), v.dtype),
                 jax.ShapeDtypeStruct((batch, length, heads, value_dim), v.dtype))
  vecs = plgpu.SMEM((SLOTS, C), f32)
  own = lambda shape: _per_warpgroup(shape, warpgroups)
  inside = scores is None
  # the vectors each chunk loads: a column layout needs its own copy (gc's, for P's pair decays)
  vectors = ["gc", "beta"] + ["gc_col"] * inside
  scratch = dict(
      q_s=slotted((C, key_dim)), k_s=slotted((C, key_dim)), v_s=slotted((C, block)), t_s=slotted((C, C)),
      h_s=own((key_dim, COLUMNS)), x_s=own((C, COLUMNS)), vn_s=own((C, COLUMNS)),
      **{f"{name}_s": vecs for name in vectors},
      landed=plgpu.Barrier(num_arrivals=4 + (not inside) + len(vectors), num_barriers=SLOTS),
  ) | (dict(pw_s=own((C, C))) if inside else dict(p_s=slotted((C, C)))) | StateCarry.scratch(warpgroups) \
    | _slot_handover(warpgroups)
  in_names = ["q", "k", "v", "gc", "beta", "t"] + ["p"] * (not inside) + ["h0"]

  def body(w, *refs, q_s, k_s, v_s, t_s, h_s, x_s, vn_s, landed, staging, initial, handover=None, consumed=None,
           p_s=None, pw_s=None, **vector_s):
    ins = dict(zip(in_names, refs))
    o_ref, final_ref, *saved = refs[len(in_names):]
    vb, h, b = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("b")
    hk = lax.div(h, groups)
    mine = pl.ds(w * COLUMNS, COLUMNS)  # this warpgroup's columns of the CTA's v tile
    cols = pl.ds(vb * block + w * COLUMNS, COLUMNS)  # and of the value head
    h_s, x_s, vn_s = h_s[w], x_s[w], vn_s[w]
    pw_s = pw_s[w] if inside else None
    carry = StateCarry(staging, initial, handover, warpgroups, key_dim)
    narrow, square = (C, COLUMNS), (C, C)
    source = dict(gc="gc", beta="beta", gc_col="gc")

    def issue(n, slot):
      tokens = pl.ds(n * C, C)
      tiles = [(ins["q"].at[b, tokens, hk], q_s), (ins["k"].at[b, tokens, hk], k_s),
               (ins["v"].at[b, tokens, h, pl.ds(vb * block, block)], v_s), (ins["t"].at[b, h, n], t_s)]
      tiles += [] if inside else [(ins["p"].at[b, h, n], p_s)]
      tiles += [(ins[source[name]].at[b, h, tokens], vector_s[f"{name}_s"]) for name in vectors]
      for src, dst in tiles:
        plgpu.copy_gmem_to_smem(src, dst.at[slot], landed.at[slot])

    if w == 0:
      issue(0, 0)
    start = carry.read(ins["h0"].at[b, h, :, cols], w)

    def step(n, state):
      slot = lax.rem(n, SLOTS)
      tokens = pl.ds(n * C, C)
      _prefetch(n, slot, chunks=chunks, w=w, issue=issue, consumed=consumed, forward=True)
      _stage_carry(state, h_s, carry.halves)
      if save:
        plgpu.copy_smem_to_gmem(h_s, saved[0].at[b, h, n, :, cols])
      plgpu.barrier_wait(landed.at[slot])

      row = lambda name: load(vector_s[f"{name}_s"].at[slot], ROW)
      gc_row, beta_row = row("gc"), row("beta")
      gc_last = vector_s["gc_s"][slot, C - 1]
      fs, te = jnp.exp(gc_row), jnp.exp(gc_last - gc_row)
      pairs = [(k_s.at[slot], h_s, narrow), (q_s.at[slot], h_s, narrow)]
      pairs += [(q_s.at[slot], transposed(k_s.at[slot]), square)] if inside else []
      k_h, q_h, *qk = products(*pairs)
      values = load(v_s.at[slot].at[:, mine], WG).astype(f32)
      x_s[...] = (rows_of(beta_row, narrow) * (values - rows_of(fs, narrow) * k_h)).astype(bf16)
      if inside:  # P = s Gamma * (q k^T), this warpgroup's own copy
        pw_s[...] = output_scores(qk[0], gc_row, load(vector_s["gc_col_s"].at[slot], COL), scale)
      plgpu.commit_smem()
      v_new = product(t_s.at[slot], x_s, narrow)
      vn_s[...] = v_new.astype(bf16)
      plgpu.commit_smem()
      if save:
        plgpu.copy_smem_to_gmem(vn_s, saved[1].at[b, tokens, h, cols])
      out = product(pw_s if inside else p_s.at[slot], vn_s, narrow, init=rows_of(scale * fs, narrow) * q_h)
      if save:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # v_new's store has read the tile o now takes
      vn_s[...] = out.astype(vn_s.dtype)
      x_s[...] = (rows_of(te, narrow) * v_new).astype(bf16)  # te v_new, for the state's update
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(vn_s, o_ref.at[b, tokens, h, cols])
      return next_carry(state, lambda rows: [(transposed(k_s.at[slot].at[:, rows]), x_s)], jnp.exp(gc_last),
                         carry.halves, consumed.at[slot] if consumed is not None else None)

    carry.write(lax.fori_loop(0, chunks, step, start), final_ref.at[b, h, :, cols], w)

  kernel = launch_kernel(body, out_type, scratch, name="gdr_forward_walk", value_dim=value_dim,
                         warpgroups=warpgroups, heads=heads, batch=batch)
  return kernel(q, k, v, gc, beta, t, *([] if inside else [scores]), h0)


def reverse_walk(q: jax.Array, k: jax.Array, t: jax.Array, gc: jax.Array, beta: jax.Array, d_out: jax.Array,
                 scores: jax.Array, d_final: jax.Array, *, scale: float, groups: int,
                 warpgroups: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Arrays as state_grad_kernel's with local_from_scores (q, k [B, T, Hk, Dk]; t, scores [B, Hv, N, C, C]; gc, beta
  float32 [B, Hv, T]; d_out [B, T, Hv, Dv]; d_final float32 [B, Hv, Dk, Dv]) -> (dv_new [B, T, Hv, Dv],
  d_states [B, Hv, N, Dk, Dv] in d_out's dtype, dh0 float32 [B, Hv, Dk, Dv]). warpgroups as forward_walk's."""
  batch, length, heads, value_dim = d_out.shape
  key_dim = q.shape[-1]
  chunks = length // C
  bf16, f32 = jnp.bfloat16, jnp.float32
  block = COLUMNS * warpgroups
  out_type = (jax.ShapeDtypeStruct((batch, length, heads, value_dim), d_out.dtype),
              jax.ShapeDtypeStruct((batch, heads, chunks, key_dim, value_dim), d_out.dtype),
              jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), f32))
  vecs = plgpu.SMEM((SLOTS, C), f32)
  own = lambda shape: _per_warpgroup(shape, warpgroups)
  scratch = dict(
      q_s=slotted((C, key_dim)), k_s=slotted((C, key_dim)), t_s=slotted((C, C)), p_s=slotted((C, C)),
      do_s=slotted((C, block)), gc_s=vecs, beta_s=vecs, dh_s=own((key_dim, COLUMNS)), dvn_s=own((C, COLUMNS)),
      dkeys_s=own((C, COLUMNS)), landed=plgpu.Barrier(num_arrivals=7, num_barriers=SLOTS),
  ) | StateCarry.scratch(warpgroups) | _slot_handover(warpgroups)

  def body(w, q_ref, k_ref, t_ref, gc_ref, beta_ref, do_ref, p_ref, dfinal_ref, dvn_ref, dstates_ref, dh0_ref, *,
           q_s, k_s, t_s, p_s, do_s, gc_s, beta_s, dh_s, dvn_s, dkeys_s, landed, staging, initial, handover=None,
           consumed=None):
    vb, h, b = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("b")
    hk = lax.div(h, groups)
    mine = pl.ds(w * COLUMNS, COLUMNS)
    cols = pl.ds(vb * block + w * COLUMNS, COLUMNS)
    dh_s, dvn_s, dkeys_s = dh_s[w], dvn_s[w], dkeys_s[w]
    carry = StateCarry(staging, initial, handover, warpgroups, key_dim)
    narrow = (C, COLUMNS)

    def issue(n, slot):
      tokens = pl.ds(n * C, C)
      for src, dst in ((q_ref.at[b, tokens, hk], q_s), (k_ref.at[b, tokens, hk], k_s), (t_ref.at[b, h, n], t_s),
                       (p_ref.at[b, h, n], p_s), (do_ref.at[b, tokens, h, pl.ds(vb * block, block)], do_s),
                       (gc_ref.at[b, h, tokens], gc_s), (beta_ref.at[b, h, tokens], beta_s)):
        plgpu.copy_gmem_to_smem(src, dst.at[slot], landed.at[slot])

    if w == 0:
      issue(chunks - 1, 0)
    start = carry.read(dfinal_ref.at[b, h, :, cols], w)

    def step(i, dh):
      n = chunks - 1 - i
      slot = lax.rem(i, SLOTS)
      tokens = pl.ds(n * C, C)
      _prefetch(n, slot, chunks=chunks, w=w, issue=issue, consumed=consumed, forward=False)
      _stage_carry(dh, dh_s, carry.halves)
      plgpu.copy_smem_to_gmem(dh_s, dstates_ref.at[b, h, n, :, cols])
      plgpu.barrier_wait(landed.at[slot])

      gc_row, beta_row = load(gc_s.at[slot], ROW), load(beta_s.at[slot], ROW)
      gc_last = gc_s[slot, C - 1]
      fs, te = jnp.exp(gc_row), jnp.exp(gc_last - gc_row)
      d_out_mine = do_s.at[slot].at[:, mine]
      local, k_dh = products((transposed(p_s.at[slot]), d_out_mine, narrow), (k_s.at[slot], dh_s, narrow))
      dvn_s[...] = (local + rows_of(te, narrow) * k_dh).astype(bf16)
      # s fs do, for the state's product, over this warpgroup's columns of do (their last reader is done)
      d_out_mine[...] = (rows_of(scale * fs, narrow) * load(d_out_mine, WG).astype(f32)).astype(bf16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dvn_s, dvn_ref.at[b, tokens, h, cols])
      # -d_keys = -beta fs (T^T dv_new), negated so that both state products accumulate
      dkeys_s[...] = (rows_of(-beta_row * fs, narrow) * product(transposed(t_s.at[slot]), dvn_s, narrow)).astype(bf16)
      plgpu.commit_smem()
      # dh_n = decay dh + q^T (s fs do) - k^T d_keys
      return next_carry(dh, lambda rows: [(transposed(q_s.at[slot].at[:, rows]), d_out_mine),
                                           (transposed(k_s.at[slot].at[:, rows]), dkeys_s)], jnp.exp(gc_last),
                         carry.halves, consumed.at[slot] if consumed is not None else None)

    carry.write(lax.fori_loop(0, chunks, step, start), dh0_ref.at[b, h, :, cols], w)

  kernel = launch_kernel(body, out_type, scratch, name="gdr_reverse_walk", value_dim=value_dim,
                         warpgroups=warpgroups, heads=heads, batch=batch)
  return kernel(q, k, t, gc, beta, d_out, scores, d_final)
