"""Grouped matmul in plain jnp: the CPU path and the twin every kernel is tested against.

Layout shared by every implementation:
  lhs [M, K], rows sorted by group; group_sizes [G] int32 with sum <= M; rows past the sum belong to no group.
  gmm:  out[M, N] = lhs[rows of g] @ rhs[g]   (rhs [G, K, N]; with transpose_rhs, rhs is [G, N, K] and is
        used transposed), rows of no group come out as zeros.
  tgmm: out[G, K, N] = lhs[rows of g]^T @ grad[rows of g]   (lhs [M, K], grad [M, N]); a group with no rows
        gets zeros. It is the per-group weight gradient of gmm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _ragged_dims(contract_lhs: int, contract_rhs: int, rhs_grouped: bool) -> jax.lax.RaggedDotDimensionNumbers:
  return jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([contract_lhs], [contract_rhs]), ([], [])),
      lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[0] if rhs_grouped else [],
  )


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
                  out_dtype=None) -> jax.Array:
  """lhs [M, K] @ rhs[g] per group -> [M, out_dtype or lhs.dtype] (see the module docstring)."""
  dims = _ragged_dims(1, 2 if transpose_rhs else 1, rhs_grouped=True)
  return jax.lax.ragged_dot_general(lhs, rhs, group_sizes.astype(jnp.int32), dims,
                                    preferred_element_type=out_dtype or lhs.dtype)


def tgmm_reference(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, out_dtype=None) -> jax.Array:
  """lhs [M, K], grad [M, N] -> [G, K, N]: lhs[rows of g]^T @ grad[rows of g] per group."""
  dims = _ragged_dims(0, 0, rhs_grouped=False)
  return jax.lax.ragged_dot_general(lhs, grad, group_sizes.astype(jnp.int32), dims,
                                    preferred_element_type=out_dtype or lhs.dtype)


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """lhs [M, K] sorted by group, rhs [G, K, N] -> [M, N]; differentiated by JAX (ragged_dot's own rules)."""
  return gmm_reference(lhs, rhs, group_sizes)
