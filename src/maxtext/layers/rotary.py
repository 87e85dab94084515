"""Rotary position embedding on the leading `rotary_dim` dims of each head (rotate-half convention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_cos_sin(positions: jax.Array, rotary_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """positions [B, T] -> cos, sin [B, T, rotary_dim] in float32."""
  exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
  inv_freq = 1.0 / (theta**exponents)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, H, D]; rotates x[..., :rotary_dim] where rotary_dim = cos.shape[-1]; the rest passes through."""
  rotary_dim = cos.shape[-1]
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
  half = rotary_dim // 2
  rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  return jnp.concatenate([x_rot * cos + rotated_half * sin, x_pass], axis=-1)
