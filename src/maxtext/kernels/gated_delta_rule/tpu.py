"""Pallas TPU (Mosaic) kernels for the inter-chunk recurrence of the chunked gated delta rule.

They implement the contract of inter_chunk.py (its jnp twin, used by the tests): one grid step per
(batch, value head, chunk); the chunk axis runs sequentially and carries the [Dk, Dv] float32 state (forward)
or its gradient (backward, chunks visited in reverse by the index maps) in a VMEM scratch. Per-chunk blocks
are whole [C, D] tiles, so every block's last two dims equal the array's and Mosaic's (8, 128) rule holds for
any C and D. The per-chunk scalar `decay` travels as a [B, H, N, 1, 1] array with (1, 1) blocks: it streams
with its chunk like the other inputs and, unlike a scalar-prefetched SMEM table, does not grow with N (XLA
pads each (1, 1) tile in HBM: about 1 MiB per call at production sizes, negligible next to the states).
Inside a sharded jit these calls must sit in `jax.shard_map` (tpu_aot_check.py shows how).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from maxtext.kernels.gated_delta_rule.inter_chunk import BackwardResult, ForwardResult

# Full float32 matmuls (Mosaic's fp32 contract precision): the recurrence compounds rounding over N chunks,
# and the reference computes in float32 at HIGHEST.
_PRECISION = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """2-D matmul contracting dim contract[0] of `a` with dim contract[1] of `b`, float32 accumulation.

  (1, 0) is a @ b, (0, 0) is a^T @ b, (1, 1) is a @ b^T: dimension numbers instead of `.T`, so Mosaic picks
  the cheapest way to feed the MXU (a @ b^T is native; for a^T @ b it transposes `a` in registers).
  """
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=_PRECISION, preferred_element_type=_F32)


def _load(ref) -> jax.Array:
  return ref[...].astype(_F32)


# ----------------------------------------------------------------------------------------------- kernels


def _forward_kernel(
    q_ref, k_ref, w_ref, u_ref, intra_ref, decay_ref, h0_ref,  # inputs
    out_ref, final_ref, states_ref, v_new_ref,  # outputs
    state_scr,  # VMEM [Dk, Dv] f32: the state entering the current chunk
):
  """One chunk of the forward recurrence for one (batch, head)."""
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    state_scr[...] = _load(h0_ref)

  h = state_scr[...]  # [Dk, Dv]
  states_ref[...] = h
  v_new = _load(u_ref) - _dot(_load(w_ref), h, (1, 0))  # [C, Dv]
  v_new_ref[...] = v_new
  out_ref[...] = _dot(_load(q_ref), h, (1, 0)) + _dot(_load(intra_ref), v_new, (1, 0))
  next_h = _load(decay_ref) * h + _dot(_load(k_ref), v_new, (0, 0))  # (1, 1) decay broadcasts
  state_scr[...] = next_h

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = next_h


def _backward_kernel(
    q_ref, k_ref, w_ref, intra_ref, decay_ref, h_ref, v_new_ref, do_ref, dfinal_ref,  # inputs
    dq_ref, dk_ref, dw_ref, du_ref, dintra_ref, ddecay_ref, dh0_ref,  # outputs
    dh_scr,  # VMEM [Dk, Dv] f32: dL/d(state leaving the current chunk)
):
  """One chunk (visited last to first) of the backward recurrence for one (batch, head)."""
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    dh_scr[...] = _load(dfinal_ref)

  dh = dh_scr[...]  # [Dk, Dv]
  h = _load(h_ref)  # [Dk, Dv]
  do = _load(do_ref)  # [C, Dv]
  v_new = _load(v_new_ref)  # [C, Dv]
  dv_new = _dot(_load(intra_ref), do, (0, 0)) + _dot(_load(k_ref), dh, (1, 0))  # [C, Dv]
  dq_ref[...] = _dot(do, h, (1, 1))
  dk_ref[...] = _dot(v_new, dh, (1, 1))
  dw_ref[...] = -_dot(dv_new, h, (1, 1))
  du_ref[...] = dv_new
  dintra_ref[...] = _dot(do, v_new, (1, 1))
  # Lanes then sublanes: two single-axis reductions keep Mosaic on its plain reduction paths.
  ddecay_ref[...] = jnp.sum(jnp.sum(h * dh, axis=1, keepdims=True), axis=0, keepdims=True)
  prev_dh = _load(decay_ref) * dh + _dot(_load(q_ref), do, (0, 0)) - _dot(_load(w_ref), dv_new, (0, 0))
  dh_scr[...] = prev_dh

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = prev_dh


# ------------------------------------------------------------------------------------------- block specs


def _chunk_spec(rows: int, cols: int, num_chunks: int, reverse: bool) -> pl.BlockSpec:
  """One [rows, cols] tile of a [B, H, N, rows, cols] array per grid step; chunk n or N-1-n."""

  def index_map(b, h, n):
    return b, h, (num_chunks - 1 - n) if reverse else n, 0, 0

  return pl.BlockSpec((None, None, None, rows, cols), index_map)


def _head_spec(rows: int, cols: int) -> pl.BlockSpec:
  """The whole [rows, cols] slice of a [B, H, rows, cols] array, resident across the chunk axis."""
  return pl.BlockSpec((None, None, rows, cols), lambda b, h, n: (b, h, 0, 0))


def _compiler_params() -> pltpu.CompilerParams:
  # Chunks carry state in scratch, so their axis must run in order on one core; (b, h) pairs are independent.
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _cost(args: tuple[jax.Array, ...], out_shape: list[jax.ShapeDtypeStruct], matmuls: int, squares: int
          ) -> pl.CostEstimate:
  """What XLA's cost analysis should count for a call (it cannot see inside): per (batch, head, chunk) step,
  `matmuls` [C, Dk] x [Dk, Dv]-sized products and `squares` [C, C] x [C, Dv] ones; every operand read once."""
  b, h, n, c, dk = args[0].shape
  dv = args[-1].shape[-1]  # the [B, H, Dk, Dv] state (forward) or its cotangent (backward)
  flops = b * h * n * (2 * c * dk * dv * matmuls + 2 * c * c * dv * squares)
  bytes_accessed = sum(x.size * x.dtype.itemsize for x in args)
  bytes_accessed += sum(math.prod(s.shape) * s.dtype.itemsize for s in out_shape)
  return pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=bytes_accessed)


def _call(
    kernel: Callable[..., None],
    grid: tuple[int, int, int],
    in_specs: list[pl.BlockSpec],
    out_specs: list[pl.BlockSpec],
    out_shape: list[jax.ShapeDtypeStruct],
    state_shape: tuple[int, int],
    interpret: bool,
    name: str,
    cost_estimate: pl.CostEstimate | None = None,
) -> Callable[..., tuple[jax.Array, ...]]:
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM(state_shape, _F32)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name=name,
      cost_estimate=cost_estimate,
  )


# ---------------------------------------------------------------------------------------------- wrappers


def _f32_like(like: jax.Array, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
  """A float32 result that varies over the same shard_map axes as `like` (needed under check_vma=True)."""
  return jax.ShapeDtypeStruct(shape, _F32, manual_axis_type=jax.typeof(like).manual_axis_type)


def _check_shapes(q: jax.Array, v_like: jax.Array, intra: jax.Array, decay: jax.Array) -> None:
  b, h, n, c, _ = q.shape
  if v_like.shape[:4] != (b, h, n, c) or intra.shape != (b, h, n, c, c) or decay.shape != (b, h, n):
    raise ValueError(
        f"inter-chunk shapes disagree: q {q.shape} (B, H, N, C, Dk), values {v_like.shape} (B, H, N, C, Dv), "
        f"intra {intra.shape} (B, H, N, C, C), decay {decay.shape} (B, H, N)"
    )


def inter_chunk_forward_tpu(
    q: jax.Array, k: jax.Array, w: jax.Array, u: jax.Array, intra: jax.Array, decay: jax.Array, h0: jax.Array,
    *, interpret: bool = False,
) -> ForwardResult:
  """Pallas TPU forward of the inter-chunk recurrence; same contract as inter_chunk.inter_chunk_forward."""
  _check_shapes(q, u, intra, decay)
  b, h, n, c, dk = q.shape
  dv = u.shape[-1]
  key, value = _chunk_spec(c, dk, n, False), _chunk_spec(c, dv, n, False)
  in_specs = [key, key, key, value, _chunk_spec(c, c, n, False), _chunk_spec(1, 1, n, False), _head_spec(dk, dv)]
  out_specs = [value, _head_spec(dk, dv), _chunk_spec(dk, dv, n, False), value]
  shapes = [(b, h, n, c, dv), (b, h, dk, dv), (b, h, n, dk, dv), (b, h, n, c, dv)]
  args = (q, k, w, u, intra, decay.reshape(b, h, n, 1, 1), h0)
  out_shape = [_f32_like(q, s) for s in shapes]
  call = _call(_forward_kernel, (b, h, n), in_specs, out_specs, out_shape, (dk, dv), interpret,
               "gdr_inter_chunk_fwd", _cost(args, out_shape, matmuls=3, squares=1))
  return ForwardResult(*call(*args))


def inter_chunk_backward_tpu(
    q: jax.Array, k: jax.Array, w: jax.Array, intra: jax.Array, decay: jax.Array, states: jax.Array,
    v_new: jax.Array, d_out: jax.Array, d_final_state: jax.Array, *, interpret: bool = False,
) -> BackwardResult:
  """Pallas TPU backward of the inter-chunk recurrence; same contract as inter_chunk.inter_chunk_backward."""
  _check_shapes(q, v_new, intra, decay)
  b, h, n, c, dk = q.shape
  dv = v_new.shape[-1]
  key, value = _chunk_spec(c, dk, n, True), _chunk_spec(c, dv, n, True)
  square, scalar = _chunk_spec(c, c, n, True), _chunk_spec(1, 1, n, True)
  in_specs = [key, key, key, square, scalar, _chunk_spec(dk, dv, n, True), value, value, _head_spec(dk, dv)]
  out_specs = [key, key, key, value, square, scalar, _head_spec(dk, dv)]
  shapes = [(b, h, n, c, dk)] * 3 + [(b, h, n, c, dv), (b, h, n, c, c), (b, h, n, 1, 1), (b, h, dk, dv)]
  args = (q, k, w, intra, decay.reshape(b, h, n, 1, 1), states, v_new, d_out, d_final_state)
  out_shape = [_f32_like(q, s) for s in shapes]
  call = _call(_backward_kernel, (b, h, n), in_specs, out_specs, out_shape, (dk, dv), interpret,
               "gdr_inter_chunk_bwd", _cost(args, out_shape, matmuls=6, squares=2))
  *grads, ddecay, dh0 = call(*args)
  return BackwardResult(*grads, ddecay.reshape(b, h, n), dh0)
