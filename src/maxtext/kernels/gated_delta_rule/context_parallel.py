"""The chunked gated delta rule with each sequence split over the mesh's `context` axis (context parallelism).

Per head the state update is affine in the state: the state leaving a device's shard of the sequence is
M S + B, where S is the state entering it, M [Dk, Dk] the product of the shard's decays and (I - beta k k^T)
factors, and B [Dk, Dv] the state the shard builds from zero. Every output is affine in S too:
o_t = o0_t + S^T p_t with p_t = M_{<=t}^T q_t. One call of the single-device op per device gives all of it:
the value columns are augmented with Dk zero columns, and the initial state is [0 | I], so the state's value
columns carry B (and o0), its identity columns carry M (and p). The devices all-gather (M, B), each composes the
prefix of the shards before it (a few [Dk, Dk] x [Dk, Dv] products per device), and corrects its outputs with the
state entering its shard: o = o0 + p S.

Packed documents: the single-device op takes an initial state as belonging to the first segment of its rows, and
zeroes M when a document starts inside the shard, so a document that starts inside a shard is exact already. A
document starting exactly at a shard boundary drops the incoming state: the state entering shard d is kept only
where its first segment id equals the last one of shard d - 1.

The causal conv before the rule takes its K - 1 previous inputs (and their segment ids) from the shards before it
by ppermute (`causal_conv`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from maxtext import sharding
from maxtext.kernels.gated_delta_rule.chunking import check_shapes

_HIGHEST = jax.lax.Precision.HIGHEST
P = jax.sharding.PartitionSpec


def _mapping(shape: tuple[int, ...], what: str):
  """(mesh, batch axes, head axes) for a shard_map splitting [B, T, H, ...] over batch, context and heads."""
  mesh, spec = sharding.kernel_partition(("activation_batch", "activation_length", "activation_heads"), shape[:3])
  if mesh is None or spec[1] != sharding.CONTEXT_AXIS:
    raise ValueError(f"{what}: the sequence length {shape[1]} does not split over the {sharding.context_shards()}"
                     " devices of the mesh's context axis (make it a multiple of ici_context_parallelism x"
                     " dcn_context_parallelism)")
  return mesh, spec[0], spec[2]


def chunk_gated_delta_rule(
    op: Callable,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    **op_kwargs,
) -> tuple[jax.Array, jax.Array]:
  """`op` (the single-device chunked gated delta rule, same arguments) over a sequence split on the context axis.

  Layouts as reference.py; returns (o [B, T, Hv, Dv] in v's dtype, final state [B, Hv, Dk, Dv] float32, the state
  after the whole sequence). Differentiable wherever `op` is (the combination is jnp and collectives). Key and value
  heads split by the same factor (chosen on the key heads), so each device keeps whole groups.
  """
  check_shapes(q, k, v, g, beta, initial_state, segment_ids)
  batch, length, _, key_dim = q.shape
  mesh, batch_axes, head_axes = _mapping(q.shape, "context-parallel gated delta rule")
  per_token = P(batch_axes, sharding.CONTEXT_AXIS, head_axes, None)
  per_gate = P(batch_axes, sharding.CONTEXT_AXIS, head_axes)
  per_state = P(batch_axes, head_axes, None, None)
  # shard_map maps arrays only: absent segment ids and initial state travel as zeros (the flag says which).
  ids = segment_ids if segment_ids is not None else jnp.zeros((batch, length), jnp.int32)
  h0 = initial_state
  if h0 is None:
    h0 = jnp.zeros((batch, v.shape[2], key_dim, v.shape[3]), jnp.float32)

  def body(q, k, v, g, beta, h0, ids):
    return _local(op, q, k, v, g, beta, h0, ids if segment_ids is not None else None, op_kwargs)

  mapped = jax.shard_map(
      body, mesh=mesh, check_vma=False,
      in_specs=(per_token, per_token, per_token, per_gate, per_gate, per_state, P(batch_axes, sharding.CONTEXT_AXIS)),
      out_specs=(per_token, per_state),
  )
  return mapped(q, k, v, g, beta, h0, ids)


def _local(op, q, k, v, g, beta, h0, segment_ids, op_kwargs):
  """One device's shard: its outputs and the state after the whole sequence."""
  axis = sharding.CONTEXT_AXIS
  value_dim, key_dim = v.shape[-1], k.shape[-1]
  batch, heads = v.shape[0], v.shape[2]
  # [v | 0] from the initial state [0 | I]: the value columns give (o0, B), the identity columns (p, M).
  v_aug = jnp.concatenate([v, jnp.zeros((*v.shape[:3], key_dim), v.dtype)], axis=-1)
  eye = jnp.broadcast_to(jnp.eye(key_dim, dtype=jnp.float32), (batch, heads, key_dim, key_dim))
  start = jnp.concatenate([jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32), eye], axis=-1)
  out_aug, final_aug = op(q, k, v_aug, g, beta, start, segment_ids=segment_ids, **op_kwargs)
  o0, p = out_aug[..., :value_dim], out_aug[..., value_dim:]
  local_b, local_m = final_aug[..., :value_dim], final_aug[..., value_dim:]

  gathered_m = jax.lax.all_gather(local_m, axis)  # [N, B, H, Dk, Dk]
  gathered_b = jax.lax.all_gather(local_b, axis)  # [N, B, H, Dk, Dv]
  shards = gathered_m.shape[0]
  if segment_ids is None:
    keep = jnp.ones((shards, batch), jnp.float32)
  else:
    # The state entering shard d belongs to shard d - 1's last document; it continues only if shard d starts in it.
    ends = jax.lax.all_gather(jnp.stack([segment_ids[:, 0], segment_ids[:, -1]]), axis)  # [N, 2, B]
    continues = ends[1:, 0] == ends[:-1, 1]
    keep = jnp.concatenate([jnp.ones((1, batch), bool), continues]).astype(jnp.float32)

  def enter_next(state, shard):
    m, b, keep_next = shard
    leaving = jnp.einsum("bhij,bhjv->bhiv", m, state, precision=_HIGHEST) + b
    return leaving * keep_next[:, None, None, None], state

  keep_next = jnp.concatenate([keep[1:], jnp.ones((1, batch), jnp.float32)])
  final, entering = jax.lax.scan(enter_next, h0.astype(jnp.float32), (gathered_m, gathered_b, keep_next))
  incoming = entering[jax.lax.axis_index(axis)]  # [B, H, Dk, Dv]
  correction = jnp.einsum("bthk,bhkv->bthv", p.astype(jnp.float32), incoming, precision=_HIGHEST)
  return (o0.astype(jnp.float32) + correction).astype(v.dtype), final


