"""The causal depthwise conv (+ optional SiLU) in plain jnp: the oracle for the kernels and the CPU / TPU path.

Layouts: x [B, T, C], kernel [K, C], segment_ids [B, T] int or None. Output row t is
    a_t = sum_i kernel[i] * x_{t - K + 1 + i}    (zeros before t = 0, and inputs of another segment count as zeros)
    y_t = silu(a_t) with activation='silu', a_t with activation=None.

The math runs in float32 and the output is cast to x's dtype. The backward is written by hand (a custom vjp) so that
the kernel gradient dkernel[i] = sum_{b,t} x[b, t - K + 1 + i] * da[b, t] accumulates in float32: autodiff of a
bf16 formula reduces over every token in bf16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "silu")


def check_args(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None, activation: str | None) -> None:
  if x.ndim != 3 or kernel.ndim != 2 or kernel.shape[1] != x.shape[2]:
    raise ValueError(f"causal_conv: expected x [B, T, C] and kernel [K, C]; got {x.shape} and {kernel.shape}")
  if segment_ids is not None and segment_ids.shape != x.shape[:2]:
    raise ValueError(f"causal_conv: segment_ids must be [B, T] = {x.shape[:2]}; got {segment_ids.shape}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"causal_conv: unknown activation '{activation}'; choose 'silu' or None")


def _shifted(x: jax.Array, shift: int, fill=0) -> jax.Array:
  """x [B, T, ...] moved `shift` rows later (shift < 0: earlier), the vacated rows filled with `fill`."""
  if shift == 0:
    return x
  length = x.shape[1]
  pad = [(0, 0)] * x.ndim
  pad[1] = (shift, 0) if shift > 0 else (0, -shift)
  padded = jnp.pad(x, pad, constant_values=fill)
  return padded[:, :length] if shift > 0 else padded[:, -length:]


def _tap_masks(segment_ids: jax.Array | None, width: int) -> list[jax.Array | None]:
  """Per tap i, [B, T, 1] float32: 1 where output row t and its source row t - K + 1 + i share a segment."""
  if segment_ids is None:
    return [None] * width
  masks = []
  for i in range(width):
    source_ids = _shifted(segment_ids, width - 1 - i, fill=-1)
    masks.append((source_ids == segment_ids)[..., None].astype(jnp.float32))
  return masks


def _pre_activation(x32: jax.Array, kernel32: jax.Array, masks: list) -> jax.Array:
  width = kernel32.shape[0]
  out = 0.0
  for i in range(width):
    tap = _shifted(x32, width - 1 - i) * kernel32[i]
    out = out + (tap if masks[i] is None else tap * masks[i])
  return out


def _forward(x, kernel, segment_ids, activation):
  a = _pre_activation(x.astype(jnp.float32), kernel.astype(jnp.float32), _tap_masks(segment_ids, kernel.shape[0]))
  return (jax.nn.silu(a) if activation == "silu" else a).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv(x, kernel, segment_ids, activation):
  return _forward(x, kernel, segment_ids, activation)


def _conv_fwd(x, kernel, segment_ids, activation):
  return _forward(x, kernel, segment_ids, activation), (x, kernel, segment_ids)


def _conv_bwd(activation, residuals, dy):
  x, kernel, segment_ids = residuals
  width = kernel.shape[0]
  x32, kernel32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
  masks = _tap_masks(segment_ids, width)
  da = dy.astype(jnp.float32)
  if activation == "silu":  # silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))), from the recomputed pre-activation
    a = _pre_activation(x32, kernel32, masks)
    gate = jax.nn.sigmoid(a)
    da = da * gate * (1 + a * (1 - gate))
  dx, dkernel = 0.0, []
  for i in range(width):
    shift = width - 1 - i
    da_i = da if masks[i] is None else da * masks[i]  # the gradient that flows through tap i
    dx = dx + _shifted(da_i, -shift) * kernel32[i]  # input row s feeds output row s + shift through tap i
    dkernel.append(jnp.sum(_shifted(x32, shift) * da_i, axis=(0, 1)))
  return dx.astype(x.dtype), jnp.stack(dkernel).astype(kernel.dtype), None


_conv.defvjp(_conv_fwd, _conv_bwd)


def causal_conv_reference(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None = None,
                          activation: str | None = "silu") -> jax.Array:
  """x [B, T, C], kernel [K, C], segment_ids [B, T] or None -> [B, T, C] in x's dtype (see the module docstring)."""
  check_args(x, kernel, segment_ids, activation)
  return _conv(x, kernel, segment_ids, activation)
