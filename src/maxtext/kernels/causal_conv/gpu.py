"""Pallas GPU (Triton) causal depthwise conv (+ SiLU): forward and backward kernels over [block_t, block_c] tiles.

Contract in reference.py. Each program owns one tile of rows [t0, t0 + block_t) and channels [c0, c0 + block_c) of
one batch row. Triton cannot shift a tile held in registers, so every tap loads its own shifted tile straight from
memory (rows t0 - s .. t0 - s + block_t for a tap s rows back); the K - 1 halo rows and the overlap between taps
come from L1 / L2, and HBM sees each byte about once.
  forward   y = silu(a) (or a), a_t = sum_i kernel[i] x_{t-K+1+i}; all math float32, I/O in x's dtype.
  backward  recomputes a at the tile's rows and the K - 1 rows after them (dx_t needs da_{t..t+K-1}), applies
            silu', writes dx, and per tile the float32 partial sums of dkernel [B, T / block_t, K, C] that XLA
            adds up afterwards (no atomics, so the result does not depend on the launch order).
Rows and channels past the ends are masked, so any T and C run; segment ids mask the taps whose source row lies in
another segment. A load's rows may start before row 0 (the first tile's halo): compiled, the mask keeps it from
touching memory; the interpreter (tests on a CPU) clamps such a slice instead, so there x and the ids get K - 1
leading pad rows and the kernels read at `origin` = K - 1 (the same code, shifted).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.triton_compat import TritonParams as _TritonParams
from maxtext.kernels.triton_compat import plt

MAX_WIDTH = 8  # taps are unrolled; the backward holds up to 2K - 1 shifted tiles live


@dataclasses.dataclass(frozen=True)
class ConvTiling:
  """Tile sizes (powers of two, shrunk to the problem) and warps per program.

  Measured on an H200 (2026-12-01, benchmarks/causal_conv.py --tilings, C = 8192 bf16, docs/benchmarks.md): forward
  128 x 64 tiles at 8 warps 0.056 / 0.202 ms at T 4096 / 16384 against 0.059 / 0.211 for 64 x 128 at 4; backward
  16 x 128 at 4 warps 0.26 / 1.03 ms against 0.28 / 1.11 for 32 x 128 at 8 (16 x 64 at 2 warps ties; wider or
  taller tiles are slower), and with packed documents 0.30 against 0.47 at T 4096.
  """

  block_t: int = 128
  block_c: int = 64
  num_warps: int = 8
  backward_block_t: int = 16
  backward_block_c: int = 128
  backward_num_warps: int = 4


def supports(width: int, dtype) -> bool:
  """Whether the kernels take a conv of this width and dtype (any T and C: rows and channels are masked)."""
  return 1 <= width <= MAX_WIDTH and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16, jnp.float16)


def _tile(requested: int, dim: int) -> int:
  return max(16, min(requested, pl.next_power_of_2(dim)))


class _TileView:
  """Shifted loads of one program's tile: rows t0 + offset + [0, block_t), channels c0 + [0, block_c)."""

  def __init__(self, batch, t0, c0, *, block_t: int, block_c: int, length: int, channels: int, origin: int):
    self.batch, self.t0, self.c0, self.length, self.origin = batch, t0, c0, length, origin
    self.rows = t0 + jnp.arange(block_t, dtype=jnp.int32)
    # [1, block_c] channels inside C; None when C fills whole channel blocks (masks then vary by row only)
    self.col_ok = None if channels % block_c == 0 else (c0 + jnp.arange(block_c, dtype=jnp.int32) < channels)[None]
    self.cols = pl.ds(c0, block_c)
    self.shape = (block_t, block_c)

  def row_ok(self, offset: int) -> jax.Array:
    rows = self.rows + offset
    return (rows >= 0) & (rows < self.length)

  def tile_mask(self, offset: int) -> jax.Array:
    rows = jnp.broadcast_to(self.row_ok(offset)[:, None], self.shape)
    return rows if self.col_ok is None else rows & self.col_ok

  def load(self, ref, offset: int, *, padded: bool) -> jax.Array:
    """[block_t, block_c] float32 of a [B, T(+origin), C] ref at rows shifted by `offset`, zeros outside."""
    start = self.t0 + offset + (self.origin if padded else 0)
    mask = self.tile_mask(offset)
    tile = plt.load(ref.at[self.batch, pl.ds(start, self.shape[0]), self.cols], mask=mask, other=0)
    return tile.astype(jnp.float32)

  def load_ids(self, ref, offset: int) -> jax.Array:
    """[block_t] segment ids of the rows shifted by `offset` (-1 outside the sequence)."""
    start = self.t0 + offset + self.origin
    return plt.load(ref.at[self.batch, pl.ds(start, self.shape[0])], mask=self.row_ok(offset), other=-1)

  def weight(self, kernel_ref, tap: int) -> jax.Array:
    """[1, block_c] float32: tap `tap` of the kernel over this tile's channels."""
    # Static indices go in as 1-row slices: the interpreter's load takes no plain Python int.
    masked = {} if self.col_ok is None else dict(mask=self.col_ok, other=0)  # Triton takes `other` only with a mask
    return plt.load(kernel_ref.at[pl.ds(tap, 1), self.cols], **masked).astype(jnp.float32)

  def store(self, ref, value: jax.Array) -> None:
    plt.store(ref.at[self.batch, pl.ds(self.t0, self.shape[0]), self.cols], value.astype(ref.dtype),
              mask=self.tile_mask(0))


