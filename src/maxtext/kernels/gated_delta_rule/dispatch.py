"""Choosing a gated delta rule implementation, and running it per device shard.

Each implementation registers with the backends on which impl='auto' may take it and a `supports` predicate on
the call's sizes; 'auto' takes the first entry, in registry order, that accepts both, and logs the choice once.
A name chosen explicitly runs as asked (its kernel rejects sizes it cannot take, naming them).
  chunked (training, prefill): 'gpu' (Pallas-Triton, powers-of-two sizes), 'tpu' (Pallas Mosaic), 'xla' (jnp with
  the hand-written recurrence backward), 'reference' (jnp, autodiff; the CPU path); 'tpu_jnp_algebra' (the jnp
  chunk algebra around the Pallas TPU recurrence: the earlier TPU form, never chosen by 'auto', for comparisons)
  recurrent (decode, forward only): 'gpu', 'tpu' (recurrent_kernels.py), 'reference'
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from maxtext import sharding
from maxtext.kernels import dispatch as kernel_dispatch
from maxtext.kernels.gated_delta_rule import context_parallel
from maxtext.kernels.gated_delta_rule.chunked import ChunkOptions, run_chunked
from maxtext.kernels.gated_delta_rule.chunking import check_shapes
from maxtext.kernels.gated_delta_rule.reference import (
    chunk_gated_delta_rule_reference,
    recurrent_gated_delta_rule_reference,
)

_ANY_BACKEND = ("cpu", "gpu", "tpu")


def _any_size(chunk_size: int, key_dim: int, value_dim: int) -> bool:
  del chunk_size, key_dim, value_dim
  return True


def _gpu_tileable(chunk_size: int, key_dim: int, value_dim: int) -> bool:
  """Triton tiles powers of two >= 16 only: other sizes run the jnp chunk algebra and recurrence under XLA."""
  from maxtext.kernels.gated_delta_rule import gpu  # noqa: PLC0415 - Pallas imports on demand

  return gpu.supports(chunk_size, key_dim, value_dim)


@dataclasses.dataclass(frozen=True)
class Implementation:
  """name; auto_on: the backends where impl='auto' may take it; supports(chunk_size, key_dim, value_dim)."""

  name: str
  auto_on: tuple[str, ...]
  supports: Callable[[int, int, int], bool] = _any_size


# Best first: 'auto' takes the first entry that runs on the backend and supports the sizes.
CHUNKED = (
    Implementation("gpu", ("gpu",), _gpu_tileable),
    Implementation("tpu", ("tpu",)),
    Implementation("xla", ("gpu", "tpu")),
    Implementation("tpu_jnp_algebra", ()),
    Implementation("reference", _ANY_BACKEND),
)
RECURRENT = (
    Implementation("gpu", ("gpu",)),
    Implementation("tpu", ("tpu",)),
    Implementation("reference", _ANY_BACKEND),
)


def choose(op: str, registry: tuple[Implementation, ...], impl: str, sizes: tuple[int, int, int]) -> str:
  """Resolve impl ('auto' or a registered name) for `op` on the current backend; logs the choice once."""
  if impl == "auto":
    platform = kernel_dispatch.backend()
    impl = next((entry.name for entry in registry if platform in entry.auto_on and entry.supports(*sizes)),
                "reference")
  return kernel_dispatch.choose(op, impl, {"any": tuple(entry.name for entry in registry)})


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
  if sharding.context_shards() > 1:  # the sequence is split over devices: each runs this op on its shard
    return context_parallel.chunk_gated_delta_rule(
        chunk_gated_delta_rule, q, k, v, g, beta, initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
        use_qk_l2norm=use_qk_l2norm, scale=scale, impl=impl, interpret=interpret, gpu_precision=gpu_precision)
  chosen = choose("gated_delta_rule", CHUNKED, impl, (chunk_size, k.shape[-1], v.shape[-1]))
  if chosen == "reference":
    return chunk_gated_delta_rule_reference(
        q, k, v, g, beta, initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
        use_qk_l2norm=use_qk_l2norm, scale=scale,
    )
  check_shapes(q, k, v, g, beta, initial_state, segment_ids)
  interpret = interpret or kernel_dispatch.backend() == "cpu"
  chunked = functools.partial(
      run_chunked, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, scale=scale, impl=chosen,
      interpret=interpret and chosen != "xla", options=ChunkOptions(kernel_precision=gpu_precision),
  )
  return per_shard(chunked, q, k, v, g, beta, initial_state, segment_ids)


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
  chosen = choose("recurrent_gated_delta_rule", RECURRENT, impl, (1, k.shape[-1], v.shape[-1]))
  if chosen == "reference":
    return recurrent_gated_delta_rule_reference(q, k, v, g, beta, initial_state, use_qk_l2norm=use_qk_l2norm)
  from maxtext.kernels.gated_delta_rule import recurrent_kernels  # noqa: PLC0415 - Pallas imports on demand

  kernel = {"tpu": recurrent_kernels.recurrent_gated_delta_rule_tpu,
            "gpu": recurrent_kernels.recurrent_gated_delta_rule_gpu}[chosen]
  interpret = interpret or kernel_dispatch.backend() == "cpu"
  step = lambda q, k, v, g, beta, h0, segment_ids: kernel(
      q, k, v, g, beta, h0, use_qk_l2norm=use_qk_l2norm, interpret=interpret
  )
  return per_shard(step, q, k, v, g, beta, initial_state, None)


def per_shard(kernel: Callable, q, k, v, g, beta, initial_state, segment_ids) -> tuple[jax.Array, jax.Array]:
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
