"""The whole chunked gated delta rule on GPU: seven Pallas-Triton kernels over the model's layout, with a custom vjp.

The kernels read q and k [B, T, Hk, Dk] (l2-normalised inside the custom vjp by XLA, or by gpu_qk_norm.py's kernel
with ChunkedLaunch.qk_norm_kernel; gpu_norm_grads.py's kernel
taking the gradients back through the norm (ChunkedLaunch.norm_grads_kernel, the default), or before it under
autodiff), v [B, T, Hv, Dv], the chunk-local cumulative log decays gc and the betas [B, Hv, T] in float32,
and per-token segment masks. Value head h reads key head h // G (G = Hv / Hk) in place: nothing is repeated.
T is a multiple of the chunk size C (the caller pads). Per batch row, value head and chunk, with q, k the chunk's
rows of its key head and s the 1/sqrt(Dk) scale:
  Gamma_ij = exp(gc_i - gc_j) on causal (i >= j) same-segment pairs, else 0
  A = strictly_lower(beta_i (k k^T)_ij Gamma_ij);  T = (I + A)^-1                 (the chunk's WY system)
  fs = exp(gc) carried;  te = exp(gc_last - gc) in_last;  decay = exp(gc_last) carried_last
  w = T (beta fs k);  u = T (beta v)
  v_new = u - w h_n;  o = s fs (q h_n) + s (Gamma * q k^T) v_new;  h_{n+1} = decay h_n + k^T (te v_new)
(carried: the token belongs to the segment of the state entering the chunk; in_last: to the chunk's last segment;
both 1 without segment ids. The initial state belongs to each row's first segment.)

Forward, by default (ChunkedLaunch.fused_forward; gpu_fused.py): `prep_kernel` (parallel over chunks: T; the
output scores P = s Gamma * q k^T by `scores_kernel`, one program per key head: ChunkedLaunch.scores_warps) and
`walk_output_kernel` (one program per value block walks the chunks carrying its [Dk, BV] float32 state and writes o;
with a backward also h_n and v_new). A forward alone in a Mosaic GPU walk forms P in the walk
(ChunkedLaunch.prefill_scores_in_walk), or, with the fewest programs, loads it from a P launch that also normalises
the raw q, k (ChunkedLaunch.prefill_scores_norm); with few programs the Mosaic walk splits its work by role between
warpgroups (ChunkedLaunch.forward_walk_roles).
Without fusion (kernel bodies in gpu_kernels.py): `wy_kernel` (parallel: w, u and T), `state_kernel` (the walk: h_n
and v_new) and `output_kernel` (parallel: o). Backward: `local_dv_kernel` (parallel: (s Gamma * q k^T)^T do; after
the fused forward the reverse walk forms it from the saved P instead),
`state_grad_kernel` (reverse walk: dv_new and dh_{n+1}, then dh0; it reads T where the state's gradient needs w,
so no w is saved), then by default (ChunkedLaunch.fused_backward)
gpu_backward.py's one kernel for the parallel part, else `output_grad_kernel` (the gradients through o and the
state update) and `wy_grad_kernel` (through the WY system); the fused kernel never forms dw and takes the [C, Dk]
gradients by key blocks in loops, so few tiles are live (an earlier single kernel that kept them all measured 5.8
ms at B=1, T=16384, 32 heads on an H100: it spilled). The per-value-head dq, dk are summed over each key head's
group by gpu_norm_grads.py's kernel with the norm's backward (or by XLA: norm_grads_kernel=False). On a Hopper the
chunk backward and the walks run gpu_mosaic_backward.py's, gpu_mosaic_walks.py's and gpu_mosaic_roles.py's Mosaic
GPU kernels where they apply (ChunkedLaunch, walk_warpgroups, forward_walk_roles).

Precision (gpu_precision.py's modes): 'bf16' (the default for 16-bit inputs) rounds every dot operand to bf16, as
fla does, and stores the intermediates (w, u, T, states, v_new and the gradients between kernels) in the inputs'
16-bit dtype; 'tf32'/'tf32x3'/'ieee' store float32 ('tf32': ~4x slower on an H100, ~7x more accurate). The
inverse T comes from products in the same mode (ChunkedLaunch.inverse_precision; bf16 operands for 16-bit inputs,
float32 accumulation; TF32 until 2026-12-02); ChunkedLaunch.inverse_block
forms it (and P) by 16- or 32-wide blocks instead of whole [C, C] tiles (gpu_inverse.py). The backward reads the
saved T and never inverts again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule import gpu_backward, gpu_fused, gpu_norm_grads, gpu_qk_norm
from maxtext.kernels.gated_delta_rule.chunking import l2_normalize, token_segment_masks
from maxtext.kernels.gated_delta_rule.gpu_kernels import (
    Segments,
    local_dv_kernel,
    output_grad_kernel,
    output_kernel,
    state_grad_kernel,
    state_kernel,
    wy_grad_kernel,
    wy_kernel,
)
from maxtext.kernels.gated_delta_rule.gpu_precision import check_dims, dot, matmul_mode
from maxtext.kernels.triton_compat import TritonParams
from maxtext.kernels.gated_delta_rule.reference import _initial_state


@dataclasses.dataclass(frozen=True)
class ChunkedLaunch:
  """Launch parameters (defaults chosen on an H100 and an H200; benchmarks/gated_delta_rule_peers.py times variants)."""

  # Value columns per program of the forward walk. None: 64 when that still makes WIDE_WALK_PROGRAMS programs or
  # more (B x Hv x Dv / 64), else 32. Measured on an H200 (2026-12-01, Hv 32, Dv 128, docs/benchmarks.md): at 8 x
  # 4096 (512 programs of 64) forward 1.20 ms against 1.49 with 32 columns, forward+backward 5.24 against 5.57; at 1 x
  # 4096 / 16384 (64 programs) 64 columns lose: forward 0.23 / 0.86 against 0.20 / 0.74. Between the two unmeasured.
  block_v: int | None = None
  walk_warps: int = 4
  # The reverse walk's block_v and warps (None: the forward walk's explicit block_v, else walk_blocks' choice, as
  # for the forward walk; the walk's warps). Measured on an H200 (2026-12-02, docs/benchmarks.md): at 8 x 4096, 64
  # columns with 2 stages (3 need 238 KB of shared memory) take the reverse walk 0.80 ms against 1.10 with 32; at
  # B = 1 they lose (1 x 4096: forward+backward 0.82 against 0.75 ms).
  reverse_block_v: int | None = None
  reverse_walk_warps: int | None = None
  # Software pipelining of the next chunks' loads in the walks. None: 3 with 16-bit storage; 1 with float32, whose
  # tiles would need more than the H100's 227 KB of shared memory for more stages.
  walk_stages: int | None = None
  # The reverse walk's pipelining depth (None: walk_stages if set, else as walk_stages' rule but 2 for 64-column
  # 16-bit blocks). The reverse walk alone at 1 x 4096 on an H200 (2026-12-02, 32 columns): 3 stages 0.136 ms, 2
  # stages 0.151, 1 stage 0.282.
  reverse_walk_stages: int | None = None
  # The prep (and unfused parallel forward) kernels' warps. 1 with inverse_block=16 below, since the prep no longer
  # forms w: on an H200 (2026-12-02, docs/benchmarks.md) forward 0.17 / 0.65 / 2.64 / 1.03 ms against 0.20 / 0.74 /
  # 2.98 / 1.20 with 2 warps at 1 x 4k / 16k / 64k and 8 x 4k, forward+backward 0.72 / 2.73 / 10.81 / 5.02 against
  # 0.75 / 2.83 / 11.13 / 5.22. (With w, when the backward still read it, 1 warp was slower: 0.87 against 0.75 ms.)
  parallel_warps: int = 1
  grad_warps: int = 4  # the output-gradient kernel
  wy_grad_warps: int = 4
  grad_block_k: int = 64  # key columns per program of the output-gradient kernel
  grad_block_v: int = 64  # value columns per inner step of the output-gradient kernel
  # gpu_fused.py's forward: T and P per chunk, then one walk that also writes o (no u, no output kernel, and no
  # state history when no backward follows). Measured on an H200 (2026-12-01, docs/benchmarks.md): forward 0.22 /
  # 0.85 / 3.40 ms against 0.28 / 1.07 / 4.36 at 1 x 4k / 16k / 64k, forward+backward 1-3% faster.
  fused_forward: bool = True
  fused_walk_reads_w: bool = False  # the fused walk forms v_new = u - w h_n from a stored w (gpu_fused.py)
  # The dots of the WY inverse (gpu_precision.py's modes). None: the products' mode ('bf16' for 16-bit inputs; until
  # 2026-12-02 'tf32' there). On an H200 (2026-12-02, docs/benchmarks.md, with prep_split) forward 0.17 / 0.63 / 2.49
  # / 0.99 ms against 0.17 / 0.65 / 2.65 / 1.03 with TF32 at 1 x 4k / 16k / 64k and 8 x 4k; the f32-reference errors
  # unchanged (o 3.0e-3, worst 5.0e-3 at 1 x 4096).
  inverse_precision: str | None = None
  # gpu_inverse.py: None inverts the whole [C, C] tile by doubling (ten dependent C^3 products for C = 64); 16 or 32
  # builds A, P and T by [b, b] blocks (diagonal blocks by doubling, the rest by block forward substitution).
  inverse_block: int | None = 16
  # The fused forward's prep by (chunk, key head, row): k k^T and q k^T once per key head, for its value heads
  # (needs inverse_block). Slower on an H200 (2026-12-01, docs/benchmarks.md): the prep kernel 0.64 ms against 0.31
  # at 1 x 16384 (each program does its group's value heads in turn), forward+backward 0.92 / 3.59 against 0.86 / 3.26.
  prep_per_key_head: bool = False
  # The fused forward's prep as two launches: T (k k^T and the inverse) and P (q k^T) by separate programs, each
  # holding half the tiles: one program forming both needs 255 registers and spills 236 bytes (ptxas, sm_90a). None:
  # split with the blocked inverse (inverse_block), not with the whole-tile one; True needs inverse_block. Alone it
  # is slower on an H200 (2026-12-02: forward 0.68 against 0.65 ms at 1 x 16384); with the bf16 inverse it is the
  # faster form above.
  prep_split: bool | None = None
  # P = s Gamma * (q k^T), where it is a launch of its own (with a backward; a forward alone whose walk does not form
  # it), by gpu_fused.scores_kernel with this many warps: one program per (chunk, key head, row), one whole-tile q k^T
  # shared by the group's value heads (a positive count needs inverse_block, as prep_split does); 0: prep_kernel's
  # blocked P, one program per value head with parallel_warps; None: 8 with the blocked inverse (4 where the launch
  # normalises q, k: prefill_scores_norm), else 0. On an H200
  # (2026-12-03, docs/benchmarks.md, twelfth session) P's launch 0.064 ms (8 warps; 4: 0.066) against 0.087 at
  # 1 x 16384, forward+backward 0.547 / 2.029 / 7.861 / 1.819 / 3.312 ms against 0.557 / 2.053 / 7.992 / 1.845 / 3.365
  # at 1 x 4k / 16k / 64k, 4 x 4k and 8 x 4k; a forward alone that loads it rather than forming it in the walk was
  # not faster (0.600 / 2.297 / 0.443 ms against 0.599 / 2.257 / 0.390 at 1 x 16k / 64k and 4 x 4k).
  scores_warps: int | None = None
  # gpu_backward.py: one kernel per (chunk, value head, row) for the backward's parallel part instead of the
  # output-gradient and WY-gradient kernels (grad_warps, grad_block_k and grad_block_v are then its launch). Its loop
  # form measured on an H200 (2026-12-01, docs/benchmarks.md): forward+backward 0.75 / 2.84 ms against 0.86 / 3.26
  # for the two kernels at 1 x 4k / 16k (the kernel 1.02 ms against 0.83 + 0.61 at 16k); errors unchanged.
  fused_backward: bool = True
  grad_stages: int = 1  # software pipelining of the fused backward's block loops (more shared memory)
  # gpu_backward.py's grid as (value head, chunk, row): a key head's value heads, which read the same q and k rows,
  # side by side. Measured on an H200 (2026-12-02, docs/benchmarks.md): forward+backward 4.63 against 4.74 ms at
  # 8 x 4096, the same within 0.01 ms at 1 x 4096 / 16384.
  grad_heads_fastest: bool = True
  # gpu_mosaic_backward.py: the fused backward's per-chunk kernel in Mosaic GPU (TMA, wgmma) with this many
  # warpgroups per chunk (1 or 2; 0: the Triton kernel) where it applies (no segment ids, the fused forward's P,
  # C = 64, Dk = Dv = 128, bf16; the Triton kernel otherwise). Measured alone on an H200 (2026-12-02,
  # benchmarks/gated_delta_rule_mosaic_bwd.py, Hk 16, Hv 32): two warpgroups 0.181 / 0.674 / 1.337 ms, one 0.216 /
  # 0.815 / 1.698, Triton 0.255 / 0.989 / 1.969 at 1 x 4096 / 1 x 16384 / 8 x 4096; device tests passed.
  chunk_grads_mosaic: int = 2
  # gpu_mosaic_walks.py: the fused forward's walk and the reverse walk in Mosaic GPU with this many warpgroups per
  # program (0: the Triton walk; each warpgroup 64 value columns, two sharing every load but v / do; two TMA slots)
  # where they apply (as above, 64 | Dv). None: walk_warpgroups' choice by the number of programs. One warpgroup,
  # alone on an H200 (2026-12-02, benchmarks/gated_delta_rule_mosaic_walks.py): the reverse walk 0.123 / 0.467 /
  # 0.609 ms against Triton's 0.143 / 0.546 / 0.804 at the shapes above, the forward walk 0.130 / 0.495 / 0.730
  # against 0.123 / 0.469 / 0.638. Two warpgroups, in the op (ninth session, docs/benchmarks.md), at 8 x 4096:
  # forward walk 0.562 ms against Triton's 0.681, reverse walk 0.475 against one warpgroup's 0.607 (forward 0.84
  # against 0.99 ms, forward+backward 3.38 against 3.59); at B = 1 (32 programs for 132 SMs) they lose: forward
  # 0.25 / 0.93 / 3.63 against 0.17 / 0.63 / 2.48 at 1 x 4k / 16k / 64k. Device tests of all forms passed.
  forward_walk_mosaic: int | None = None
  reverse_walk_mosaic: int | None = None
  # gpu_norm_grads.py: the per-value-head dq, dk to the raw q, k's gradients (group sum and the l2 norm's backward) in
  # one kernel, the l2 norm inside the custom vjp; False: both under XLA autodiff, the norm outside. On an H200
  # (2026-12-02, docs/benchmarks.md, ninth session) forward+backward 0.58 / 2.16 / 8.53 / 3.69 ms against 0.63 / 2.32 /
  # 9.16 / 3.99 at 1 x 4k / 16k / 64k and 8 x 4k; errors unchanged; device tests passed.
  norm_grads_kernel: bool = True
  # gpu_qk_norm.py: the forward's l2 norm of q and k (with norm_grads_kernel, where it runs inside the custom vjp) in
  # one Pallas launch instead of XLA's two fusions. Off: XLA's are at the memory's bandwidth already (on an H200,
  # 2026-12-03, thirteenth session: 0.064 ms for 268 MB at 1 x 16384; the kernel 0.065-0.069, forward+backward
  # 0.57 / 2.11 / 8.19 / 1.89 / 3.50 ms against 0.55 / 2.04 / 7.91 / 1.82 / 3.33 at 1 x 4k / 16k / 64k, 4 x 4k and
  # 8 x 4k: it is launched again in the backward, where XLA's fusion is shared); device tests passed.
  qk_norm_kernel: bool = False
  # A forward alone (prefill) whose walk forms P (prefill_scores_in_walk), in roles by rows or in Triton, with the
  # l2 norm in the op: no normalised q, k are written. The T launch normalises the keys it reads for k k^T and writes
  # the reciprocal norms of q and k ([B, Hk, T] float32); the walk reads the raw q, k and scales each product of them
  # by those (gpu_fused.prep_kernel's and walk_output_kernel's norms). Off: slower on an H200 (2026-12-03,
  # thirteenth session, docs/benchmarks.md): forward 0.17 / 0.63 / 2.43 / 0.43 / 0.74 ms against 0.16 / 0.59 / 2.25 /
  # 0.40 / 0.73 at the shapes above (at 1 x 16384 the T launch 0.151 ms against 0.078 + the norm's 0.064, its
  # one-warp programs now reading q too; the roles walk 0.468 against 0.439); device tests passed.
  walk_normalizes_qk: bool = False
  # A forward alone (prefill) with the l2 norm in the op: P is its own launch (gpu_fused.scores_kernel, scores_warps),
  # which reads the raw q, k, normalises them and writes them for the T launch and the walk (that loads P) besides P:
  # the norm's read of q, k is P's, and XLA's norm pass is gone. True overrides prefill_scores_in_walk. None: where
  # the forward walk is in roles with at most SCORES_NORM_PROGRAMS 64-column programs and prefill_scores_in_walk is
  # None (prefill_scores_norm()). On an H200
  # (2026-12-03, docs/benchmarks.md, fourteenth session) at 1 x 16384 the normalising P launch took 0.093 ms (4
  # warps; 8: 0.108) for XLA's norm's 0.064, the roles walk loading P 0.387 against 0.439 forming it: forward 0.565
  # ms against 0.593 by rows, 0.552 with the transposed chain (1 x 4k / 64k: 0.157 / 2.113 against 0.157 / 2.249);
  # at B = 2 and 4 it did not win (SCORES_NORM_PROGRAMS).
  prefill_scores_norm: bool | None = None
  # A forward alone (prefill: no backward, so P need not be saved) with the blocked inverse: the forward walk forms
  # P = s Gamma * (q k^T) from the q, k tiles it loads anyway (one more 64 x 64 x Dk product a chunk, off the state's
  # path), and the prep's P launch is skipped. None: where the forward walk is a Mosaic GPU one. Measured on an H200
  # (2026-12-02, docs/benchmarks.md, tenth session): with the two-warpgroup Mosaic walk at 8 x 4096 the forward 0.77
  # ms against 0.85 (P's launch 0.17 ms gone, the walk 188 -> 255 registers, no spills); with the Triton walk at
  # B = 1 (four 32-column programs a value head, each forming P) 0.17 / 0.64 / 2.48 against 0.17 / 0.63 / 2.47 at
  # 1 x 4k / 16k / 64k (the walk 0.393 -> 0.495 ms at 16k for the 0.087 of P's launch).
  prefill_scores_in_walk: bool | None = None
  # gpu_mosaic_roles.py: the Mosaic forward walk as warpgroups in roles per 64 value columns (one
  # carries the state, one forms o and writes it, and with 3 a third loads and forms P), where a one-warpgroup Mosaic
  # walk applies; it replaces the forward walk forward_walk_mosaic picks. 0: none. None: 3 where walk_warpgroups
  # picks no Mosaic forward walk (fewer 64-column blocks than WIDE_WALK_PROGRAMS). Measured on an H200 (2026-12-03,
  # docs/benchmarks.md, eleventh session) at 1 x 4k / 16k / 64k and 4 x 4k: forward+backward 0.55 / 2.05 / 8.00 /
  # 1.84 ms against the Triton walk's 0.57 / 2.12 / 8.29 / 1.95, forward alone (P formed by the third warpgroup)
  # 0.16 / 0.60 / 2.24 / 0.42 against 0.17 / 0.63 / 2.47 / 0.65; at 8 x 4096 the two-warpgroup walk stays (3.39 /
  # 0.74 ms against 3.53 / 0.82 in roles).
  forward_walk_roles: int | None = None
  # A forward alone in roles carries the state's transpose (gpu_mosaic_roles.forward_walk's transposed_chain:
  # every product on the chain takes its left operand from registers; needs jax 0.11: 0.10's Mosaic GPU cannot load
  # the transpose of a swizzled tile, which the chain reads v by). Device tests passed; off: on an H200 (2026-12-03,
  # docs/benchmarks.md, twelfth session) 0.153 / 0.593 / 2.262 / 0.402 ms against 0.158 / 0.598 / 2.255 / 0.391 at
  # 1 x 4k / 16k / 64k and 4 x 4k. None: where P comes from prefill_scores_norm's launch (on jax 0.11 or later):
  # there, loading P, it won at 1 x 16k / 64k (fourteenth session, 4-warp P launch: forward 0.552 / 2.113 ms against
  # 0.565 / 2.188 by rows) and lost at 1 x 4k (0.157 against 0.153).
  roles_transposed_chain: bool | None = None

  def __post_init__(self):
    if self.chunk_grads_mosaic not in (0, 1, 2):
      raise ValueError(f"ChunkedLaunch: chunk_grads_mosaic={self.chunk_grads_mosaic} must be 0 (the Triton kernel), "
                       "1 or 2 (Mosaic GPU warpgroups a chunk)")
    if self.forward_walk_roles not in (None, 0, 2, 3):
      raise ValueError(f"ChunkedLaunch: forward_walk_roles={self.forward_walk_roles} must be 0 (none), 2 or 3 "
                       "(warpgroups a program)")
    if self.roles_transposed_chain and tuple(jax.__version_info__[:2]) < (0, 11):
      raise ValueError(f"ChunkedLaunch: roles_transposed_chain needs jax 0.11 or later (this is {jax.__version__}: "
                       "its Mosaic GPU cannot load the transpose of a swizzled tile)")
    for name in ("forward_walk_mosaic", "reverse_walk_mosaic"):
      if getattr(self, name) not in (None, 0, 1, 2):
        raise ValueError(f"ChunkedLaunch: {name}={getattr(self, name)} must be 0 (the Triton walk), 1 or 2 (Mosaic "
                         "GPU warpgroups a program)")


WIDE_WALK_PROGRAMS = 512
# At most this many 64-column forward walk programs (B x Hv x Dv / 64) for ChunkedLaunch.prefill_scores_norm's
# default: on an H200 (fourteenth session, Hv 32, Dv 128, a forward alone) it won at 64 (B = 1); at 128 it lost or
# tied (2 x 4096: 0.213 ms against 0.204; 2 x 16384: 0.782 against 0.784, with the transposed chain), at 256 it lost
# (4 x 4096, by rows: 0.425 against 0.405).
SCORES_NORM_PROGRAMS = 64


def _many_walk_programs(batch: int, heads: int, value_dim: int) -> bool:
  """Whether the walks' 64-column blocks number WIDE_WALK_PROGRAMS or more (enough programs for the SMs)."""
  return batch * heads * value_dim // 64 >= WIDE_WALK_PROGRAMS


