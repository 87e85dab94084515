"""Gated delta rule: chunked (training, prefill) and recurrent (decode) forms behind one dispatching API.

On TPU (and for impl='xla') the chunked form is chunking.py's parallel algebra (jnp, differentiated by JAX) around
the inter-chunk recurrence, a Pallas kernel (tpu.py) with a custom vjp whose backward is a kernel too. On GPU the
whole op is Pallas-Triton kernels with a hand-written backward (gpu.py: three kernels forward, four backward).
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
}


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


@functools.cache
def _inter_chunk_with_vjp(impl: str, interpret: bool) -> Callable:
  """(q, k, w, u, intra, decay, h0) -> (out, final_state) with the impl's kernels forward and backward."""
  if impl == "xla":
    forward, backward = inter_chunk.inter_chunk_forward, inter_chunk.inter_chunk_backward
  else:
    module_name, forward_name, backward_name = _KERNELS[impl]
    module = importlib.import_module(module_name)
    forward = functools.partial(getattr(module, forward_name), interpret=interpret)
    backward = functools.partial(getattr(module, backward_name), interpret=interpret)

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
    gpu_precision: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Chunked gated delta rule; layouts in reference.py. Returns (o [B, T, Hv, Dv] in v's dtype, final state f32).

  impl: 'auto' (by backend; on GPU 'xla' for chunk or head sizes Triton cannot tile), 'reference' (jnp,
  autodiff), 'xla' (jnp with the hand-written backward), 'tpu' or 'gpu' (Pallas). On a CPU, or with
  interpret=True, Pallas kernels run in interpret mode. gpu_precision: the GPU kernels' dots (gpu_precision.py:
  None = 'bf16' for 16-bit inputs as fla, 'ieee' for float32; 'tf32' is ~10x more accurate and ~3x slower).
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
      interpret=interpret and chosen != "xla", options=ChunkOptions(kernel_precision=gpu_precision),
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


def _chunked(q, k, v, g, beta, initial_state, *, segment_ids, chunk_size, use_qk_l2norm, scale, impl, interpret,
             options: ChunkOptions) -> tuple[jax.Array, jax.Array]:
  """GPU: gpu.py's kernels end to end. Otherwise prepare_chunks -> the impl's recurrence with its vjp ->
  merge_chunks (the benchmark varies `options`)."""
  batch, length = q.shape[:2]
  state = _initial_state(initial_state, batch, v.shape[2], k.shape[-1], v.shape[-1])
  if impl == "gpu":
    from maxtext.kernels.gated_delta_rule import gpu  # noqa: PLC0415 - Pallas imports on demand

    return gpu.chunk_gated_delta_rule_gpu(
        q, k, v, g, beta, state, segment_ids=segment_ids, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm,
        scale=scale, precision=options.kernel_precision, interpret=interpret)
  chunks = prepare_chunks(
      q, k, v, g, beta, segment_ids, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, scale=scale,
      solve=options.solve, precision=options.precision,
  )
  cast = lambda x: x.astype(options.operand_dtype)
  chunks = chunks._replace(q=cast(chunks.q), k=cast(chunks.k), w=cast(chunks.w), u=cast(chunks.u),
                           intra=cast(chunks.intra))
  out, final_state = _inter_chunk_with_vjp(impl, interpret)(*chunks, state)
  return merge_chunks(out, length).astype(v.dtype), final_state


def _gpu_tileable(chunk_size: int, key_dim: int, value_dim: int) -> bool:
  """Whether the GPU kernels can tile these sizes."""
  from maxtext.kernels.gated_delta_rule import gpu  # noqa: PLC0415 - Pallas imports on demand

  return gpu.supports(chunk_size, key_dim, value_dim)


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
