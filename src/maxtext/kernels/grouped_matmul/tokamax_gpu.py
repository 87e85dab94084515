"""tokamax's ragged dot (Pallas Mosaic GPU on sm90, Pallas Triton elsewhere) as gmm and tgmm; optional.

tokamax needs jax >= 0.11.1, so it is imported only when this implementation is asked for; `available()` says
whether it can be. Both products go through tokamax.ragged_dot_general, whose dimension numbers express the
transposed-rhs product (d_lhs) and the ragged-contraction product (d_rhs) as jax.lax.ragged_dot_general does.
Tuned tile configurations come from tokamax's autotuning cache, or from a `tokamax.autotune(...)` result used as a
context manager around the call (benchmarks/moe.py does so for our shapes).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp

from maxtext.kernels.grouped_matmul.reference import _ragged_dims


def available() -> bool:
  return importlib.util.find_spec("tokamax") is not None


def _tokamax():
  import tokamax  # noqa: PLC0415 - optional dependency, imported on use

  return tokamax


def gmm_tokamax(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
                out_dtype=None, interpret: bool = False) -> jax.Array:
  del interpret  # tokamax chooses its own lowering
  dims = _ragged_dims(1, 2 if transpose_rhs else 1, rhs_grouped=True)
  return _tokamax().ragged_dot_general(lhs, rhs, group_sizes.astype(jnp.int32), dims,
                                       preferred_element_type=out_dtype or lhs.dtype)


def tgmm_tokamax(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, num_groups: int | None = None,
                 out_dtype=None, interpret: bool = False) -> jax.Array:
  del interpret, num_groups  # the group count is group_sizes' length
  dims = _ragged_dims(0, 0, rhs_grouped=False)
  return _tokamax().ragged_dot_general(lhs, grad, group_sizes.astype(jnp.int32), dims,
                                       preferred_element_type=out_dtype or lhs.dtype)
