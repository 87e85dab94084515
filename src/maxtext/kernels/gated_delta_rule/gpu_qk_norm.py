"""The forward's l2 norm of q and k on GPU (ChunkedLaunch.qk_norm_kernel): y = x (x.x + eps)^-1/2 per token and key
head, in float32, stored in the kernels' operand dtype; one launch for both tensors.

Under XLA the norm is one fusion per tensor. On an H200 (2026-12-03, docs/benchmarks.md, twelfth session; profiler,
1 x 16384, Hk 16, d 128, XLA_FLAGS of the peers' benchmark) the kernel named fusion_7 took 0.064 ms; the HLO compiled
for an H200 on a CPU host names the two norm fusions so (one deduplicated name): 8 MB read and 8 MB written in 64 us,
about a twentieth of the memory bandwidth, as much as the T prep kernel; jax-linear-attention's forward pays the same.
One program per (chunk of tokens, key head, row) here reads its [block, D] rows of q and of k once and writes them
normalised: a copy's traffic. The backward's gradient through the norm stays gpu_norm_grads.py's; the backward
launches this kernel again (XLA does not merge the two custom calls), as it recomputes XLA's norm otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.chunking import L2_NORM_EPS, l2_normalize
from maxtext.kernels.triton_compat import TritonParams


def _normalize_kernel(q_ref, k_ref, q_out, k_out, *, block: int, eps: float):
  t, key_head, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tokens = pl.ds(t * block, block)
  for source, target in ((q_ref, q_out), (k_ref, k_out)):
    y = l2_normalize(source[b, tokens, key_head, :].astype(jnp.float32), eps)
    target[b, tokens, key_head, :] = y.astype(target.dtype)


def l2_normalize_qk(q: jax.Array, k: jax.Array, *, block: int, dtype: jnp.dtype, interpret: bool = False,
                    eps: float = L2_NORM_EPS) -> tuple[jax.Array, jax.Array]:
  """(q, k) [B, T, Hk, D] each l2-normalised over D in float32, as chunking.l2_normalize, returned in `dtype`; block
  (a power of two) divides T (the chunk size: gpu.py pads T to whole chunks)."""
  if q.shape != k.shape:
    raise ValueError(f"l2_normalize_qk: q {q.shape} and k {k.shape} must have one shape [B, T, Hk, D]")
  batch, length, key_heads, _ = q.shape
  if length % block:
    raise ValueError(f"l2_normalize_qk: length {length} must be a multiple of the block {block}")
  out = jax.ShapeDtypeStruct(q.shape, dtype)
  return pl.pallas_call(functools.partial(_normalize_kernel, block=block, eps=eps),
                        grid=(length // block, key_heads, batch), out_shape=(out, out),
                        compiler_params=TritonParams(num_warps=4, num_stages=1), interpret=interpret,
                        name="gdr_qk_norm")(q, k)
