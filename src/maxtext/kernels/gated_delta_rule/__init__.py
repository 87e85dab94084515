"""Gated delta rule: chunked (training, prefill) and recurrent (decode) forms behind one dispatching API.

The chunked form is chunking.py's parallel algebra (jnp, differentiated by JAX) around the inter-chunk recurrence,
which runs as a Pallas kernel on TPU (tpu.py) and GPU (gpu.py) with a custom vjp whose backward is a kernel too.
On GPU the parallel algebra is a pair of Pallas kernels as well (gpu_chunk.py, forward and hand-written backward),
so the whole op is one custom vjp over four kernel launches each way.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from maxtext import sharding
from maxtext.kernels import dispatch
from maxtext.kernels.gated_delta_rule import inter_chunk
from maxtext.kernels.gated_delta_rule.chunking import (
    ChunkInputs,
    _to_chunks,
    check_shapes,
    l2_normalize,
    merge_chunks,
    prepare_chunks,
)
from maxtext.kernels.gated_delta_rule.reference import (
    _initial_state,
    chunk_gated_delta_rule_reference,
    recurrent_gated_delta_rule_reference,
)

# Implementations per backend, best first; 'reference' runs everywhere.
_AVAILABLE: dict[str, tuple[str, ...]] = {
    "cpu": ("reference", "xla", "tpu", "gpu"),
    "gpu": ("gpu", "xla", "reference"),
    "tpu": ("tpu", "xla", "reference"),
}
# impl -> (module, forward function, backward function) of the inter-chunk recurrence.
_KERNELS = {
    "tpu": ("maxtext.kernels.gated_delta_rule.tpu", "inter_chunk_forward_tpu", "inter_chunk_backward_tpu"),
    "gpu": ("maxtext.kernels.gated_delta_rule.gpu", "inter_chunk_forward_gpu", "inter_chunk_backward_gpu"),
}


@dataclasses.dataclass(frozen=True)
class ChunkOptions:
  """How prepare_chunks feeds the recurrence (its triangular solve and matmul precision), the dtype of the
  kernels' operands (q, k, w, u, intra) and, on GPU, the kernels' dot precision (gpu.py's `precision`).

  fused_prepare (GPU only, off by default: slower so far, see _options): the chunk algebra as gpu_chunk.py's
  kernels instead of prepare_chunks under XLA (sizes as the GPU recurrence kernels: powers of two >= 16). It follows
  kernel_precision (storage by gpu.py's rule: 16-bit in 'bf16' mode, else float32) and inverse_precision (None:
  gpu_chunk.py's default); solve, precision and operand_dtype apply to the prepare_chunks path only.
  """

  solve: str = "solve_triangular"
  precision: Any = jax.lax.Precision.HIGHEST
  operand_dtype: Any = jnp.float32
  kernel_precision: str | None = None
  fused_prepare: bool = False
  inverse_precision: str | None = None


def _options(impl: str, q: jax.Array, k: jax.Array, v: jax.Array) -> ChunkOptions:
  """The GPU path's choices (measured on an H100, see docs/benchmarks.md); the reference's everywhere else.

  With bf16 model inputs the chunk algebra's products and the kernels' dots run in TF32 on the tensor cores:
  2e-4..7e-4 max-relative against the float32 reference, where bf16 operands and dots (fla's choice, 1.4x faster
  end to end) measured 4.4e-3. float32 inputs keep IEEE float32 throughout. The explicit inverse replaces XLA's
  batched triangular solve: 4.99 instead of 8.04 ms forward at B=1, T=16384, 32 heads. The chunk algebra stays
  under XLA: gpu_chunk.py's fused kernels (fused_prepare=True) measured slower on an H100 at B=1, T=16384
  (TF32: 2.67 ms forward, 11.3 ms backward; bf16 dots: 2.03 / 6.76; XLA's prepare_chunks: 2.93 / 3.68).
  """
  if impl != "gpu":
    return ChunkOptions()
  if all(x.dtype == jnp.bfloat16 for x in (q, k, v)):
    return ChunkOptions("inverse", jax.lax.Precision.DEFAULT, jnp.float32, "tf32")
  return ChunkOptions("inverse")


@functools.cache
def _inter_chunk_with_vjp(impl: str, interpret: bool, kernel_precision: str | None = None) -> Callable:
  """(q, k, w, u, intra, decay, h0) -> (out, final_state) with the impl's kernels forward and backward."""
  if impl == "xla":
    forward, backward = inter_chunk.inter_chunk_forward, inter_chunk.inter_chunk_backward
  else:
    module_name, forward_name, backward_name = _KERNELS[impl]
    module = importlib.import_module(module_name)
    extra = {} if kernel_precision is None else {"precision": kernel_precision}  # the GPU kernels' dots
    forward = functools.partial(getattr(module, forward_name), interpret=interpret, **extra)
    backward = functools.partial(getattr(module, backward_name), interpret=interpret, **extra)

  @jax.custom_vjp
  def run(q, k, w, u, intra, decay, h0):
    result = forward(q, k, w, u, intra, decay, h0)
    return result.out, result.final_state

  def run_forward(q, k, w, u, intra, decay, h0):
    result = forward(q, k, w, u, intra, decay, h0)
    # Empty arrays stand for u's and h0's dtypes: residuals must be JAX values.
    dtypes = (jax.numpy.zeros((0,), u.dtype), jax.numpy.zeros((0,), h0.dtype))
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


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Chunked gated delta rule; layouts in reference.py. Returns (o [B, T, Hv, Dv] in v's dtype, final state f32).

  impl: 'auto' (by backend; on GPU 'xla' for chunk or head sizes Triton cannot tile), 'reference' (jnp,
  autodiff), 'xla' (jnp with the hand-written backward), 'tpu' or 'gpu' (Pallas). On a CPU, or with
  interpret=True, Pallas kernels run in interpret mode.
  """
  chosen = dispatch.choose("gated_delta_rule", impl, _AVAILABLE)
  if impl == "auto" and chosen == "gpu" and not _gpu_tileable(chunk_size, k.shape[-1], v.shape[-1]):
    # Triton tiles powers of two >= 16 only: other sizes run the jnp chunk algebra and recurrence under XLA.
    chosen = dispatch.choose("gated_delta_rule", "xla", _AVAILABLE)
  if chosen == "reference":
    return chunk_gated_delta_rule_reference(
        q, k, v, g, beta, initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
        use_qk_l2norm=use_qk_l2norm, scale=scale,
    )
  check_shapes(q, k, v, g, beta, initial_state, segment_ids)
  interpret = interpret or dispatch.backend() == "cpu"
  chunked = functools.partial(
      _chunked, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, scale=scale, impl=chosen,
      interpret=interpret and chosen != "xla", options=_options(chosen, q, k, v),
  )
  return _per_shard(chunked, q, k, v, g, beta, initial_state, segment_ids)


def _per_shard(kernel: Callable, q, k, v, g, beta, initial_state, segment_ids) -> tuple[jax.Array, jax.Array]:
  """Run `kernel(q, k, v, g, beta, initial_state, segment_ids=...)` on each device's batch rows and heads.

  Pallas calls cannot be partitioned by XLA (Mosaic requires shard_map), and the recurrence needs whole sequences:
  under an active mesh the call is mapped over the mesh axes the rules give the batch and head dimensions, never
  the length. Key and value heads split by the same factor, so each shard keeps whole groups of value heads with
  their key head. Without a mesh, or when nothing would split, the kernel runs as is.
  """
  mesh, q_spec = sharding.kernel_partition(("activation_batch", None, "activation_heads", None), q.shape)
  if mesh is None:
    return kernel(q, k, v, g, beta, initial_state, segment_ids=segment_ids)
  batch_axes, head_axes = q_spec[0], q_spec[2]
  P = jax.sharding.PartitionSpec
  per_token = P(batch_axes, None, head_axes, None)
  per_gate = P(batch_axes, None, head_axes)
  per_state = P(batch_axes, head_axes, None, None)
  # shard_map maps arrays only: absent optional inputs are closed over as None.
  optional = {"initial_state": (initial_state, per_state), "segment_ids": (segment_ids, P(batch_axes, None))}
  present = [name for name, (value, _) in optional.items() if value is not None]

  def body(q, k, v, g, beta, *extra):
    given = dict(zip(present, extra))
    return kernel(q, k, v, g, beta, given.get("initial_state"), segment_ids=given.get("segment_ids"))

  mapped = jax.shard_map(
      body, mesh=mesh, check_vma=False,
      in_specs=(per_token, per_token, per_token, per_gate, per_gate, *(optional[n][1] for n in present)),
      out_specs=(per_token, per_state),
  )
  return mapped(q, k, v, g, beta, *(optional[n][0] for n in present))


@functools.cache
def _fused_gpu_with_vjp(chunk_size: int, use_qk_l2norm: bool, scale: float | None, precision: str | None,
                        inverse_precision: str | None, interpret: bool) -> Callable:
  """(q, k, v, g, beta, h0, segment_ids) -> (o [B, T, Hv, Dv], final state): the GPU kernels end to end.

  Forward: gpu_chunk's prepare kernel -> gpu.py's recurrence; backward: gpu.py's backward -> gpu_chunk's prepare
  backward. Residuals: the raw inputs and what the recurrence's backward reads (nothing of the chunk algebra).
  """
  from maxtext.kernels.gated_delta_rule import gpu, gpu_chunk  # noqa: PLC0415 - Pallas imports on demand

  prepare = dict(chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, scale=scale, precision=precision,
                 inverse_precision=inverse_precision, interpret=interpret)
  kernels = dict(interpret=interpret, precision=precision)

  def forward(q, k, v, g, beta, h0, segment_ids):
    chunks = gpu_chunk.prepare_chunks_gpu(q, k, v, g, beta, segment_ids, **prepare)
    result = gpu.inter_chunk_forward_gpu(*chunks, h0, **kernels)
    return chunks, result, merge_chunks(result.out, q.shape[1]).astype(v.dtype)

  @jax.custom_vjp
  def run(q, k, v, g, beta, h0, segment_ids):
    _, result, out = forward(q, k, v, g, beta, h0, segment_ids)
    return out, result.final_state

  def run_forward(q, k, v, g, beta, h0, segment_ids):
    chunks, result, out = forward(q, k, v, g, beta, h0, segment_ids)
    residuals = (q, k, v, g, beta, h0, segment_ids, chunks.q, chunks.k, chunks.w, chunks.intra, chunks.decay,
                 result.states, result.v_new)
    return (out, result.final_state), residuals

  def run_backward(residuals, cotangents):
    q, k, v, g, beta, h0, segment_ids, *recurrence = residuals
    d_out, d_final_state = cotangents
    grads = gpu.inter_chunk_backward_gpu(*recurrence, _to_chunks(d_out, chunk_size), d_final_state, **kernels)
    d_chunks = grads[:6]  # dq, dk, dw, du, dintra, ddecay: ChunkInputs' order
    dq, dk, dv, dg, dbeta = gpu_chunk.prepare_chunks_gpu_backward(
        q, k, v, g, beta, segment_ids, ChunkInputs(*d_chunks), **prepare)
    return dq, dk, dv, dg, dbeta, grads.dh0.astype(h0.dtype), None

  run.defvjp(run_forward, run_backward)
  return run


def _chunked(q, k, v, g, beta, initial_state, *, segment_ids, chunk_size, use_qk_l2norm, scale, impl, interpret,
             options: ChunkOptions) -> tuple[jax.Array, jax.Array]:
  """prepare_chunks -> the impl's recurrence with its vjp -> merge_chunks (the benchmark varies `options`).

  On GPU with options.fused_prepare, the chunk algebra runs as gpu_chunk.py's kernels.
  """
  batch, length = q.shape[:2]
  state = _initial_state(initial_state, batch, v.shape[2], k.shape[-1], v.shape[-1])
  if impl == "gpu" and options.fused_prepare:
    run = _fused_gpu_with_vjp(chunk_size, use_qk_l2norm, scale, options.kernel_precision,
                              options.inverse_precision, interpret)
    return run(q, k, v, g, beta, state, segment_ids)
  chunks = prepare_chunks(
      q, k, v, g, beta, segment_ids, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, scale=scale,
      solve=options.solve, precision=options.precision,
  )
  cast = lambda x: x.astype(options.operand_dtype)
  chunks = chunks._replace(q=cast(chunks.q), k=cast(chunks.k), w=cast(chunks.w), u=cast(chunks.u),
                           intra=cast(chunks.intra))
  out, final_state = _inter_chunk_with_vjp(impl, interpret, options.kernel_precision)(*chunks, state)
  return merge_chunks(out, length).astype(v.dtype), final_state


def _gpu_tileable(chunk_size: int, key_dim: int, value_dim: int) -> bool:
  """Whether the GPU kernels (inter-chunk and fused chunk algebra alike) can tile these sizes."""
  from maxtext.kernels.gated_delta_rule import gpu_chunk  # noqa: PLC0415 - Pallas imports on demand

  return gpu_chunk.supports(chunk_size, key_dim, value_dim)


# Decode implementations per backend, best first (forward only: decoding needs no gradient).
_RECURRENT_AVAILABLE: dict[str, tuple[str, ...]] = {
    "cpu": ("reference", "tpu", "gpu"),
    "gpu": ("gpu", "reference"),
    "tpu": ("tpu", "reference"),
}


def recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    use_qk_l2norm: bool = True,
    impl: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Token-by-token gated delta rule for decoding a few tokens from a carried state; layouts in reference.py.

  impl: 'auto' (by backend), 'reference' (jnp), 'tpu' or 'gpu' (Pallas, recurrent_kernels.py); on a CPU, or with
  interpret=True, the Pallas kernels run in interpret mode.
  """
  chosen = dispatch.choose("recurrent_gated_delta_rule", impl, _RECURRENT_AVAILABLE)
  if chosen == "reference":
    return recurrent_gated_delta_rule_reference(q, k, v, g, beta, initial_state, use_qk_l2norm=use_qk_l2norm)
  from maxtext.kernels.gated_delta_rule import recurrent_kernels  # noqa: PLC0415 - Pallas imports on demand

  kernel = {"tpu": recurrent_kernels.recurrent_gated_delta_rule_tpu,
            "gpu": recurrent_kernels.recurrent_gated_delta_rule_gpu}[chosen]
  interpret = interpret or dispatch.backend() == "cpu"
  step = lambda q, k, v, g, beta, h0, segment_ids: kernel(
      q, k, v, g, beta, h0, use_qk_l2norm=use_qk_l2norm, interpret=interpret
  )
  return _per_shard(step, q, k, v, g, beta, initial_state, None)


__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_reference",
    "l2_normalize",
    "recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule_reference",
]
