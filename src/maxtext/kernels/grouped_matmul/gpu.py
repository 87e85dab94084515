"""Pallas GPU (Triton) grouped matmul: gmm (forward and d_lhs) and tgmm (the per-group d_rhs).

Contract in reference.py. Rows are sorted by group, and a group starts at any row, so the row tiles of gmm are
laid out per group, not on a global grid: group g's rows split into ceil(size_g / block_m) tiles, and each work
item is one such tile. No two items write the same output row, so every store is a plain masked store. Rows past
sum(group_sizes) form one more "tail" group whose items store zeros. The number of items is data dependent but
bounded by cdiv(M, block_m) + G + 1 (each group adds at most one partial tile), so the grid has that static size
and items past the real count return at once.

A tile of rows [start, end) is read through a window of block_m rows starting at min(start, M - block_m): always
inside the array (Triton would mask an overrun, but interpret mode clamps out-of-range slices and would shift the
rows), with the rows outside [start, end) masked to zero on load and skipped on store.

Launch order: the grid is (column tile, item) with column tiles fastest, so the programs reading one lhs row tile
run together and share it from L2; the items of one group are adjacent, so rhs[g] is read from HBM about once.
At Qwen3-Next's shape (K 2048, N 512, 512 groups) lhs and rhs are 1.4 GB per product: the kernel is close to
memory bound, and reading each byte once is what matters.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.triton_compat import TritonParams as _TritonParams
from maxtext.kernels.triton_compat import plt


@dataclasses.dataclass(frozen=True)
class GpuTiling:
  """Tile sizes and launch parameters (powers of two >= 16; clipped to the problem's dimensions)."""

  # Defaults: the fastest of benchmarks/moe.py --variants on an H100 (2026-11-23, docs/benchmarks.md) for
  # 512 experts [2048 -> 512] at 81920 and 327680 rows, for the forward and d_lhs products and for tgmm.
  block_m: int = 128  # rows per gmm work item
  block_n: int = 256  # output columns per gmm program
  block_k: int = 64  # contraction step of gmm
  num_warps: int = 8
  num_stages: int = 3
  tgmm_block_m: int = 32  # rows per step of tgmm's walk over a group
  tgmm_block_k: int = 128  # rows of d_rhs per tgmm program
  tgmm_block_n: int = 128  # columns of d_rhs per tgmm program
  tgmm_num_warps: int = 4
  tgmm_num_stages: int = 3


def _tile(requested: int, dim: int) -> int:
  """The tile for a dimension: the requested size, shrunk to the dimension's next power of two, >= 16."""
  return max(16, min(requested, pl.next_power_of_2(dim)))


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """a @ b with float32 accumulation; float32 operands use IEEE float32 (Triton would pick TF32)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _row_window(start, end, num_rows: int, block_m: int):
  """(window start, [block_m] mask of the rows in [start, end)) for a tile read through an in-bounds window."""
  window = jnp.minimum(start, num_rows - block_m)
  rows = window + jnp.arange(block_m, dtype=jnp.int32)
  return window, (rows >= start) & (rows < end)


def work_items(group_sizes: jax.Array, num_rows: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(group, first row, end row) of each row tile, groups in order; [cdiv(M, block_m) + G + 1] each.

  Group G is the tail (rows past sum(group_sizes)); items past the real count have end == start.
  """
  num_groups = group_sizes.shape[0]
  sizes = jnp.concatenate([group_sizes.astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
  sizes = sizes.at[-1].set(num_rows - jnp.sum(group_sizes.astype(jnp.int32)))
  offsets = jnp.cumsum(sizes) - sizes  # first row of each group
  tiles = -(-sizes // block_m)
  tile_ends = jnp.cumsum(tiles)
  num_items = pl.cdiv(num_rows, block_m) + num_groups + 1
  item = jnp.arange(num_items, dtype=jnp.int32)
  # compare_all: one fused comparison, where the default binary search is an XLA while loop (a device-to-host
  # sync per iteration on GPU, which dominated a batch-1 decode step).
  group = jnp.searchsorted(tile_ends, item, side="right", method="compare_all")
  group = jnp.minimum(group, num_groups).astype(jnp.int32)
  start = offsets[group] + (item - (tile_ends[group] - tiles[group])) * block_m
  end = jnp.minimum(start + block_m, offsets[group] + sizes[group])
  valid = item < tile_ends[-1]
  return group, jnp.where(valid, start, 0), jnp.where(valid, end, 0)


def _gmm_kernel(group_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref, *, num_groups: int, block_m: int,
                block_n: int, block_k: int, transpose_rhs: bool):
  """One (column tile, work item): out[rows, cols] = lhs[rows] @ rhs[g][:, cols], float32 accumulation."""
  col_tile, item = pl.program_id(0), pl.program_id(1)
  group, start, end = group_ref[item], start_ref[item], end_ref[item]
  num_rows, contraction = lhs_ref.shape
  window, row_mask = _row_window(start, end, num_rows, block_m)
  rows, cols = pl.ds(window, block_m), pl.ds(col_tile * block_n, block_n)
  rhs_group = jnp.minimum(group, num_groups - 1)  # the tail's index stays in bounds; its product is skipped

  def step(k, acc):
    ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    a = plt.load(lhs_ref.at[rows, ks], mask=jnp.broadcast_to(row_mask[:, None], (block_m, block_k)), other=0)
    if transpose_rhs:
      return acc + _dot(a, rhs_ref[rhs_group, cols, ks], trans_b=True)
    return acc + _dot(a, rhs_ref[rhs_group, ks, cols])

  @pl.when(end > start)
  def _():
    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    acc = jax.lax.cond(group < num_groups, lambda: jax.lax.fori_loop(0, contraction // block_k, step, zeros),
                       lambda: zeros)
    mask = jnp.broadcast_to(row_mask[:, None], (block_m, block_n))
    plt.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "tiling", "interpret"))
def gmm_gpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
            out_dtype=None, tiling: GpuTiling = GpuTiling(), interpret: bool = False) -> jax.Array:
  """Grouped matmul [M, K] x [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N]; see reference.py."""
  num_rows, contraction = lhs.shape
  num_groups = rhs.shape[0]
  out_cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = out_dtype or lhs.dtype
  block_m, block_n, block_k = (_tile(tiling.block_m, num_rows), _tile(tiling.block_n, out_cols),
                               _tile(tiling.block_k, contraction))
  # Padding happens only for shapes off the tile grid (small test models); production shapes pass untouched.
  rows_p, cols_p, contraction_p = max(num_rows, block_m), _round_up(out_cols, block_n), _round_up(contraction,
                                                                                                  block_k)
  lhs_p = _pad_axis(_pad_axis(lhs, 0, rows_p), 1, contraction_p)
  rhs_p = _pad_axis(_pad_axis(rhs, 1, cols_p if transpose_rhs else contraction_p), 2,
                    contraction_p if transpose_rhs else cols_p)
  items = work_items(group_sizes, rows_p, block_m)
  out = pl.pallas_call(
      functools.partial(_gmm_kernel, num_groups=num_groups, block_m=block_m, block_n=block_n, block_k=block_k,
                        transpose_rhs=transpose_rhs),
      grid=(cols_p // block_n, items[0].shape[0]),
      out_shape=jax.ShapeDtypeStruct((rows_p, cols_p), out_dtype),
      compiler_params=_TritonParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
      interpret=interpret,
      name="grouped_matmul_gmm",
  )(*items, lhs_p, rhs_p)
  return out[:num_rows, :out_cols]


def _tgmm_kernel(offsets_ref, lhs_ref, grad_ref, out_ref, *, block_m: int, block_k: int, block_n: int):
  """One (row tile of d_rhs, column tile, group): walks the group's rows accumulating lhs^T @ grad in float32."""
  k_tile, n_tile, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = offsets_ref[group], offsets_ref[group + 1]
  num_rows = lhs_ref.shape[0]
  ks, ns = pl.ds(k_tile * block_k, block_k), pl.ds(n_tile * block_n, block_n)

  def step(i, acc):
    window, row_mask = _row_window(start + i * block_m, end, num_rows, block_m)
    rows = pl.ds(window, block_m)
    a = plt.load(lhs_ref.at[rows, ks], mask=jnp.broadcast_to(row_mask[:, None], (block_m, block_k)), other=0)
    b = plt.load(grad_ref.at[rows, ns], mask=jnp.broadcast_to(row_mask[:, None], (block_m, block_n)), other=0)
    return acc + _dot(a, b, trans_a=True)

  steps = (end - start + block_m - 1) // block_m  # 0 for an empty group: its d_rhs is zeros
  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_k, block_n), jnp.float32))
  out_ref[group, ks, ns] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "tiling", "interpret"))