def causal_conv(conv: Callable, x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """`conv(x, kernel, segment_ids)` (the causal depthwise conv, [B, T, C] with kernel [K, C]) on a sequence split
  over the context axis: each device prepends the K - 1 inputs before its shard (and their segment ids, so a
  document starting at a shard boundary sees zeros), fetched from the previous shards by ppermute."""
  batch, length, channels = x.shape
  mesh, spec = sharding.kernel_partition(("activation_batch", "activation_length"), (batch, length))
  if mesh is None or spec[1] != sharding.CONTEXT_AXIS:
    raise ValueError(f"context-parallel conv: the sequence length {length} does not split over the"
                     f" {sharding.context_shards()} devices of the mesh's context axis")
  batch_axes, halo = spec[0], kernel.shape[0] - 1
  ids = segment_ids if segment_ids is not None else jnp.zeros((batch, length), jnp.int32)

  def body(x, ids, kernel):
    if halo == 0:
      return conv(x, kernel, ids if segment_ids is not None else None)
    before_x, before_ids = _previous_rows(x, halo), _previous_rows(ids, halo)
    full_ids = jnp.concatenate([before_ids, ids], axis=1) if segment_ids is not None else None
    out = conv(jnp.concatenate([before_x, x], axis=1), kernel, full_ids)
    return out[:, halo:]

  rows = P(batch_axes, sharding.CONTEXT_AXIS)
  mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(*rows, None), rows, P()), out_specs=P(*rows, None),
                         check_vma=False)
  return mapped(x, ids, kernel)


def _previous_rows(x: jax.Array, count: int) -> jax.Array:
  """The `count` rows [B, count, ...] before this device's shard, from the shards before it (zeros before the
  sequence start: the first device's halo is zero inputs, so their segment ids do not matter)."""
  axis = sharding.CONTEXT_AXIS
  shards = jax.lax.axis_size(axis)
  forward = [(i, i + 1) for i in range(shards - 1)]
  blocks, block = [], x
  while sum(b.shape[1] for b in blocks) < count:  # a shard shorter than the halo needs the one before it too
    block = jax.lax.ppermute(block, axis, forward)
    blocks.insert(0, block)
  return jnp.concatenate(blocks, axis=1)[:, -count:]