def walk_blocks(launch: ChunkedLaunch, batch: int, heads: int, value_dim: int, store=jnp.bfloat16) -> tuple[int, int]:
  """(forward, reverse) walks' value columns per program for this launch and problem (ChunkedLaunch.block_v). Only
  16-bit storage widens by default: the float32 walks' wider tiles have not been compiled on a GPU."""
  wide = jnp.dtype(store).itemsize == 2 and _many_walk_programs(batch, heads, value_dim)
  forward = launch.block_v or (64 if wide else 32)
  reverse = launch.reverse_block_v or launch.block_v or (64 if wide else 32)
  return min(forward, value_dim), min(reverse, value_dim)


def walk_warpgroups(launch: ChunkedLaunch, batch: int, heads: int, value_dim: int) -> tuple[int, int]:
  """(forward, reverse) walks' Mosaic GPU warpgroups per program (ChunkedLaunch.forward_walk_mosaic /
  reverse_walk_mosaic; 0: Triton). By default two for both walks where the 64-column blocks are as many as
  walk_blocks widens for (WIDE_WALK_PROGRAMS: enough CTAs of two for the SMs, and the shared loads then matter),
  else the Triton forward walk and a one-warpgroup reverse walk, as measured (ChunkedLaunch's comment)."""
  wide = _many_walk_programs(batch, heads, value_dim)
  forward = launch.forward_walk_mosaic if launch.forward_walk_mosaic is not None else (2 if wide else 0)
  reverse = launch.reverse_walk_mosaic if launch.reverse_walk_mosaic is not None else (2 if wide else 1)
  return forward, reverse


