"""The backward's last step on GPU: the per-value-head dq, dk of gpu.py's kernels to the gradients of the caller's
q, k [B, T, Hk, D], in one pass.

The chunk kernels write dq, dk per value head ([B, T, Hv, D]: each value head's programs own their rows). Each key
head's gradient is the sum over its G = Hv / Hk value heads, and with the op's l2 norm (y = x r, r = (x.x + eps)^-1/2)
the gradient of the raw x is
  dx = r (g - y (y . g)),   g = sum over the group of dy
Under XLA autodiff (ChunkedLaunch(norm_grads_kernel=False)) that is a row reduction and an elementwise fusion per
tensor, each reading the [B, T, Hv, D] gradients; here one program per (chunk of tokens, key head, row) reads x and
its group's dy once and writes dx. The norm is recomputed from the raw x in float32, as autodiff does, so nothing but
x is kept for it. gpu.py's default since it was measured on an H200 (2026-12-02, docs/benchmarks.md, Hk 16, Hv 32,
d 128): at 8 x 4096 this kernel (0.304 ms) and one fusion (0.126) replace four fusions of 0.717 ms; forward+backward
0.58 / 2.16 / 8.53 / 3.69 ms against 0.63 / 2.32 / 9.16 / 3.99 at 1 x 4k / 16k / 64k and 8 x 4k; device tests passed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.chunking import L2_NORM_EPS
from maxtext.kernels.triton_compat import TritonParams


def _norm_grad_kernel(x_ref, dy_ref, dx_ref, *, block: int, groups: int, normalized: bool, eps: float):
  t, key_head, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tokens = pl.ds(t * block, block)
  g = dy_ref[b, tokens, key_head * groups, :].astype(jnp.float32)
  for member in range(1, groups):
    g = g + dy_ref[b, tokens, key_head * groups + member, :].astype(jnp.float32)
  if normalized:
    x = x_ref[b, tokens, key_head, :].astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
    y = x * r
    g = r * (g - y * jnp.sum(y * g, axis=-1, keepdims=True))
  dx_ref[b, tokens, key_head, :] = g.astype(dx_ref.dtype)


def key_head_grads(x: jax.Array, dy: jax.Array, *, block: int, normalized: bool, interpret: bool = False,
                   eps: float = L2_NORM_EPS) -> jax.Array:
  """dx [B, T, Hk, D] in x's dtype from x [B, T, Hk, D] (the raw input when `normalized`: the op l2-normalised it)
  and the per-value-head dy [B, T, Hv, D]; block divides T (the chunk size: gpu.py pads T to whole chunks)."""
  batch, length, key_heads, dim = x.shape
  value_heads = dy.shape[2]
  if dy.shape[:2] != (batch, length) or dy.shape[3] != dim or value_heads % key_heads:
    raise ValueError(f"key_head_grads: dy {dy.shape} does not match x {x.shape} (value heads a multiple of key heads)")
  if length % block:
    raise ValueError(f"key_head_grads: length {length} must be a multiple of the block {block}")
  kernel = functools.partial(_norm_grad_kernel, block=block, groups=value_heads // key_heads, normalized=normalized,
                             eps=eps)
  return pl.pallas_call(kernel, grid=(length // block, key_heads, batch),
                        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                        compiler_params=TritonParams(num_warps=4, num_stages=1), interpret=interpret,
                        name="gdr_qk_grads")(x, dy)
