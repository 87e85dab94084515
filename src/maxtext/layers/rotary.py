"""Rotary position embedding on the leading `rotary_dim` dims of each head (rotate-half convention), plain or YaRN.

YaRN (rope_type 'yarn') follows transformers' `_compute_yarn_parameters`: per frequency, a linear ramp over the
rotary dims blends the original inverse frequency (fast-rotating dims, kept) with the one divided by `factor`
(slow dims, interpolated), and cos/sin are multiplied by the attention factor. Qwen3-Next and Qwen3.6 rotate a
quarter of each head: YaRN sees only those `rotary_dim` dims, exactly as HF computes it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How the inverse frequencies are scaled. 'default' ignores the other fields."""

  rope_type: str = "default"
  factor: float = 1.0
  original_max_position_embeddings: int = 0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  # 0 derives it as HF does: from mscale / mscale_all_dim when both are set, else 0.1 ln(factor) + 1.
  attention_factor: float = 0.0
  mscale: float = 0.0
  mscale_all_dim: float = 0.0
  truncate: bool = True

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"unknown rope_type '{self.rope_type}' (expected one of {', '.join(ROPE_TYPES)})")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(scaling: RopeScaling) -> float:
  """The factor cos and sin are multiplied by (1 for plain RoPE)."""
  if scaling.rope_type == "default":
    return 1.0
  if scaling.attention_factor:
    return float(scaling.attention_factor)
  if scaling.mscale and scaling.mscale_all_dim:
    return _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
  return _yarn_mscale(scaling.factor)


def inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> np.ndarray:
  """[rotary_dim // 2] float32, bit-for-bit transformers' on a CPU: an ulp off turns position 300K by ~1e-4 rad."""
  exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
  # torch's float32 pow is correctly rounded: the float64 power rounded once matches it, numpy's float32 pow not.
  pos_freqs = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
  if scaling.rope_type == "default":
    return (np.float32(1.0) / pos_freqs).astype(np.float32)

  def correction_dim(rotations: float) -> float:
    # The rotary dim whose wavelength fits `rotations` turns into the original context.
    return rotary_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
        2 * math.log(theta))

  low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotary_dim - 1)
  if low == high:
    high += 0.001  # as HF: avoid a zero-width ramp
  ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  keep = np.float32(1.0) - ramp.astype(np.float32)  # 1: extrapolate (original frequency), 0: interpolate
  extrapolated = np.float32(1.0) / pos_freqs
  interpolated = np.float32(1.0) / (np.float32(scaling.factor) * pos_freqs)
  return (interpolated * (np.float32(1.0) - keep) + extrapolated * keep).astype(np.float32)


def rotary_cos_sin(
    positions: jax.Array, rotary_dim: int, theta: float, scaling: RopeScaling = RopeScaling()
) -> tuple[jax.Array, jax.Array]:
  """positions [B, T] -> cos, sin [B, T, rotary_dim] in float32 (times the YaRN attention factor)."""
  inv_freq = jnp.asarray(inverse_frequencies(rotary_dim, theta, scaling))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  factor = attention_factor(scaling)
  if factor == 1.0:
    return jnp.cos(angles), jnp.sin(angles)
  return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, H, D]; rotates x[..., :rotary_dim] where rotary_dim = cos.shape[-1]; the rest passes through."""
  rotary_dim = cos.shape[-1]
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
  half = rotary_dim // 2
  rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  return jnp.concatenate([x_rot * cos + rotated_half * sin, x_pass], axis=-1)
