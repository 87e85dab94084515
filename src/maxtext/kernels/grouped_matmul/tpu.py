"""TPU grouped matmul: megablox's Pallas Mosaic `gmm` and `tgmm` (jax.experimental.pallas.ops.tpu.megablox).

Contract in reference.py. Megablox wants the row count to be a multiple of its row tile, so rows are padded to one; it
leaves rows past sum(group_sizes) unwritten, so gmm zeroes them after (one elementwise select); the other tiles
shrink to small dimensions.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
# The kernel module itself (the package re-exports `gmm` as a function with megablox's own vjp).
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


@dataclasses.dataclass(frozen=True)
class TpuTiling:
  """megablox (m, k, n) tiles; 512 x 1024 x 1024 is MaxText's default for its sparse-matmul path."""

  block_m: int = 512
  block_k: int = 1024
  block_n: int = 1024


def _tiles(tiling: TpuTiling, m: int, k: int, n: int) -> tuple[int, int, int]:
  # A row tile of 8 (sublanes) at least; for a small problem one tile spans the (padded) rows.
  tm = min(tiling.block_m, -(-m // 8) * 8)
  return tm, min(tiling.block_k, k), min(tiling.block_n, n)


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
  extra = -x.shape[0] % multiple
  return x if not extra else jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


def gmm_tpu(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
            out_dtype=None, tiling: TpuTiling = TpuTiling(), interpret: bool = False) -> jax.Array:
  """megablox gmm: [M, K] x [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N]."""
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tk, tn = _tiles(tiling, m, k, n)
  out = megablox.gmm(_pad_rows(lhs, tm), rhs, group_sizes.astype(jnp.int32), out_dtype or lhs.dtype,
                     (tm, tk, tn), transpose_rhs=transpose_rhs, interpret=interpret)[:m]
  # megablox leaves the rows past sum(group_sizes) unwritten: the contract says zeros.
  covered = jnp.arange(m)[:, None] < jnp.sum(group_sizes)
  return jnp.where(covered, out, jnp.zeros((), out.dtype))


def tgmm_tpu(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, num_groups: int | None = None,
             out_dtype=None, tiling: TpuTiling = TpuTiling(), interpret: bool = False) -> jax.Array:
  """megablox tgmm: per-group lhs^T @ grad, [M, K], [M, N] -> [G, K, N]."""
  m, k = lhs.shape
  n = grad.shape[1]
  tm, tk, tn = _tiles(tiling, m, k, n)
  return megablox.tgmm(_pad_rows(lhs, tm).swapaxes(0, 1), _pad_rows(grad, tm), group_sizes.astype(jnp.int32),
                       out_dtype or lhs.dtype, (tm, tk, tn), num_actual_groups=num_groups, interpret=interpret)