def _view(width: int, length: int, channels: int, block_t: int, block_c: int, interpret: bool) -> _TileView:
  c_block, t_block, batch = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  return _TileView(batch, t_block * block_t, c_block * block_c, block_t=block_t, block_c=block_c, length=length,
                   channels=channels, origin=width - 1 if interpret else 0)


def _pre_activation(view: _TileView, x_ref, ids_ref, weights: list, out_offset: int, loaded: dict) -> jax.Array:
  """a at the tile's rows shifted by out_offset, float32; `loaded` memoises the shifted x tiles and ids."""
  width = len(weights)
  out_ids = _ids(view, ids_ref, out_offset, loaded)
  a = jnp.zeros(view.shape, jnp.float32)
  for i, w in enumerate(weights):
    source = out_offset - (width - 1) + i
    tap = _x(view, x_ref, source, loaded) * w
    if ids_ref is not None:
      tap = jnp.where((_ids(view, ids_ref, source, loaded) == out_ids)[:, None], tap, 0.0)
    a = a + tap
  return a


def _x(view, x_ref, offset, loaded):
  if ("x", offset) not in loaded:
    loaded["x", offset] = view.load(x_ref, offset, padded=True)
  return loaded["x", offset]


def _ids(view, ids_ref, offset, loaded):
  if ids_ref is None:
    return None
  if ("ids", offset) not in loaded:
    loaded["ids", offset] = view.load_ids(ids_ref, offset)
  return loaded["ids", offset]


def _forward_kernel(x_ref, kernel_ref, *refs, width: int, length: int, channels: int, block_t: int, block_c: int,
                    activation: str | None, interpret: bool):
  ids_ref, y_ref = refs if len(refs) == 2 else (None, refs[0])
  view = _view(width, length, channels, block_t, block_c, interpret)
  weights = [view.weight(kernel_ref, i) for i in range(width)]
  a = _pre_activation(view, x_ref, ids_ref, weights, 0, {})
  view.store(y_ref, jax.nn.silu(a) if activation == "silu" else a)


def _backward_kernel(x_ref, kernel_ref, dy_ref, *refs, width: int, length: int, channels: int, block_t: int,
                     block_c: int, activation: str | None, interpret: bool):
  ids_ref, dx_ref, dkernel_ref = refs if len(refs) == 3 else (None, *refs)
  view = _view(width, length, channels, block_t, block_c, interpret)
  weights = [view.weight(kernel_ref, i) for i in range(width)]
  loaded = {}
  here_ids = _ids(view, ids_ref, 0, loaded)
  dx = jnp.zeros(view.shape, jnp.float32)
  # Output row t + s reads this tile's row t through tap K - 1 - s: walk s upwards so the shifted x tiles that
  # consecutive pre-activations share stay live only across neighbouring steps.
  for s in range(width):
    da = view.load(dy_ref, s, padded=False)  # zeros past T: those rows add nothing below
    if activation == "silu":
      a = _pre_activation(view, x_ref, ids_ref, weights, s, loaded)
      gate = jax.nn.sigmoid(a)
      da = da * gate * (1 + a * (1 - gate))
    if s == 0:  # this tile's rows are the outputs whose taps dkernel sums here
      for i in range(width):
        source = i - (width - 1)
        product = _x(view, x_ref, source, loaded) * da
        if ids_ref is not None:
          product = jnp.where((_ids(view, ids_ref, source, loaded) == here_ids)[:, None], product, 0.0)
        plt.store(dkernel_ref.at[view.batch, pl.program_id(1), pl.ds(i, 1), view.cols],
                  jnp.sum(product, axis=0, keepdims=True), mask=view.col_ok)
    if ids_ref is not None:
      da = jnp.where((_ids(view, ids_ref, s, loaded) == here_ids)[:, None], da, 0.0)
    dx = dx + da * weights[width - 1 - s]
  view.store(dx_ref, dx)


