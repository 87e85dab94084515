"""Grouped matmul: rows of `lhs`, sorted by group, each multiplied by its group's matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """lhs: [M, K] sorted by group; rhs: [G, K, N]; group_sizes: [G] int32 summing to <= M. Returns [M, N].

  Rows past sum(group_sizes) come out as zeros.
  """
  return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=lhs.dtype)