def forward_walk_roles(launch: ChunkedLaunch, batch: int, heads: int, value_dim: int) -> int:
  """Warpgroups of the forward walk in roles (ChunkedLaunch.forward_walk_roles; 0: none): by default 3 where
  walk_warpgroups picks no Mosaic forward walk."""
  if launch.forward_walk_roles is not None:
    return launch.forward_walk_roles
  return 0 if walk_warpgroups(launch, batch, heads, value_dim)[0] else 3


def prefill_scores_norm(launch: ChunkedLaunch, batch: int, heads: int, value_dim: int, roles: int) -> bool:
  """Whether a forward alone with the l2 norm in the op normalises q, k in P's launch (ChunkedLaunch.
  prefill_scores_norm): by default where the forward walk is in roles (roles: its warpgroups, 0 for none) and has
  at most SCORES_NORM_PROGRAMS 64-column programs, unless the launch says where P comes from
  (prefill_scores_in_walk)."""
  if launch.prefill_scores_norm is not None:
    return launch.prefill_scores_norm
  return (launch.prefill_scores_in_walk is None and bool(roles)
          and batch * heads * value_dim // 64 <= SCORES_NORM_PROGRAMS)


def roles_transposed_chain(launch: ChunkedLaunch, scores_norm: bool) -> bool:
  """Whether a forward alone in roles carries the state's transpose (ChunkedLaunch.roles_transposed_chain): by
  default where P comes from the normalising launch, on jax 0.11 or later."""
  if launch.roles_transposed_chain is not None:
    return launch.roles_transposed_chain
  return scores_norm and tuple(jax.__version_info__[:2]) >= (0, 11)


def walk_stages(launch: ChunkedLaunch, store, block_v: int, reverse: bool = False) -> int:
  """Software-pipelining depth of a walk (ChunkedLaunch.walk_stages, reverse_walk_stages)."""
  if reverse and launch.reverse_walk_stages is not None:
    return launch.reverse_walk_stages
  if launch.walk_stages is not None:
    return launch.walk_stages
  if jnp.dtype(store).itemsize != 2:
    return 1
  return 2 if reverse and block_v >= 64 else 3


@functools.cache
def wgmma_device() -> bool:
  """Whether the GPU is a Hopper (CUDA compute capability 9.x), the only one the Mosaic GPU kernels' wgmma runs on;
  False for a device that reports none (not CUDA); True with no GPU attached (a deviceless compile describes one,
  benchmarks/deviceless_gpu.py)."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    return True
  return all(str(getattr(d, "compute_capability", "")).startswith("9.") for d in gpus)


def _mosaic_walks(warpgroups: int, *, chunk: int, key_dim: int, value_dim: int, dtypes, segmented: bool,
                  interpret: bool) -> int:
  """The warpgroups per program of the Mosaic GPU walk the launch asks for (ChunkedLaunch.forward_walk_mosaic,
  reverse_walk_mosaic) where it applies (two where 128 | Dv, else one), or 0: the Triton walk. gpu_mosaic_walks is
  imported only for a Mosaic walk: TPU and CPU hosts never load Mosaic GPU."""
  if not warpgroups or interpret or not wgmma_device():
    return 0
  from maxtext.kernels.gated_delta_rule import gpu_mosaic_walks  # pylint: disable=import-outside-toplevel
  scope = dict(chunk=chunk, key_dim=key_dim, value_dim=value_dim, dtypes=dtypes, segmented=segmented,
               interpret=interpret)
  for count in range(warpgroups, 0, -1):
    if gpu_mosaic_walks.applies(**scope, warpgroups=count):
      return count
  return 0


def segment_masks(segment_ids: jax.Array, chunk: int) -> Segments:
  """The kernels' Segments for [B, T] ids (chunking.token_segment_masks, flattened to [B, T_padded])."""
  batch = segment_ids.shape[0]
  seg, carried, in_last = token_segment_masks(segment_ids.astype(jnp.int32), chunk)
  flat = lambda x: x.reshape(batch, -1)
  return Segments(flat(seg), flat(carried).astype(jnp.float32), flat(in_last).astype(jnp.float32))


def supports(chunk_size: int, key_dim: int, value_dim: int) -> bool:
  """Whether Triton can tile these sizes (powers of two >= 16); the dispatcher runs XLA for the others."""
  try:
    check_dims(chunk_size=chunk_size, key_dim=key_dim, value_dim=value_dim)
  except ValueError:
    return False
  return True


# ------------------------------------------------------------------------------------------------ wrappers


def kernel_qk(q: jax.Array, k: jax.Array, *, mode: str, normalize: bool, norm_kernel: bool = False,
              interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """The kernels' q, k: l2-normalised in float32 (normalize; by gpu_qk_norm.py's kernel with norm_kernel, else by
  XLA), in the precision mode's operand dtype (q's in 'bf16' mode, else float32)."""
  operand = q.dtype if mode == "bf16" else jnp.float32
  if normalize and norm_kernel:
    return gpu_qk_norm.l2_normalize_qk(q, k, dtype=operand, interpret=interpret)
  if normalize:
    q, k = l2_normalize(q.astype(jnp.float32)), l2_normalize(k.astype(jnp.float32))
  return q.astype(operand), k.astype(operand)


@functools.cache
def chunked_with_vjp(chunk: int, scale: float, precision: str | None, interpret: bool,
                     launch: ChunkedLaunch = ChunkedLaunch(), normalize: bool = False) -> Callable:
  """(q, k, v, gc, beta, h0, segments) -> (o [B, T, Hv, Dv] in v's dtype, final state f32), differentiable in all
  but segments. Layouts in the module docstring; T a multiple of chunk. q, k are the kernels' operands as given, or
  with `normalize` the raw ones, l2-normalised here (their gradient by gpu_norm_grads.py; the residuals are the raw
  q, k, and the backward normalises them again unless XLA keeps the forward's).
  """

  operands = functools.partial(kernel_qk, mode=precision, normalize=normalize,
                               norm_kernel=launch.qk_norm_kernel, interpret=interpret)

  def setup(q, v):
    batch, length, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2:]
    mode, store, mm = matmul_mode((q, v), precision, interpret)
    block_v, reverse_block_v = walk_blocks(launch, batch, value_heads, value_dim, store)
    grad_block_v = min(launch.grad_block_v, value_dim)
    check_dims(chunk_size=chunk, key_dim=key_dim, value_dim=value_dim, block_v=block_v,
               reverse_block_v=reverse_block_v, grad_block_v=grad_block_v)
    if length % chunk:
      raise ValueError(f"gated delta rule GPU kernels: length {length} must be a multiple of the chunk {chunk}")
    inverse = launch.inverse_precision or mode
    block = None if launch.inverse_block is None else min(launch.inverse_block, chunk)
    if block is not None:
      check_dims(inverse_block=block)
    elif launch.prep_per_key_head or launch.prep_split or launch.scores_warps:
      raise ValueError("gated delta rule GPU kernels: prep_per_key_head, prep_split and scores_warps need "
                       "inverse_block (16 or 32)")
    inv = dict(inv_mm=functools.partial(dot, precision=inverse, interpret=interpret), inverse_block=block)
    common = dict(chunk=chunk, groups=value_heads // key_heads, mm=mm)
    dims = (batch, length, value_heads, key_dim, value_dim, length // chunk)
    return dims, store, common, inv, (block_v, reverse_block_v), grad_block_v

  def call(kernel, name, grid, out_shape, params, args, segments, **static):
    return pl.pallas_call(
        functools.partial(kernel, segmented=segments is not None, **static),
        grid=grid, out_shape=out_shape, compiler_params=params, interpret=interpret, name=name,
    )(*args, *(segments or ()))

  def forward(q, k, v, gc, beta, h0, segments, save: bool = True, raw: bool = False):
    """raw: q, k as given to `run`, still to be made the kernels' operands (by `operands`, or where
    launch.walk_normalizes_qk applies only cast: the T launch and the walk normalise them)."""
    if raw:
      q, k = kernel_qk(q, k, mode=precision, normalize=False)
    (batch, length, heads, key_dim, value_dim, num_chunks), store, common, inv, (block_v, _), _ = setup(q, v)
    struct = lambda *shape, dtype=store: jax.ShapeDtypeStruct(shape, dtype)
    parallel = (num_chunks, heads, batch)
    parallel_params = TritonParams(num_warps=launch.parallel_warps, num_stages=1)
    walk_params = TritonParams(num_warps=launch.walk_warps, num_stages=walk_stages(launch, store, block_v))
    if launch.fused_forward:
      chunk_matrix = struct(batch, heads, num_chunks, chunk, chunk)
      with_w = launch.fused_walk_reads_w  # the backward reads T, not w (gpu_kernels.state_grad_kernel)
      prep_grid = (num_chunks, q.shape[2], batch) if launch.prep_per_key_head else parallel
      w_out = [struct(batch, length, heads, key_dim)] * with_w
      scope = dict(chunk=chunk, key_dim=key_dim, value_dim=value_dim, dtypes=(store, q.dtype, v.dtype),
                   segmented=segments is not None, interpret=interpret)
      walks = _mosaic_walks(walk_warpgroups(launch, batch, heads, value_dim)[0], **scope)
      roles = forward_walk_roles(launch, batch, heads, value_dim) if not with_w and _mosaic_walks(1, **scope) else 0
      mosaic_walk = (bool(walks) or roles) and not with_w
      # a forward alone may form P in the walk (ChunkedLaunch.prefill_scores_in_walk)
      blocked = inv["inverse_block"] is not None
      split = blocked if launch.prep_split is None else launch.prep_split
      in_walk = launch.prefill_scores_in_walk
      # a forward alone may normalise q, k in P's launch (ChunkedLaunch.prefill_scores_norm)
      scores_norm = (raw and normalize and not save and blocked and launch.scores_warps != 0
                     and prefill_scores_norm(launch, batch, heads, value_dim, roles))
      default_warps = (4 if scores_norm else 8) if blocked else 0
      scores_warps = default_warps if launch.scores_warps is None else launch.scores_warps
      scores_inside = (mosaic_walk if in_walk is None else in_walk) and not save and blocked and not scores_norm
      flipped = bool(roles) and roles_transposed_chain(launch, scores_norm) and not save
      walk_norms = (raw and normalize and launch.walk_normalizes_qk and scores_inside and not with_w
                    and not launch.prep_per_key_head and (roles and not flipped or not mosaic_walk))
      scores_launch = functools.partial(call, gpu_fused.scores_kernel, "gdr_scores_fwd",
                                        (num_chunks, q.shape[2], batch), segments=segments, scale=scale,
                                        params=TritonParams(num_warps=scores_warps, num_stages=1), **common)
      if scores_norm:  # P, and the normalised q, k that the T launch and the walk read
        p, q, k = scores_launch(out_shape=(chunk_matrix, struct(*q.shape, dtype=q.dtype),
                                           struct(*k.shape, dtype=k.dtype)), args=(q, k, gc), normalizes=True)
        p = [p]
      elif raw and not walk_norms:
        q, k = operands(q, k)
      prep = functools.partial(call, gpu_fused.prep_kernel, grid=prep_grid, params=parallel_params,
                               args=(q, k, gc, beta), segments=segments, scale=scale, with_w=with_w,
                               per_key_head=launch.prep_per_key_head, **inv, **common)
      norms = []
      if split or scores_inside or scores_warps:
        norm_out = [jax.ShapeDtypeStruct((batch, q.shape[2], length), jnp.float32)] * 2 * walk_norms
        t, *w = prep(name="gdr_prep_t_fwd", out_shape=(chunk_matrix, *w_out, *norm_out), outputs="t",
                     normalizes=walk_norms)
        if walk_norms:
          *w, rq, rk = w
          norms = [rq, rk]
        if scores_inside:
          p = []
        elif scores_norm:
          pass  # P and the normalised q, k came first (the T launch reads the keys)
        elif scores_warps:
          p = scores_launch(out_shape=(chunk_matrix,), args=(q, k, gc))
        else:
          p = prep(name="gdr_prep_p_fwd", out_shape=(chunk_matrix,), outputs="p", with_w=False)
      else:
        t, *p_w = prep(name="gdr_prep_fwd", out_shape=(chunk_matrix, chunk_matrix, *w_out))
        p, w = p_w[:1], p_w[1:]
      saved = (struct(batch, heads, num_chunks, key_dim, value_dim), struct(batch, length, heads, value_dim))
      if mosaic_walk:
        from maxtext.kernels.gated_delta_rule import gpu_mosaic_walks  # pylint: disable=import-outside-toplevel
        walk_args = (q, k, v, gc, beta, t, p[0] if p else None, h0.astype(jnp.float32))
        walk_scope = dict(scale=scale, groups=common["groups"], save=save)
        if roles:
          from maxtext.kernels.gated_delta_rule import gpu_mosaic_roles  # pylint: disable=import-outside-toplevel
          o, final, *history = gpu_mosaic_roles.forward_walk(
              *walk_args, **walk_scope, warpgroups=roles, transposed_chain=flipped, norms=tuple(norms) or None)
        else:
          o, final, *history = gpu_mosaic_walks.forward_walk(*walk_args, **walk_scope, warpgroups=walks)
        return (o, final), ((t, *history, *p) if save else None)
      o, final, *history = call(
          gpu_fused.walk_output_kernel, "gdr_walk_fwd", (value_dim // block_v, heads, batch),
          (struct(batch, length, heads, value_dim, dtype=v.dtype),
           struct(batch, heads, key_dim, value_dim, dtype=jnp.float32), *saved[:2 * save]),
          walk_params, (q, k, v, gc, beta, t, *p, h0.astype(jnp.float32), *w, *norms), segments,
          num_chunks=num_chunks, block_v=block_v, scale=scale, save=save, with_w=with_w, scores_inside=scores_inside,
          norms=bool(norms), **common)
      return (o, final), ((t, *history, *p) if save else None)
    if raw:
      q, k = operands(q, k)
    w, u, t = call(wy_kernel, "gdr_wy_fwd", parallel,
                   (struct(batch, length, heads, key_dim), struct(batch, length, heads, value_dim),
                    struct(batch, heads, num_chunks, chunk, chunk)),
                   parallel_params, (k, v, gc, beta), segments, **inv, **common)
    final, states, v_new = call(
        state_kernel, "gdr_state_fwd", (value_dim // block_v, heads, batch),
        (struct(batch, heads, key_dim, value_dim, dtype=jnp.float32),
         struct(batch, heads, num_chunks, key_dim, value_dim), struct(batch, length, heads, value_dim)),
        walk_params, (k, w, u, gc, h0.astype(jnp.float32)), segments, num_chunks=num_chunks, block_v=block_v,
        **common)
    o = call(output_kernel, "gdr_output_fwd", parallel, struct(batch, length, heads, value_dim, dtype=v.dtype),
             parallel_params, (q, k, gc, states, v_new), segments, scale=scale, **common)
    return (o, final), (t, states, v_new)

  def backward(q, k, v, gc, beta, h0, segments, t, states, v_new, *scores, d_out, d_final, raw):
    """q, k: the kernels' operands; raw: the q, k given to `run` (finish's gradients are theirs)."""
    (batch, length, heads, key_dim, value_dim, num_chunks), store, common, _, (_, block_v), grad_block_v = setup(q, v)
    struct = lambda *shape, dtype=store: jax.ShapeDtypeStruct(shape, dtype)
    parallel = (num_chunks, heads, batch)
    d_out = d_out.astype(store)
    if scores:  # the fused forward saved P: the reverse walk forms the chunk-local P^T do itself
      local = scores[0]
    else:
      local = call(local_dv_kernel, "gdr_local_dv_bwd", parallel, struct(batch, length, heads, value_dim),
                   TritonParams(num_warps=launch.parallel_warps, num_stages=1), (q, k, gc, d_out), segments,
                   scale=scale, **common)
    walks = _mosaic_walks(walk_warpgroups(launch, batch, heads, value_dim)[1], chunk=chunk, key_dim=key_dim,
                          value_dim=value_dim, dtypes=(store, q.dtype, v.dtype), segmented=segments is not None,
                          interpret=interpret)
    if scores and walks:
      from maxtext.kernels.gated_delta_rule import gpu_mosaic_walks  # pylint: disable=import-outside-toplevel
      dv_new, d_states, dh0 = gpu_mosaic_walks.reverse_walk(q, k, t, gc, beta, d_out, local,
                                                            d_final.astype(jnp.float32), scale=scale,
                                                            groups=common["groups"], warpgroups=walks)
    else:
      dv_new, d_states, dh0 = call(
          state_grad_kernel, "gdr_state_bwd", (value_dim // block_v, heads, batch),
          (struct(batch, length, heads, value_dim), struct(batch, heads, num_chunks, key_dim, value_dim),
           struct(batch, heads, key_dim, value_dim, dtype=jnp.float32)),
          TritonParams(num_warps=launch.reverse_walk_warps or launch.walk_warps,
                       num_stages=walk_stages(launch, store, block_v, reverse=True)),
          (q, k, t, gc, beta, d_out, local, d_final.astype(jnp.float32)), segments, num_chunks=num_chunks,
          block_v=block_v, scale=scale, local_from_scores=bool(scores), **common)
    block_k = min(launch.grad_block_k, key_dim)
    check_dims(grad_block_k=block_k)
    key_blocks = key_dim // block_k
    if launch.fused_backward and launch.chunk_grads_mosaic and not interpret and wgmma_device():
      # Mosaic GPU's module only where asked for: TPU and CPU hosts never load it.
      from maxtext.kernels.gated_delta_rule import gpu_mosaic_backward  # pylint: disable=import-outside-toplevel
      if gpu_mosaic_backward.applies(chunk=chunk, key_dim=key_dim, value_dim=value_dim,
                                     dtypes=(store, q.dtype, v.dtype), segmented=segments is not None,
                                     with_scores=bool(scores), interpret=interpret):
        kernel = gpu_mosaic_backward.KERNELS[launch.chunk_grads_mosaic]
        dq, dk, dv, dgc, dbeta = kernel(q, k, v, gc, beta, t, states, d_states, d_out, v_new, dv_new, *scores,
                                        scale=scale, groups=common["groups"])
        return finish(*raw, v, h0, dq, dk, dv, dgc, dbeta, dh0)
    if launch.fused_backward:
      dq, dk, dv, dgc, dbeta = call(
          gpu_backward.chunk_grad_kernel, "gdr_chunk_bwd",
          (heads, num_chunks, batch) if launch.grad_heads_fastest else parallel,
          (struct(batch, length, heads, key_dim), struct(batch, length, heads, key_dim),
           struct(batch, length, heads, value_dim), struct(batch, heads, length, dtype=jnp.float32),
           struct(batch, heads, length, dtype=jnp.float32)),
          TritonParams(num_warps=launch.grad_warps, num_stages=launch.grad_stages),
          (q, k, v, gc, beta, t, states, d_states, d_out, v_new, dv_new, *scores), segments, block_k=block_k,
          block_v=grad_block_v, scale=scale, with_scores=bool(scores), heads_fastest=launch.grad_heads_fastest,
          **common)
      return finish(*raw, v, h0, dq, dk, dv, dgc, dbeta, dh0)
    dq, dk, dw, dgc = call(
        output_grad_kernel, "gdr_output_bwd", (key_blocks, num_chunks, batch * heads),
        (struct(batch, length, heads, key_dim), struct(batch, length, heads, key_dim),
         struct(batch, length, heads, key_dim), struct(key_blocks, batch, heads, length, dtype=jnp.float32)),
        TritonParams(num_warps=launch.grad_warps, num_stages=1),
        (q, k, gc, states, d_states, d_out, v_new, dv_new), segments, heads=heads, block_k=block_k,
        block_v=grad_block_v, scale=scale, **common)
    dk, dv, dgc, dbeta = call(
        wy_grad_kernel, "gdr_wy_bwd", parallel,
        (struct(batch, length, heads, key_dim), struct(batch, length, heads, value_dim),
         struct(batch, heads, length, dtype=jnp.float32), struct(batch, heads, length, dtype=jnp.float32)),
        TritonParams(num_warps=launch.wy_grad_warps, num_stages=1),
        (k, v, gc, beta, t, dw, dv_new, dk, dgc), segments, key_blocks=key_blocks, **common)
    return finish(*raw, v, h0, dq, dk, dv, dgc, dbeta, dh0)

  def finish(q, k, v, h0, dq, dk, dv, dgc, dbeta, dh0):
    """The kernels' per-value-head dq, dk summed over each key head's group (and through the l2 norm with
    normalize) as gradients of the q, k given to `run`; every gradient in its input's dtype."""
    if launch.norm_grads_kernel:
      grads = functools.partial(gpu_norm_grads.key_head_grads, block=chunk, normalized=normalize, interpret=interpret)
      dq, dk = grads(q, dq), grads(k, dk)
    else:
      batch, length, key_heads, key_dim = q.shape
      groups = dq.shape[2] // key_heads
      by_key_head = lambda x: x.astype(jnp.float32).reshape(batch, length, key_heads, groups, key_dim).sum(3)
      dq, dk = by_key_head(dq), by_key_head(dk)  # normalize is off here: the norm, if any, is outside the vjp
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dgc, dbeta, dh0.astype(h0.dtype)

  @jax.custom_vjp
  def run(q, k, v, gc, beta, h0, segments):
    return forward(q, k, v, gc, beta, h0, segments, save=False, raw=True)[0]

  def run_forward(q, k, v, gc, beta, h0, segments):
    outputs, saved = forward(*operands(q, k), v, gc, beta, h0, segments)
    return outputs, (q, k, v, gc, beta, h0, segments, *saved)

  def run_backward(residuals, cotangents):
    q, k, v, gc, beta, h0, segments = residuals[:7]
    d_out, d_final = cotangents
    grads = backward(*operands(q, k), v, gc, beta, h0, segments, *residuals[7:], d_out=d_out, d_final=d_final,
                     raw=(q, k))
    return (*grads, None)

  run.defvjp(run_forward, run_backward)
  return run


def chunk_gated_delta_rule_gpu(q, k, v, g, beta, initial_state, *, segment_ids=None, chunk_size: int = 64,
                               use_qk_l2norm: bool = True, scale: float | None = None,
                               precision: str | None = None, interpret: bool = False,
                               launch: ChunkedLaunch = ChunkedLaunch()) -> tuple[jax.Array, jax.Array]:
  """Model layouts (reference.py) -> (o [B, T, Hv, Dv] in v's dtype, final state [B, Hv, Dk, Dv] float32).

  The l2 norm, the chunk-local cumulative sum of g, the padding to whole chunks and the sum of dq, dk over each
  key head's value heads run under XLA (autodiff; with launch.norm_grads_kernel the norm's and the sum's backward is
  gpu_norm_grads.py's kernel); everything else is this module's kernels. precision:
  gpu_precision.py's modes, None for the inputs' dtype's default ('bf16' for 16-bit inputs, 'ieee' for float32).
  """
  batch, length, _, key_dim = q.shape
  value_heads, value_dim = v.shape[2:]
  initial_state = _initial_state(initial_state, batch, value_heads, key_dim, value_dim)
  pad = (-length) % chunk_size
  padded = length + pad
  pad_time = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
  mode = matmul_mode((q, k, v), precision, interpret)[0]
  normalize = use_qk_l2norm and launch.norm_grads_kernel  # else the l2 norm under autodiff, here
  if use_qk_l2norm and not normalize:
    q, k = kernel_qk(q, k, mode=mode, normalize=True)
  q, k, v = pad_time(q), pad_time(k), pad_time(v)  # o, dv take v's dtype
  per_head = lambda x: jnp.swapaxes(pad_time(x).astype(jnp.float32), 1, 2)  # [B, T, Hv] -> [B, Hv, T]
  gc = jnp.cumsum(per_head(g).reshape(batch, value_heads, padded // chunk_size, chunk_size), axis=-1)
  gc = gc.reshape(batch, value_heads, padded)
  segments = None if segment_ids is None else segment_masks(segment_ids, chunk_size)
  run = chunked_with_vjp(chunk_size, float(key_dim**-0.5 if scale is None else scale), mode, interpret, launch,
                         normalize)
  out, final = run(q, k, v, gc, per_head(beta), initial_state, segments)
  return out[:, :length], final
