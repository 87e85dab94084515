"""Grouped matmul for MoE experts behind one dispatching API (megablox / GPU kernels plug in here)."""

from __future__ import annotations

import jax

from maxtext.kernels import dispatch
from maxtext.kernels.grouped_matmul.reference import grouped_matmul_reference

_AVAILABLE: dict[str, tuple[str, ...]] = {"cpu": ("reference",), "gpu": ("reference",), "tpu": ("reference",)}


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto") -> jax.Array:
  """lhs [M, K] rows sorted by group, rhs [G, K, N], group_sizes [G] -> [M, N]."""
  dispatch.choose("grouped_matmul", impl, _AVAILABLE)
  return grouped_matmul_reference(lhs, rhs, group_sizes)


__all__ = ["grouped_matmul", "grouped_matmul_reference"]
