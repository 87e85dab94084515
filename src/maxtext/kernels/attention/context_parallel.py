"""Causal GQA attention with each sequence split over the mesh's `context` axis (context parallelism).

Each device keeps its shard of the queries and all-gathers the keys, values and segment ids of the whole sequence
(XLA turns the gathers' transposes into reduce-scatters for dK and dV). The shard's queries sit at positions
index x T / N onwards, so the causal mask is offset by that much:
  TPU: one splash kernel for the whole [T, T] causal mask, built with q_seq_shards = N; its block mask splits over
       the context axis with the queries (`manual_sharding_spec`), so each device runs only its rows' blocks and
       skips the blocks above the diagonal, as on one device.
  elsewhere: the jnp reference with the shard's offset ([T / N, T] scores per head). cuDNN's causal mask takes no
       query offset, so GPUs run the reference here too (logged once); attention=gpu or flash is refused.
Peak memory per device: the gathered K and V [B, T, Hkv, D] of one layer, besides the shard's own activations.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from maxtext import sharding
from maxtext.kernels import dispatch
from maxtext.kernels.attention.reference import dot_product_attention_reference

_logger = logging.getLogger("maxtext.kernels")
P = jax.sharding.PartitionSpec


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, segment_ids: jax.Array | None,
                          impl: str, choose_impl) -> jax.Array:
  """q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; segment_ids [B, T] or None -> [B, T, Hq, D], T split over context.

  choose_impl(impl, q, k): the dispatcher's choice for one shard's queries against the whole sequence's keys.
  """
  batch, length, num_heads, head_dim = q.shape
  if k.shape[1] != length:
    raise ValueError(f"context-parallel attention needs as many keys as queries, got {k.shape[1]} and {length}")
  mesh, spec = sharding.kernel_partition(("activation_batch", "activation_length", "activation_heads"), q.shape[:3])
  if mesh is None or spec[1] != sharding.CONTEXT_AXIS:
    raise ValueError(f"context-parallel attention: the sequence length {length} does not split over the"
                     f" {sharding.context_shards()} devices of the mesh's context axis (make it a multiple of"
                     " ici_context_parallelism x dcn_context_parallelism)")
  batch_axes, head_axes = spec[0], spec[2]
  shards = mesh.shape[sharding.CONTEXT_AXIS]
  head_shards = sharding.axes_size(mesh, head_axes)
  if k.shape[2] % head_shards:  # every shard keeps whole GQA groups: one key head per query head
    k, v = (jnp.repeat(x, num_heads // k.shape[2], axis=2) for x in (k, v))
  local_q = jax.ShapeDtypeStruct((batch, length // shards, num_heads // head_shards, head_dim), q.dtype)
  chosen = choose_impl(impl, local_q, k)
  if chosen == "gpu":
    raise ValueError("context-parallel attention has no GPU kernel (cuDNN's causal mask takes no query offset):"
                     " set attention=auto or reference")
  if chosen == "reference" and dispatch.backend() != "cpu":
    _note_reference(impl)
  per_token = P(batch_axes, sharding.CONTEXT_AXIS, head_axes, None)
  rows = P(batch_axes, sharding.CONTEXT_AXIS)
  ids = segment_ids if segment_ids is not None else jnp.zeros((batch, length), jnp.int32)
  with_ids = segment_ids is not None
  if chosen == "tpu":
    from maxtext.kernels.attention import tpu  # noqa: PLC0415 - Pallas TPU imports on demand

    interpret = dispatch.backend() == "cpu"  # tests: the Pallas interpreter
    kernel = tpu.causal_kernel(num_heads // head_shards, length, length, length // shards, interpret=interpret,
                               blocks=long_sequence_blocks(length))
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, sharding.CONTEXT_AXIS)))

    def body(q, k, v, ids, kernel):
      k, v, all_ids = _gather(k, v, ids)
      return tpu.run_kernel(kernel, q, k, v, scale=scale, q_segment_ids=ids if with_ids else None,
                            kv_segment_ids=all_ids if with_ids else None)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(per_token, per_token, per_token, rows, kernel_spec),
                           out_specs=per_token, check_vma=False)
    return mapped(q, k, v, ids, kernel)

  def reference_body(q, k, v, ids):
    k, v, all_ids = _gather(k, v, ids)
    offset = jax.lax.axis_index(sharding.CONTEXT_AXIS) * q.shape[1]
    return dot_product_attention_reference(q, k, v, scale=scale, q_segment_ids=ids if with_ids else None,
                                           kv_segment_ids=all_ids if with_ids else None, q_offset=offset)

  mapped = jax.shard_map(reference_body, mesh=mesh, in_specs=(per_token, per_token, per_token, rows),
                         out_specs=per_token, check_vma=False)
  return mapped(q, k, v, ids)


def long_sequence_blocks(length: int):
  """Splash tiles for a whole-sequence kernel: 512 up to 128K tokens, 1024 beyond. Building a kernel walks its
  block grid in numpy (11 s on a CPU for the 1024 x 1024 blocks of 1M tokens); 2048-tiles would exceed
  the splash forward's 16 MiB scoped VMEM on v5p (18.1 MiB, seen compiling the 80B step at 1M tokens)."""
  from maxtext.kernels.attention import tpu  # noqa: PLC0415 - Pallas TPU imports on demand

  tile = 512 if length <= 1 << 17 else 1024
  return tpu.SplashBlocks(block_q=tile, block_kv=tile)


def _gather(k, v, ids):
  """The whole sequence's keys, values [B, T, Hkv, D] and segment ids [B, T] from every context shard."""
  gather = functools.partial(jax.lax.all_gather, axis_name=sharding.CONTEXT_AXIS, axis=1, tiled=True)
  return gather(k), gather(v), gather(ids)


@functools.cache
def _note_reference(impl: str) -> None:
  _logger.info("attention=%s under context parallelism: using the reference on this backend", impl)

