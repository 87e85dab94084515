"""Gated DeltaNet token mixer: grouped projections, causal depthwise conv, gates, delta rule, gated norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from maxtext.kernels.causal_conv import causal_conv
from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from maxtext.layers.decode_cache import DecodeContext, GdnCache, read_rows
from maxtext.layers.linear import DEFAULT_INIT_STDDEV, Linear, partitioned
from maxtext.layers.norms import GatedRMSNorm
from maxtext.layers.specs import GatedDeltaNetSpec, Numerics


def _conv_impl(gdn_impl: str) -> str:
  """The conv's implementation for the layer's gdn_kernel: 'gpu' and 'reference' by name, else the conv's own
  'auto' (its kernel on a GPU: kernels/causal_conv/dispatch.py)."""
  return gdn_impl if gdn_impl in ("gpu", "reference") else "auto"


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
  def __call__(
      self,
      x: jax.Array,
      segment_ids: jax.Array | None = None,
      cache: GdnCache | None = None,
      decode: DecodeContext | None = None,
  ):
    """x [B, T, E] -> [B, T, E]; segment_ids [B, T] keep packed documents apart (conv and recurrent state).

    With `decode`, returns ([B, T, E], the new GdnCache): a prefill runs the chunked rule from a zero state and
    keeps the conv inputs and state after each row's last valid token; a step continues from `cache` with the
    token recurrence. Invalid inputs (decode.valid False) leave the delta-rule state unchanged (beta = 0, no decay).
    """
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
    z, b, a = to_value_heads(z), to_value_heads(b)[..., 0], to_value_heads(a)[..., 0]

    conv_kernel = ConvKernel(spec.conv_kernel, 2 * spec.key_dim + spec.value_dim, numerics, name="conv1d")()
    conv_kernel = conv_kernel.astype(numerics.dtype)
    # The conv's channels, as HF orders them: q | k | v, each flattened over its heads.
    mixed = jnp.concatenate([t.reshape(batch, length, -1) for t in (q, k, v)], axis=-1)  # [B, T, C]
    conv_cache = None
    if decode is None:  # the fused conv + SiLU (a Pallas kernel on a GPU)
      convolved = causal_conv(mixed, conv_kernel, segment_ids, activation="silu", impl=_conv_impl(spec.impl))
    elif decode.is_prefill:
      convolved = causal_conv(mixed, conv_kernel, activation="silu", impl=_conv_impl(spec.impl))
      conv_cache = _last_inputs(mixed, jnp.sum(decode.valid, axis=-1), spec.conv_kernel - 1)
    else:
      convolved, conv_cache = _conv_step(mixed, cache.conv, conv_kernel, decode.keep_all_states,
                                         jnp.sum(decode.valid, axis=-1))
    q, k, v = jnp.split(convolved, [spec.key_dim, 2 * spec.key_dim], axis=-1)
    q = q.reshape(batch, length, spec.num_key_heads, dk)
    k = k.reshape(batch, length, spec.num_key_heads, dk)
    v = v.reshape(batch, length, spec.num_value_heads, dv)

    a_log = self.param("A_log", partitioned(_a_log_init, ("heads",)), (spec.num_value_heads,), numerics.weight_dtype)
    dt_bias = self.param(
        "dt_bias", partitioned(nn.initializers.ones, ("heads",)), (spec.num_value_heads,), numerics.weight_dtype
    )
    beta = jax.nn.sigmoid(b)
    g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias.astype(jnp.float32))

    heads_axes = ("activation_batch", "activation_length", "activation_heads", None)
    q, k, v = (nn.with_logical_constraint(t, heads_axes) for t in (q, k, v))
    new_cache = None
    if decode is None:
      out, _ = chunk_gated_delta_rule(
          q, k, v, g, beta, segment_ids=segment_ids, chunk_size=spec.chunk_size, impl=spec.impl
      )
    else:
      valid = decode.valid[..., None]
      g, beta = jnp.where(valid, g, 0.0), jnp.where(valid, beta, jnp.zeros_like(beta))
      if decode.is_prefill:
        out, state = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=spec.chunk_size, impl=spec.impl)
      elif length > spec.chunk_size and not decode.keep_all_states:
        # A long continuation (a chunked prefill's later chunks): the chunked rule from the cached state; padding
        # (beta = 0, no decay) leaves it as the last real token left it.
        out, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=cache.state, chunk_size=spec.chunk_size,
                                            impl=spec.impl)
      else:
        out, state = _recurrent(q, k, v, g, beta, cache.state, spec.impl, decode.keep_all_states)
      new_cache = GdnCache(conv_cache, state)
    out = GatedRMSNorm(self.eps, numerics, name="norm")(out, z)
    out = nn.with_logical_constraint(out, heads_axes)
    out = Linear((embed,), ("heads", "head_dim", "embed"), numerics, name="out_proj")(out)
    return out if decode is None else (out, new_cache)


def _last_inputs(x: jax.Array, lengths: jax.Array, count: int) -> jax.Array:
  """x [B, T, C] -> [B, count, C]: row b's inputs lengths[b]-count..lengths[b]-1, zeros before the start."""
  return read_rows(jnp.pad(x, ((0, 0), (count, 0), (0, 0))), lengths, count)


def _conv_step(x: jax.Array, previous: jax.Array, kernel: jax.Array, keep_all: bool,
               counts: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The conv + SiLU of T new inputs x [B, T, C] after the K - 1 previous ones [B, K - 1, C] (the reference conv:
  a step's few tokens).

  Returns (outputs [B, T, C], the last K - 1 inputs [B, K - 1, C], or after each token [B, T, K - 1, C]).
  counts [B]: row b's first counts[b] inputs are real (a chunked prefill's last chunk is right-padded); the kept
  inputs end at the last real one. None: all are.
  """
  window = previous.shape[1]
  full = jnp.concatenate([previous.astype(x.dtype), x], axis=1)  # [B, K - 1 + T, C]
  out = causal_conv(full, kernel, activation="silu", impl="reference")[:, window:]
  length = x.shape[1]
  if keep_all:
    return out, jnp.stack([full[:, t + 1 : t + 1 + window] for t in range(length)], axis=1)
  if counts is None or length == 1:  # one token a row: rows without one (count 0) are idle, their cache unused
    return out, full[:, length:]
  return out, read_rows(full, counts, window)


def _recurrent(q, k, v, g, beta, state, impl: str, keep_all: bool) -> tuple[jax.Array, jax.Array]:
  """The token recurrence from `state`; with keep_all, the state after every token [B, T, Hv, Dk, Dv]."""
  if not keep_all:
    return recurrent_gated_delta_rule(q, k, v, g, beta, state, impl=impl)
  outs, states = [], []
  for t in range(q.shape[1]):  # a few tokens (a speculative verification): one kernel call each
    token = lambda x: x[:, t : t + 1]
    out, state = recurrent_gated_delta_rule(token(q), token(k), token(v), token(g), token(beta), state, impl=impl)
    outs.append(out)
    states.append(state)
  return jnp.concatenate(outs, axis=1), jnp.stack(states, axis=1)
