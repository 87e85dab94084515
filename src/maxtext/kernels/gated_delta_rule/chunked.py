"""One shard of the chunked gated delta rule: the intra-chunk algebra, the inter-chunk recurrence with its vjp.

dispatch.py chooses the implementation and maps this over the mesh; benchmarks call `run_chunked` directly to
vary `ChunkOptions`. On GPU the whole op is gpu.py's Pallas-Triton kernels (three forward, four backward). On TPU
it is Pallas Mosaic kernels end to end: the intra-chunk algebra (tpu_intra_chunk.py) and the inter-chunk
recurrence (tpu.py), each with a kernel backward. impl='xla' runs chunking.py's algebra (jnp, differentiated by
JAX) around inter_chunk.py's jnp recurrence with its hand-written backward; 'tpu_jnp_algebra' the same algebra
around tpu.py's recurrence (the earlier TPU form, kept for comparisons).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp

from maxtext.kernels.gated_delta_rule import inter_chunk
from maxtext.kernels.gated_delta_rule.chunking import merge_chunks, prepare_chunks
from maxtext.kernels.gated_delta_rule.reference import _initial_state

_logger = logging.getLogger("maxtext.kernels")


@dataclasses.dataclass(frozen=True)
class ChunkOptions:
  """solve, precision: prepare_chunks' triangular solve and matmul precision, and operand_dtype: the dtype of the
  recurrence kernels' operands (impl 'xla' and 'tpu'); kernel_precision: the GPU kernels' dot precision
  (gpu_precision.py's modes; None: 'bf16' for 16-bit inputs, 'ieee' for float32).
  """

  solve: str = "solve_triangular"
  precision: Any = jax.lax.Precision.HIGHEST
  operand_dtype: Any = jnp.float32
  kernel_precision: str | None = None


def _recurrence_kernels(impl: str, interpret: bool) -> tuple[Callable, Callable]:
  """(forward, backward) of the inter-chunk recurrence for an impl, with inter_chunk.py's contract."""
  if impl == "xla":
    return inter_chunk.inter_chunk_forward, inter_chunk.inter_chunk_backward
  if impl in ("tpu", "tpu_jnp_algebra"):
    from maxtext.kernels.gated_delta_rule import tpu  # noqa: PLC0415 - Pallas imports on demand

    return (functools.partial(tpu.inter_chunk_forward_tpu, interpret=interpret),
            functools.partial(tpu.inter_chunk_backward_tpu, interpret=interpret))
  raise ValueError(f"gated_delta_rule: no inter-chunk recurrence kernels for impl '{impl}'")


@functools.cache
def _inter_chunk_with_vjp(impl: str, interpret: bool) -> Callable:
  """(q, k, w, u, intra, decay, h0) -> (out, final_state) with the impl's kernels forward and backward."""
  forward, backward = _recurrence_kernels(impl, interpret)

  @jax.custom_vjp
  def run(q, k, w, u, intra, decay, h0):
    result = forward(q, k, w, u, intra, decay, h0)
    return result.out, result.final_state

  def run_forward(q, k, w, u, intra, decay, h0):
    result = forward(q, k, w, u, intra, decay, h0)
    # Empty arrays stand for u's and h0's dtypes: residuals must be JAX values.
    dtypes = (jnp.zeros((0,), u.dtype), jnp.zeros((0,), h0.dtype))
    residuals = (q, k, w, intra, decay, result.states, result.v_new, *dtypes)
    return (result.out, result.final_state), residuals

  def run_backward(residuals, cotangents):
    q, k, w, intra, decay, states, v_new, u_like, h0_like = residuals
    d_out, d_final_state = cotangents
    grads = backward(q, k, w, intra, decay, states, v_new, d_out, d_final_state)
    return (
        grads.dq.astype(q.dtype),
        grads.dk.astype(k.dtype),
        grads.dw.astype(w.dtype),
        grads.du.astype(u_like.dtype),
        grads.dintra.astype(intra.dtype),
        grads.ddecay.astype(decay.dtype),
        grads.dh0.astype(h0_like.dtype),
    )

  run.defvjp(run_forward, run_backward)
  return run


def run_chunked(q, k, v, g, beta, initial_state, *, segment_ids, chunk_size: int, use_qk_l2norm: bool,
                scale: float | None, impl: str, interpret: bool,
                options: ChunkOptions = ChunkOptions()) -> tuple[jax.Array, jax.Array]:
  """One shard, impl 'gpu', 'tpu', 'tpu_jnp_algebra' or 'xla'; layouts in reference.py. Returns (o in v's dtype,
  final state f32)."""
  batch, length = q.shape[:2]
  state = _initial_state(initial_state, batch, v.shape[2], k.shape[-1], v.shape[-1])
  if impl == "gpu":
    from maxtext.kernels.gated_delta_rule import gpu  # noqa: PLC0415 - Pallas imports on demand

    return gpu.chunk_gated_delta_rule_gpu(
        q, k, v, g, beta, state, segment_ids=segment_ids, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm,
        scale=scale, precision=options.kernel_precision, interpret=interpret)
  if impl == "tpu" and _tpu_algebra_tiles(chunk_size):
    from maxtext.kernels.gated_delta_rule import tpu_intra_chunk  # noqa: PLC0415 - Pallas imports on demand

    chunks = tpu_intra_chunk.prepare_chunks_tpu(
        q, k, v, g, beta, segment_ids, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, scale=scale,
        interpret=interpret)
  else:
    chunks = prepare_chunks(
        q, k, v, g, beta, segment_ids, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, scale=scale,
        solve=options.solve, precision=options.precision,
    )
  cast = lambda x: x.astype(options.operand_dtype)
  chunks = chunks._replace(q=cast(chunks.q), k=cast(chunks.k), w=cast(chunks.w), u=cast(chunks.u),
                           intra=cast(chunks.intra))
  out, final_state = _inter_chunk_with_vjp(impl, interpret)(*chunks, state)
  return merge_chunks(out, length).astype(v.dtype), final_state


@functools.cache
def _tpu_algebra_tiles(chunk_size: int) -> bool:
  """Whether the Pallas intra-chunk kernels take this chunk size; says once when the jnp algebra runs instead."""
  from maxtext.kernels.gated_delta_rule import tpu_intra_chunk  # noqa: PLC0415 - Pallas imports on demand

  if tpu_intra_chunk.supports(chunk_size, 0, 0):
    return True
  _logger.info("gated_delta_rule 'tpu': chunk_size=%d is not a power of two >= 8; the intra-chunk algebra runs as "
               "jnp under XLA (the recurrence stays a Pallas kernel)", chunk_size)
  return False
