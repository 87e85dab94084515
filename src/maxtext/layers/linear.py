"""A bias-free linear map over the trailing input dims, with logical axis names on its kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from maxtext.layers.specs import Numerics

DEFAULT_INIT_STDDEV = 0.02


def partitioned(init, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, axes)


class Linear(nn.Module):
  """y = x . kernel, contracting the last `len(kernel_axes) - len(out_features)` dims of x.

  kernel shape: x.shape[-in_dims:] + out_features; kernel_axes names every kernel dim.
  """

  out_features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_dims = len(self.kernel_axes) - len(self.out_features)
    shape = tuple(x.shape[-in_dims:]) + tuple(self.out_features)
    kernel = self.param(
        "kernel",
        partitioned(nn.initializers.normal(DEFAULT_INIT_STDDEV), self.kernel_axes),
        shape,
        self.numerics.weight_dtype,
    )
    dtype = self.numerics.dtype
    return jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=in_dims)