def tgmm_gpu(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, num_groups: int | None = None,
             out_dtype=None, tiling: GpuTiling = GpuTiling(), interpret: bool = False) -> jax.Array:
  """Per-group lhs^T @ grad: [M, K], [M, N] -> [G, K, N]; see reference.py."""
  num_rows, k_dim = lhs.shape
  n_dim = grad.shape[1]
  num_groups = num_groups or group_sizes.shape[0]
  out_dtype = out_dtype or lhs.dtype
  block_m, block_k, block_n = (_tile(tiling.tgmm_block_m, num_rows), _tile(tiling.tgmm_block_k, k_dim),
                               _tile(tiling.tgmm_block_n, n_dim))
  rows_p, k_p, n_p = max(num_rows, block_m), _round_up(k_dim, block_k), _round_up(n_dim, block_n)
  lhs_p = _pad_axis(_pad_axis(lhs, 0, rows_p), 1, k_p)
  grad_p = _pad_axis(_pad_axis(grad, 0, rows_p), 1, n_p)
  sizes = group_sizes.astype(jnp.int32)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes)])
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, block_m=block_m, block_k=block_k, block_n=block_n),
      # Tiles of one group vary fastest: its rows of lhs and grad stay in L2 while all its tiles read them.
      grid=(k_p // block_k, n_p // block_n, num_groups),
      out_shape=jax.ShapeDtypeStruct((num_groups, k_p, n_p), out_dtype),
      compiler_params=_TritonParams(num_warps=tiling.tgmm_num_warps, num_stages=tiling.tgmm_num_stages),
      interpret=interpret,
      name="grouped_matmul_tgmm",
  )(offsets, lhs_p, grad_p)
  return out[:, :k_dim, :n_dim]
