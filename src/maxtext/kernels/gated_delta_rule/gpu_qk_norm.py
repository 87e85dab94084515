"""The forward's l2 norm of q and k on GPU (ChunkedLaunch.qk_norm_kernel, off): y = x (x.x + eps)^-1/2 per token
and key head, in float32, stored in the kernels' operand dtype; one launch for both tensors, each program a block of
consecutive rows of D.

Under XLA the norm is one fusion per tensor, of one token's [Hk, D] rows a program (the HLO compiled for an H200 on a
CPU host). It is at the memory's bandwidth already: on an H200 (2026-12-03, docs/benchmarks.md, thirteenth session)
at 1 x 16384, Hk 16, d 128 bf16 (q and k 67 MB each) XLA's two fusions took 0.064 ms in the op's profile (268 MB
read and written: 4.2 TB/s), and alone, timed back to back, 0.070 ms against 0.070-0.074 for this kernel at 64 to
256 rows and 4 or 8 warps (a copy x 1.5 of both: 0.086). The backward's gradient through the norm stays
gpu_norm_grads.py's; the backward launches this kernel again (XLA does not merge the two custom calls).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.chunking import L2_NORM_EPS, l2_normalize
from maxtext.kernels.triton_compat import TritonParams


def _normalize_kernel(q_ref, k_ref, q_out, k_out, *, eps: float):
  for source, target in ((q_ref, q_out), (k_ref, k_out)):
    target[...] = l2_normalize(source[...].astype(jnp.float32), eps).astype(target.dtype)


def l2_normalize_qk(q: jax.Array, k: jax.Array, *, dtype: jnp.dtype, rows: int = 128, warps: int = 4,
                    interpret: bool = False, eps: float = L2_NORM_EPS) -> tuple[jax.Array, jax.Array]:
  """(q, k) [..., D] each l2-normalised over D in float32, as chunking.l2_normalize, returned in `dtype`; each
  program normalises `rows` consecutive rows of both (fewer where the row count has fewer factors of two)."""
  if q.shape != k.shape:
    raise ValueError(f"l2_normalize_qk: q {q.shape} and k {k.shape} must have one shape [..., D]")
  dim = q.shape[-1]
  count = q.size // dim
  rows = math.gcd(count, rows)
  flat = lambda x: x.reshape(count, dim)  # a bitcast: the norm is per row, whatever the leading axes
  spec = pl.BlockSpec((rows, dim), lambda i: (i, 0))
  out = jax.ShapeDtypeStruct((count, dim), dtype)
  q_out, k_out = pl.pallas_call(functools.partial(_normalize_kernel, eps=eps), grid=(count // rows,),
                                in_specs=[spec, spec], out_specs=[spec, spec], out_shape=(out, out),
                                compiler_params=TritonParams(num_warps=warps, num_stages=1), interpret=interpret,
                                name="gdr_qk_norm")(flat(q), flat(k))
  return q_out.reshape(q.shape), k_out.reshape(k.shape)
