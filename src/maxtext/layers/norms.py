"""RMS norms: zero-centred (decoder, final, q/k norms) and gated (inside Gated DeltaNet)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from maxtext.layers.linear import partitioned
from maxtext.layers.specs import Numerics


def _rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """y = x / rms(x) * (1 + scale), in float32; scale starts at 0 (zero-centred)."""

  eps: float = 1e-6
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", partitioned(nn.initializers.zeros, ("norm",)), (x.shape[-1],), self.numerics.weight_dtype
    )
    y = _rms_normalize(x, self.eps) * (1.0 + scale.astype(jnp.float32))
    return y.astype(self.numerics.dtype)


class GatedRMSNorm(nn.Module):
  """y = scale * x / rms(x) * silu(gate), in float32; scale starts at 1 (not zero-centred)."""

  eps: float = 1e-6
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.numerics.weight_dtype
    )
    y = _rms_normalize(x, self.eps) * scale.astype(jnp.float32)
    y = y * jax.nn.silu(gate.astype(jnp.float32))
    return y.astype(self.numerics.dtype)
