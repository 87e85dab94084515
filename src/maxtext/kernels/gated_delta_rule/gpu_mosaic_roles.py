"""The forward chunk walk as one Mosaic GPU CTA per (64 value columns, value head, row) whose warpgroups take roles
(ChunkedLaunch.forward_walk_roles), where gpu_mosaic_walks.py's forward walk gives each warpgroup its own columns.
Same arrays and results as gpu_mosaic_walks.forward_walk; its helpers (the carry, the slots, the launch) are shared.

The roles: the state's chain, the output (o = s fs (q h) + P v_new from the published h and v_new), and the
loads with P (formed from q k^T for a forward alone). The chain no longer waits on the output's products, and P no
longer costs a launch. gpu.forward_walk_roles picks it where the two-warpgroup walk does not run (fewer 64-column
blocks than WIDE_WALK_PROGRAMS). On an H200 (2026-12-03, eleventh session, docs/benchmarks.md) at 1 x 4k / 16k / 64k
and 4 x 4k: forward alone 0.158 / 0.597 / 2.243 / 0.419 ms against the Triton walk's 0.171 / 0.629 / 2.474 / 0.652
(jla 0.161 / 0.586 / 2.287 / 0.414), forward+backward 0.55 / 2.05 / 8.00 / 1.84 against 0.57 / 2.12 / 8.29 / 1.95.
Its transposed chain (h^T carried, every product on the chain with its left operand in registers; a forward alone,
jax 0.11) read 0.15 / 0.59 / 2.26 ms against jla's 0.16 / 0.59 / 2.30 in one run, errors unchanged; its device tests
passed (twelfth session); forming P it was against the chain by rows in one run 0.005 ms faster at 1 x 4k and 16k,
0.007 / 0.011 slower at 1 x 64k and 4 x 4k, and loading P from the launch that normalises q, k 0.013 / 0.075 ms
faster at 1 x 16k / 64k (fourteenth session): so it is on where that launch is (ChunkedLaunch.roles_transposed_chain).

Scope: gpu_mosaic_walks.applies' with one warpgroup (no segment ids, C = 64, Dk = 128, 64 | Dv, bf16, compiled);
device tests of the form by rows passed on an H200 on 2026-12-03.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from maxtext.kernels.gated_delta_rule.gpu_mosaic_backward import (COL, ROW, WG, accumulate, cols_of, load, product,
                                                                rows_of, tile, transposed)
from maxtext.kernels.gated_delta_rule.gpu_mosaic_walks import (C, COLUMNS, SLOTS, StateCarry, launch_kernel,
                                                             next_carry, output_scores, slotted)


def _summed(pairs, shape):
  """The sum of a @ b over pairs in float32, by wgmma into one zeroed accumulator (operands as accumulate's, which
  needs an initial value; products gives each product its own accumulator)."""
  def scoped(acc):
    for a, b in pairs:
      plgpu.wgmma(acc, a, b)
    return acc[...]
  return lax.optimization_barrier(pl.run_scoped(scoped, plgpu.ACC(shape, jnp.float32)))


# Registers per thread of the three roles of the transposed chain (state, output, loads and P), each a multiple of 8
# and at most 504 in all: the CTA is launched with 168 a thread (65536 / 384, rounded down to 8), and an increase
# beyond what the others' decreases free waits forever. Without them the transposed chain spilled 20 bytes (ptxas,
# jax 0.11.2); the chain by rows needs no more than 168.
ROLE_REGISTERS = (176, 176, 152)


def forward_walk(q: jax.Array, k: jax.Array, v: jax.Array, gc: jax.Array, beta: jax.Array, t: jax.Array,
                 scores: jax.Array | None, h0: jax.Array, *, scale: float, groups: int, save: bool = True,
                 warpgroups: int = 3, transposed_chain: bool | None = None,
                 norms: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, ...]:
  """gpu_mosaic_walks.forward_walk's arrays and results, by a CTA of warpgroups in roles per 64 value columns
  (ChunkedLaunch.forward_walk_roles): warpgroup 0 carries the state along the chain (k h, v_new = T x, the update) and
  publishes each chunk's h and v_new in 16 bits; warpgroup 1 forms o = s fs (q h) + P v_new from them and writes o
  (and with save the history), off the state's path. The loads, and P = s Gamma * (q k^T) when scores is None, are
  warpgroup 2's with three warpgroups, else warpgroup 1's. The published tiles (and a formed P) are double-buffered,
  so a warpgroup waits for its reader's chunk n - 2 only.

  transposed_chain (None: without save; the history is stored as h, not h^T): the chain carries h^T [64, Dk], so that
  every product on it takes its left operand from registers (h^T k^T, x^T T^T, (te v_new)^T k) and no x tile goes
  through shared memory; h^T and v_new^T are published instead.

  norms (rq, rk) [B, Hk, T] float32 (with P formed here, by rows): q, k are the raw ones and these their reciprocal
  norms (ChunkedLaunch.walk_normalizes_qk): k h's rows and te on the update scaled by rk, q h's rows by rq, q k^T by
  rq's rows and rk's columns, so that no normalised q, k are written and read."""
  if warpgroups not in (2, 3):
    raise ValueError(f"gpu_mosaic_roles.forward_walk: warpgroups={warpgroups} must be 2 or 3")
  flipped = not save if transposed_chain is None else transposed_chain
  if norms is not None and (flipped or scores is not None):
    raise ValueError("gpu_mosaic_roles.forward_walk: norms needs the chain by rows and P formed in the walk")
  if flipped and save:
    raise ValueError("gpu_mosaic_roles.forward_walk: the transposed chain stores no history (save=False)")
  batch, length, heads, value_dim = v.shape
  key_dim = q.shape[-1]
  chunks = length // C
  bf16, f32 = jnp.bfloat16, jnp.float32
  out_type = (jax.ShapeDtypeStruct((batch, length, heads, value_dim), v.dtype),
              jax.ShapeDtypeStruct((batch, heads, value_dim, key_dim) if flipped else
                                   (batch, heads, key_dim, value_dim), f32))
  if save:
    out_type += (jax.ShapeDtypeStruct((batch, heads, chunks, key_dim, value_dim), v.dtype),
                 jax.ShapeDtypeStruct((batch, length, heads, value_dim), v.dtype))
  vecs = plgpu.SMEM((SLOTS, C), f32)
  inside = scores is None
  scorer = 2 if warpgroups == 3 else 1  # the warpgroup that issues the loads and forms P
  # the per-token vectors: gc by rows (o, P), gc by columns (P; the transposed chain), beta (by columns there)
  vectors = ["gc", "beta"] + ["gc_col"] * (inside or flipped) + ["rq", "rk", "rk_col"] * (norms is not None)
  # per double buffer: h published (by warpgroup 0), v_new published, both read (by warpgroup 1); P formed, P read
  handover = lambda: plgpu.Barrier(num_arrivals=1, num_barriers=2)
  handovers = ["state_ready", "new_values_ready", "published_free"] + ["scores_ready", "scores_free"] * (
      inside and scorer == 2)
  half = key_dim // 2
  published = (dict(h_pub=tile((2, 2, COLUMNS, half)), vn_pub=tile((2, COLUMNS, C))) if flipped else
               dict(h_pub=tile((2, key_dim, COLUMNS)), vn_pub=tile((2, C, COLUMNS)), x_s=tile((C, COLUMNS))))
  scratch = dict(
      q_s=slotted((C, key_dim)), k_s=slotted((C, key_dim)), v_s=slotted((C, COLUMNS)), t_s=slotted((C, C)),
      o_s=tile((C, COLUMNS), v.dtype), **published, **{f"{name}_s": vecs for name in vectors},
      landed=plgpu.Barrier(num_arrivals=4 + (not inside) + len(vectors), num_barriers=SLOTS),
      consumed=plgpu.Barrier(num_arrivals=2, num_barriers=SLOTS), **{name: handover() for name in handovers},
  ) | (dict(pw_s=tile((2, C, C))) if inside else dict(p_s=slotted((C, C)))) | StateCarry.scratch(1)
  in_names = ["q", "k", "v", "gc", "beta", "t"] + ["p"] * (not inside) + ["h0"] + ["rq", "rk"] * (norms is not None)
  narrow = (C, COLUMNS)

  def body(w, *refs, q_s, k_s, v_s, t_s, h_pub, vn_pub, o_s, landed, consumed, state_ready, new_values_ready,
           published_free, staging, initial, x_s=None, p_s=None, pw_s=None, scores_ready=None, scores_free=None,
           **vector_s):
    ins = dict(zip(in_names, refs))
    o_ref, final_ref, *saved = refs[len(in_names):]
    vb, h, b = lax.axis_index("v"), lax.axis_index("h"), lax.axis_index("b")
    hk = lax.div(h, groups)
    cols = pl.ds(vb * COLUMNS, COLUMNS)
    source = dict(gc="gc", beta="beta", gc_col="gc", rq="rq", rk="rk", rk_col="rk")
    head_of = lambda name: hk if name in ("rq", "rk", "rk_col") else h  # the norms are per key head
    scaled = lambda name, slot, vector: vector * row(name, slot) if norms is not None else vector
    row = lambda name, slot: load(vector_s[f"{name}_s"].at[slot], ROW)
    col = lambda name, slot: load(vector_s[f"{name}_s"].at[slot], COL)
    state_ref = lambda ref: ref.at[b, h, cols] if flipped else ref.at[b, h, :, cols]
    keys = [pl.ds(0, half), pl.ds(half, half)]
    if warpgroups == 3 and flipped:  # the loads and P need fewer registers than the state and o
      plgpu.set_max_registers(ROLE_REGISTERS[w], action="decrease" if w == 2 else "increase")

    def issue(n, slot):
      tokens = pl.ds(n * C, C)
      tiles = [(ins["q"].at[b, tokens, hk], q_s), (ins["k"].at[b, tokens, hk], k_s),
               (ins["v"].at[b, tokens, h, cols], v_s), (ins["t"].at[b, h, n], t_s)]
      tiles += [] if inside else [(ins["p"].at[b, h, n], p_s)]
      tiles += [(ins[source[name]].at[b, head_of(name), tokens], vector_s[f"{name}_s"]) for name in vectors]
      for src, dst in tiles:
        plgpu.copy_gmem_to_smem(src, dst.at[slot], landed.at[slot])

    def refill(n):
      """At chunk n: chunk n - 1 + SLOTS into chunk n - 1's slot, once warpgroups 0 and 1 are done with it."""
      following, freed = n - 1 + SLOTS, lax.rem(n + SLOTS - 1, SLOTS)

      @pl.when((n >= 1) & (following < chunks))
      def _refill():
        plgpu.barrier_wait(consumed.at[freed])
        issue(following, freed)

    def form_scores(slot, buf):
      """P for the chunk in `slot` into pw_s[buf]."""
      qk = product(q_s.at[slot], transposed(k_s.at[slot]), (C, C))
      if norms is not None:
        qk = qk * rows_of(row("rq", slot), (C, C)) * cols_of(col("rk_col", slot), (C, C))
      pw_s.at[buf][...] = output_scores(qk, row("gc", slot), col("gc_col", slot), scale)
      plgpu.commit_smem()

    def chain(n, state):
      """Chunk n of the state's chain: h (as two [64, 64] key halves) -> h'."""
      slot, buf = lax.rem(n, SLOTS), lax.rem(n, 2)
      pl.when(n >= 2)(lambda: plgpu.barrier_wait(published_free.at[buf]))
      parts = [part.astype(bf16) for part in state]
      for i, part in enumerate(parts):
        (h_pub.at[buf].at[i] if flipped else h_pub.at[buf].at[keys[i]])[...] = part
      plgpu.commit_smem()
      plgpu.barrier_arrive(state_ready.at[buf])
      plgpu.barrier_wait(landed.at[slot])
      gc_last = vector_s["gc_s"][slot, C - 1]
      if flipped:  # the transposed chain, h^T [64, Dk]: the tokens are the columns of every tile on the chain
        gc_col, beta_col = col("gc_col", slot), col("beta", slot)
        fs, te = jnp.exp(gc_col), jnp.exp(gc_last - gc_col)
        wide = (COLUMNS, C)
        u_t = _summed([(parts[i], transposed(k_s.at[slot].at[:, keys[i]])) for i in range(2)], wide)
        values = load(transposed(v_s.at[slot]), WG).astype(f32)
        x_t = (cols_of(beta_col, wide) * (values - cols_of(fs, wide) * u_t)).astype(bf16)
        vn_t = product(x_t, transposed(t_s.at[slot]), wide)
        vn_pub.at[buf][...] = vn_t.astype(bf16)
        plgpu.commit_smem()
        plgpu.barrier_arrive(new_values_ready.at[buf])
        vd_t = (cols_of(te, wide) * vn_t).astype(bf16)
        decay = jnp.exp(gc_last)
        state = tuple(accumulate([(vd_t, k_s.at[slot].at[:, keys[i]])], decay * part) for i, part in enumerate(state))
        plgpu.barrier_arrive(consumed.at[slot])
        return state
      gc_row, beta_row = row("gc", slot), row("beta", slot)
      fs, te = scaled("rk", slot, jnp.exp(gc_row)), scaled("rk", slot, jnp.exp(gc_last - gc_row))  # k's rows: rk
      k_h = product(k_s.at[slot], h_pub.at[buf], narrow)
      values = load(v_s.at[slot], WG).astype(f32)
      x_s[...] = (rows_of(beta_row, narrow) * (values - rows_of(fs, narrow) * k_h)).astype(bf16)
      plgpu.commit_smem()
      v_new = product(t_s.at[slot], x_s, narrow)
      vn_pub.at[buf][...] = v_new.astype(bf16)
      x_s[...] = (rows_of(te, narrow) * v_new).astype(bf16)  # te v_new, for the state's update
      plgpu.commit_smem()
      plgpu.barrier_arrive(new_values_ready.at[buf])
      return next_carry(state, lambda rows: [(transposed(k_s.at[slot].at[:, rows]), x_s)], jnp.exp(gc_last),
                         keys, consumed.at[slot])

    if w == 0:
      carry = StateCarry(staging, initial, None, 1, key_dim, transposed=flipped)
      start = carry.read(state_ref(ins["h0"]), 0)
      carry.write(lax.fori_loop(0, chunks, chain, start), state_ref(final_ref), 0)
      return

    if w == scorer:
      for n in range(min(SLOTS, chunks)):
        issue(n, n)

    if w == 2:  # the loads and P
      def scores_and_loads(n, carry):
        slot, buf = lax.rem(n, SLOTS), lax.rem(n, 2)
        refill(n)
        if inside:
          plgpu.barrier_wait(landed.at[slot])
          pl.when(n >= 2)(lambda: plgpu.barrier_wait(scores_free.at[buf]))
          form_scores(slot, buf)
          plgpu.barrier_arrive(scores_ready.at[buf])
        return carry

      lax.fori_loop(0, chunks, scores_and_loads, 0)
      return

    def output(n, carry):
      slot, buf = lax.rem(n, SLOTS), lax.rem(n, 2)
      tokens = pl.ds(n * C, C)
      plgpu.barrier_wait(landed.at[slot])
      gc_row = row("gc", slot)
      if inside and scorer == 1:  # P while the state warpgroup walks
        form_scores(slot, buf)
      plgpu.barrier_wait(state_ready.at[buf])
      if scorer == 1:  # h for chunk n is out, so the state warpgroup is done with chunk n - 1's slot
        refill(n)
      if save:
        plgpu.copy_smem_to_gmem(h_pub.at[buf], saved[0].at[b, h, n, :, cols])
      if flipped:
        q_h = _summed([(q_s.at[slot].at[:, keys[i]], transposed(h_pub.at[buf].at[i])) for i in range(2)], narrow)
      else:
        q_h = product(q_s.at[slot], h_pub.at[buf], narrow)
      plgpu.barrier_wait(new_values_ready.at[buf])
      if save:
        plgpu.copy_smem_to_gmem(vn_pub.at[buf], saved[1].at[b, tokens, h, cols])
      if inside and scorer == 2:
        plgpu.barrier_wait(scores_ready.at[buf])
      new_values = transposed(vn_pub.at[buf]) if flipped else vn_pub.at[buf]
      out = product(pw_s.at[buf] if inside else p_s.at[slot], new_values, narrow,
                    init=rows_of(scaled("rq", slot, scale * jnp.exp(gc_row)), narrow) * q_h)
      plgpu.barrier_arrive(consumed.at[slot])
      if inside and scorer == 2:
        plgpu.barrier_arrive(scores_free.at[buf])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the history's and o's previous stores have read their tiles
      plgpu.barrier_arrive(published_free.at[buf])
      o_s[...] = out.astype(o_s.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, tokens, h, cols])
      return carry

    lax.fori_loop(0, chunks, output, 0)
    plgpu.wait_smem_to_gmem(0)

  name = "gdr_forward_walk_roles" + "_t" * flipped
  kernel = launch_kernel(body, out_type, scratch, name=name, value_dim=value_dim, warpgroups=warpgroups,
                         heads=heads, batch=batch, columns=COLUMNS)
  flip = lambda x: jnp.swapaxes(x, -1, -2)
  o, final, *history = kernel(q, k, v, gc, beta, t, *([] if inside else [scores]), flip(h0) if flipped else h0,
                              *(norms or ()))
  return (o, flip(final) if flipped else final, *history)
