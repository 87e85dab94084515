"""Grouped matmul for MoE experts: rows sorted by expert, each multiplied by its expert's matrix.

One public function, `grouped_matmul`, differentiable, choosing an implementation per backend:
  reference  jax.lax.ragged_dot, differentiated by JAX (the CPU path; on a GPU XLA lowers it to a dense masked
             product, fine for small shapes only)
  gpu        our Pallas Triton kernels (gpu.py); interpret mode on a CPU, for tests
  tokamax    tokamax's ragged dot (optional dependency, jax >= 0.11.1)
  megablox   megablox's Pallas Mosaic TPU kernels (tpu.py); interpret mode on a CPU, for tests
The kernel implementations share one custom vjp: d_lhs = gmm(d_out, rhs transposed) and d_rhs = tgmm(lhs, d_out)
(the per-group transposed product). Layouts in reference.py.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from maxtext.kernels import dispatch
from maxtext.kernels.grouped_matmul import tokamax_gpu
from maxtext.kernels.grouped_matmul.reference import gmm_reference, grouped_matmul_reference, tgmm_reference

# Implementations per backend, best first ('tokamax' joins the GPU list where it is installed). On the GPU our
# kernel leads until benchmarks/moe.py measures tokamax faster at Qwen3-Next's shapes.
_AVAILABLE: dict[str, tuple[str, ...]] = {
    "cpu": ("reference", "gpu", "megablox", "tokamax"),
    "gpu": ("gpu", "tokamax", "reference"),
    "tpu": ("megablox", "tokamax", "reference"),
}
# MaxText's `megablox=false` on TPU: jax.lax.ragged_dot (XLA's own TPU lowering) instead of megablox.
_AVAILABLE_NO_MEGABLOX = {**_AVAILABLE, "tpu": ("reference", "megablox", "tokamax")}


def _kernels(impl: str) -> tuple[Callable, Callable]:
  """(gmm, tgmm) of a kernel implementation."""
  if impl == "gpu":
    from maxtext.kernels.grouped_matmul import gpu  # noqa: PLC0415 - Pallas imports on demand

    return gpu.gmm_gpu, gpu.tgmm_gpu
  if impl == "megablox":
    from maxtext.kernels.grouped_matmul import tpu  # noqa: PLC0415

    return tpu.gmm_tpu, tpu.tgmm_tpu
  if impl == "tokamax":
    if not tokamax_gpu.available():
      raise ValueError("grouped_matmul implementation 'tokamax' needs the tokamax package (pip install tokamax; "
                       "jax >= 0.11.1)")
    return tokamax_gpu.gmm_tokamax, tokamax_gpu.tgmm_tokamax
  raise ValueError(f"grouped_matmul: no kernel implementation '{impl}'")


@functools.cache
def _with_vjp(impl: str, interpret: bool) -> Callable:
  """(lhs, rhs, group_sizes) -> out with the impl's gmm forward and gmm / tgmm backward."""
  gmm, tgmm = _kernels(impl)
  gmm = functools.partial(gmm, interpret=interpret)
  tgmm = functools.partial(tgmm, interpret=interpret)

  @jax.custom_vjp
  def run(lhs, rhs, group_sizes):
    return gmm(lhs, rhs, group_sizes)

  def run_forward(lhs, rhs, group_sizes):
    return gmm(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

  def run_backward(residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_lhs = gmm(d_out, rhs, group_sizes, transpose_rhs=True, out_dtype=lhs.dtype)
    d_rhs = tgmm(lhs, d_out, group_sizes, num_groups=rhs.shape[0], out_dtype=rhs.dtype)
    return d_lhs, d_rhs, None

  run.defvjp(run_forward, run_backward)
  return run


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
                   megablox: bool = True, interpret: bool = False) -> jax.Array:
  """lhs [M, K] rows sorted by group, rhs [G, K, N], group_sizes [G] int (sum <= M) -> [M, N] in lhs's dtype.

  Rows past sum(group_sizes) come out as zeros, and a group with no rows gets a zero weight gradient.
  impl: 'auto' (by backend), 'reference', 'gpu', 'tokamax' or 'megablox'; megablox=False makes 'auto' on a TPU
  take XLA's ragged_dot (MaxText's flag). On a CPU, or with interpret=True, Pallas kernels run in interpret mode.
  """
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != rhs.shape[:1] or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"grouped_matmul: expected lhs [M, K], rhs [G, K, N], group_sizes [G]; got {lhs.shape}, "
                     f"{rhs.shape}, {group_sizes.shape}")
  chosen = dispatch.choose("grouped_matmul", impl, _AVAILABLE if megablox else _AVAILABLE_NO_MEGABLOX)
  rhs = rhs.astype(lhs.dtype)
  if chosen == "reference":
    return grouped_matmul_reference(lhs, rhs, group_sizes)
  interpret = interpret or (dispatch.backend() == "cpu" and chosen != "tokamax")
  return _with_vjp(chosen, interpret)(lhs, rhs, group_sizes)


__all__ = ["gmm_reference", "grouped_matmul", "grouped_matmul_reference", "tgmm_reference"]
