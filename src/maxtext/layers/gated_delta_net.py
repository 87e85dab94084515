"""Gated DeltaNet token mixer: grouped projections, causal depthwise conv, gates, delta rule, gated norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule
from maxtext.layers.linear import DEFAULT_INIT_STDDEV, Linear, partitioned
from maxtext.layers.norms import GatedRMSNorm
from maxtext.layers.specs import GatedDeltaNetSpec, Numerics


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """x [B, T, C], kernel [K, C] -> [B, T, C]: y_t = sum_i kernel[i] * x_{t - K + 1 + i}, zeros before t = 0.

  With segment_ids [B, T], inputs from another segment (an earlier packed document) count as zeros too.
  """
  width = kernel.shape[0]
  padded = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
  length = x.shape[1]
  if segment_ids is None:
    return sum(padded[:, i : i + length] * kernel[i] for i in range(width))
  padded_ids = jnp.pad(segment_ids, ((0, 0), (width - 1, 0)), constant_values=-1)
  same = lambda i: (padded_ids[:, i : i + length] == segment_ids)[..., None].astype(x.dtype)
  return sum(padded[:, i : i + length] * same(i) * kernel[i] for i in range(width))


def _a_log_init(key, shape, dtype):
  # A ~ U(0.01, 16), stored as log A (as HF initialises it).
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 0.01, 16.0)).astype(dtype)


class ConvKernel(nn.Module):
  """Holds the depthwise conv kernel [K, C] over the concatenated (q | k | v) channels, as HF stores it."""

  width: int
  channels: int
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param(
        "kernel",
        partitioned(nn.initializers.normal(DEFAULT_INIT_STDDEV * 10), (None, "conv_channels")),
        (self.width, self.channels),
        self.numerics.weight_dtype,
    )


class GatedDeltaNet(nn.Module):
  spec: GatedDeltaNetSpec
  eps: float = 1e-6
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x [B, T, E] -> [B, T, E]; segment_ids [B, T] keep packed documents apart (conv and recurrent state)."""
    spec, numerics = self.spec, self.numerics
    batch, length, embed = x.shape
    group = spec.value_heads_per_key_head
    dk, dv = spec.key_head_dim, spec.value_head_dim
    # Per key head the projection holds (q | k | its `group` value heads | their `group` gates).
    qkvz = Linear(
        (spec.num_key_heads, 2 * dk + 2 * group * dv), ("embed", "heads", None), numerics, name="in_proj_qkvz"
    )(x)
    ba = Linear((spec.num_key_heads, 2 * group), ("embed", "heads", None), numerics, name="in_proj_ba")(x)
    q, k, v, z = jnp.split(qkvz, [dk, 2 * dk, 2 * dk + group * dv], axis=-1)
    b, a = ba[..., :group], ba[..., group:]
    to_value_heads = lambda t: t.reshape(batch, length, spec.num_value_heads, -1)
    v, z, b, a = to_value_heads(v), to_value_heads(z), to_value_heads(b)[..., 0], to_value_heads(a)[..., 0]

    conv_kernel = ConvKernel(spec.conv_kernel, 2 * spec.key_dim + spec.value_dim, numerics, name="conv1d")()
    conv_kernel = conv_kernel.astype(numerics.dtype)
    bounds = (0, spec.key_dim, 2 * spec.key_dim, 2 * spec.key_dim + spec.value_dim)
    convolved = []
    for t, lo, hi in zip((q, k, v), bounds[:-1], bounds[1:]):
      flat = t.reshape(batch, length, hi - lo)
      convolved.append(jax.nn.silu(causal_depthwise_conv(flat, conv_kernel[:, lo:hi], segment_ids)).reshape(t.shape))
    q, k, v = convolved

    a_log = self.param("A_log", partitioned(_a_log_init, ("heads",)), (spec.num_value_heads,), numerics.weight_dtype)
    dt_bias = self.param(
        "dt_bias", partitioned(nn.initializers.ones, ("heads",)), (spec.num_value_heads,), numerics.weight_dtype
    )
    beta = jax.nn.sigmoid(b)
    g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias.astype(jnp.float32))

    heads_axes = ("activation_batch", "activation_length", "activation_heads", None)
    q, k, v = (nn.with_logical_constraint(t, heads_axes) for t in (q, k, v))
    out, _ = chunk_gated_delta_rule(
        q, k, v, g, beta, segment_ids=segment_ids, chunk_size=spec.chunk_size, impl=spec.impl
    )
    out = GatedRMSNorm(self.eps, numerics, name="norm")(out, z)
    out = nn.with_logical_constraint(out, heads_axes)
    return Linear((embed,), ("heads", "head_dim", "embed"), numerics, name="out_proj")(out)