def _params(num_warps: int) -> _TritonParams:
  return _TritonParams(num_warps=num_warps, num_stages=1)  # no loops: nothing to pipeline


def _pad_front(a: jax.Array, rows: int, fill) -> jax.Array:
  pad = [(0, 0)] * a.ndim
  pad[1] = (rows, 0)
  return jnp.pad(a, pad, constant_values=fill)


def _inputs(x, segment_ids, width: int, interpret: bool) -> tuple:
  """(x, ids...) as the kernels read them: int32 ids, both with K - 1 leading pad rows under the interpreter."""
  ids = () if segment_ids is None else (segment_ids.astype(jnp.int32),)
  if not interpret:
    return x, *ids
  return _pad_front(x, width - 1, 0), *(_pad_front(i, width - 1, -1) for i in ids)


def conv_forward_gpu(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None = None,
                     activation: str | None = "silu", *, tiling: ConvTiling = ConvTiling(),
                     interpret: bool = False) -> jax.Array:
  """y [B, T, C] in x's dtype (reference.py's contract), without a vjp."""
  batch, length, channels = x.shape
  width = kernel.shape[0]
  block_t, block_c = _tile(tiling.block_t, length), _tile(tiling.block_c, channels)
  x_in, *ids = _inputs(x, segment_ids, width, interpret)
  return pl.pallas_call(
      functools.partial(_forward_kernel, width=width, length=length, channels=channels, block_t=block_t,
                        block_c=block_c, activation=activation, interpret=interpret),
      grid=(pl.cdiv(channels, block_c), pl.cdiv(length, block_t), batch),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      compiler_params=_params(tiling.num_warps),
      interpret=interpret,
      name="causal_conv_forward",
  )(x_in, kernel, *ids)


def conv_backward_gpu(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None, dy: jax.Array,
                      activation: str | None = "silu", *, tiling: ConvTiling = ConvTiling(),
                      interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """(dx [B, T, C] in x's dtype, dkernel [K, C] in kernel's dtype, summed in float32) for the cotangent dy."""
  batch, length, channels = x.shape
  width = kernel.shape[0]
  block_t, block_c = _tile(tiling.backward_block_t, length), _tile(tiling.backward_block_c, channels)
  t_blocks = pl.cdiv(length, block_t)
  x_in, *ids = _inputs(x, segment_ids, width, interpret)
  dx, partial_dkernel = pl.pallas_call(
      functools.partial(_backward_kernel, width=width, length=length, channels=channels, block_t=block_t,
                        block_c=block_c, activation=activation, interpret=interpret),
      grid=(pl.cdiv(channels, block_c), t_blocks, batch),
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((batch, t_blocks, width, channels), jnp.float32)),
      compiler_params=_params(tiling.backward_num_warps),
      interpret=interpret,
      name="causal_conv_backward",
  )(x_in, kernel, dy.astype(x.dtype), *ids)
  return dx, jnp.sum(partial_dkernel, axis=(0, 1)).astype(kernel.dtype)


@functools.cache
def _with_vjp(activation: str | None, tiling: ConvTiling, interpret: bool) -> Callable:
  """(x, kernel, segment_ids) -> y with the Pallas forward and backward."""
  options = dict(activation=activation, tiling=tiling, interpret=interpret)

  @jax.custom_vjp
  def run(x, kernel, segment_ids):
    return conv_forward_gpu(x, kernel, segment_ids, **options)

  def run_forward(x, kernel, segment_ids):
    return run(x, kernel, segment_ids), (x, kernel, segment_ids)

  def run_backward(residuals, dy):
    x, kernel, segment_ids = residuals
    dx, dkernel = conv_backward_gpu(x, kernel, segment_ids, dy, **options)
    return dx, dkernel, None

  run.defvjp(run_forward, run_backward)
  return run


def causal_conv_gpu(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None = None,
                    activation: str | None = "silu", *, tiling: ConvTiling = ConvTiling(),
                    interpret: bool = False) -> jax.Array:
  """The differentiable conv on the Pallas kernels; reference.py's contract (interpret=True runs on a CPU)."""
  if not supports(kernel.shape[0], x.dtype):
    raise ValueError(f"causal_conv gpu kernel: width {kernel.shape[0]} (at most {MAX_WIDTH}) or dtype {x.dtype} "
                     "(float32, bfloat16, float16) not supported; use impl='reference'")
  return _with_vjp(activation, tiling, interpret)(x, kernel, segment_ids)
