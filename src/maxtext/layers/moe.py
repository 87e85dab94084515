"""Sparse MoE with a sigmoid-gated shared expert: float32 softmax router, top-k, and one of two expert paths.

- sparse_matmul (dropless, MaxText's default): sort the N * k routed slots by expert, run the experts as grouped
  matmuls (kernels/grouped_matmul), unsort and combine. Under a mesh this runs inside shard_map on each device's
  tokens; with an `expert` mesh axis > 1 the experts are split over it and the sorted rows travel to their
  expert's device and back with two all_to_alls (expert parallelism).
- token dropping (sparse_matmul=false): each expert takes at most `capacity` slots per sequence, earlier tokens
  first (MaxText's semantics); dispatch and combine are dense einsums over a [B, T, E, capacity] mask.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from maxtext.kernels.grouped_matmul import grouped_matmul
from maxtext.layers.linear import DEFAULT_INIT_STDDEV, Linear, partitioned
from maxtext.layers.specs import MoeSpec, Numerics

BATCH_MESH_AXES = ("data", "fsdp", "expert")  # the mesh axes `activation_batch` splits tokens over (RULES)
LENGTH_MESH_AXIS = "context"  # the axis `activation_length` splits each row over (context parallelism)
EXPERT_MESH_AXIS = "expert"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RouterStats:
  """Per-layer routing statistics; summed over layers they give the load-balancing loss."""

  slot_counts: jax.Array  # [E] top-k slots routed to each expert
  prob_sums: jax.Array  # [E] router probability mass per expert, summed over tokens
  num_tokens: jax.Array  # [] tokens routed

  def __add__(self, other: "RouterStats") -> "RouterStats":
    return jax.tree.map(jnp.add, self, other)


def load_balancing_loss(stats: RouterStats, num_experts: int) -> jax.Array:
  """Switch-style aux loss over all MoE layers: E * sum_e (slots of e / tokens) * (mean prob of e)."""
  tokens = jnp.maximum(stats.num_tokens, 1.0)
  return num_experts * jnp.sum((stats.slot_counts / tokens) * (stats.prob_sums / tokens))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExpertWeights:
  gate: jax.Array  # [E, D, H]
  up: jax.Array  # [E, D, H]
  down: jax.Array  # [E, H, D]


class MLP(nn.Module):
  """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

  hidden_dim: int
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gate = Linear((self.hidden_dim,), ("embed", "mlp"), self.numerics, name="gate_proj")(x)
    up = Linear((self.hidden_dim,), ("embed", "mlp"), self.numerics, name="up_proj")(x)
    return Linear((x.shape[-1],), ("mlp", "embed"), self.numerics, name="down_proj")(jax.nn.silu(gate) * up)


class RoutedExperts(nn.Module):
  """The `num_experts` SwiGLU experts' stacked weights, in the compute dtype."""

  num_experts: int
  hidden_dim: int
  embed_dim: int
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self) -> ExpertWeights:
    init = nn.initializers.normal(DEFAULT_INIT_STDDEV)
    e, d, h = self.num_experts, self.embed_dim, self.hidden_dim
    weight = lambda name, shape, axes: self.param(
        name, partitioned(init, axes), shape, self.numerics.weight_dtype).astype(self.numerics.dtype)
    return ExpertWeights(
        gate=weight("gate_proj", (e, d, h), ("experts", "embed", "mlp")),
        up=weight("up_proj", (e, d, h), ("experts", "embed", "mlp")),
        down=weight("down_proj", (e, h, d), ("experts", "mlp", "embed")),
    )


# ------------------------------------------------------------------------------------------------ dropless


def grouped_experts(rows: jax.Array, group_sizes: jax.Array, w: ExpertWeights, impl: str,
                    megablox: bool) -> jax.Array:
  """rows [M, D] sorted by expert -> [M, D]; rows past sum(group_sizes) come out as zeros."""
  mm = lambda lhs, rhs: grouped_matmul(lhs, rhs, group_sizes, impl=impl, megablox=megablox)
  return mm(jax.nn.silu(mm(rows, w.gate)) * mm(rows, w.up), w.down)


def _group_sizes(expert_ids: jax.Array, num_experts: int) -> jax.Array:
  """Rows per expert; ids >= num_experts (padding) are not counted."""
  return jnp.zeros((num_experts,), jnp.int32).at[expert_ids].add(1, mode="drop")


def _inverse(order: jax.Array) -> jax.Array:
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


@jax.custom_vjp
def permute_rows(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
  """x[order] for a permutation `order` with inverse `inverse`.

  Autodiff would take the gradient of a gather as a scatter-add (it cannot know the indices never repeat); for
  a permutation it is the gather by the inverse, several times faster on GPU at MoE sizes.
  """
  return x[order]


def _permute_rows_forward(x, order, inverse):
  return x[order], (order, inverse)


def _permute_rows_backward(residuals, d_out):
  order, inverse = residuals
  no_index_grad = lambda i: np.zeros(i.shape, jax.dtypes.float0)
  return d_out[inverse], no_index_grad(order), no_index_grad(inverse)


permute_rows.defvjp(_permute_rows_forward, _permute_rows_backward)


def dropless_local(tokens, top_probs, top_experts, w: ExpertWeights, impl: str, megablox: bool) -> jax.Array:
  """tokens [N, D], top-k routing [N, k] -> routed output [N, D], every expert on this device."""
  k = top_experts.shape[1]
  flat = top_experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # slots sorted by expert
  inverse = _inverse(order)
  # Slot i holds token i // k: the k copies' gradients add up through the repeat (a reshape-sum), not a scatter.
  rows = permute_rows(jnp.repeat(tokens, k, axis=0), order, inverse)
  out = grouped_experts(rows, _group_sizes(flat, w.gate.shape[0]), w, impl, megablox)
  return _combine(permute_rows(out, inverse, order), top_probs)


@jax.custom_vjp
def _combine(slot_out: jax.Array, top_probs: jax.Array) -> jax.Array:
  """slot outputs [N * k, D] in token-major order -> sum over each token's k slots weighted by its probs.

  The weighting runs in float32. The backward is autodiff's own arithmetic, written out so that the residual is
  slot_out in its own dtype: autodiff kept the float32 upcast [N, k, D] for d top_probs (at N = 4096, k = 8,
  D = 2048 that is 268 MB a layer, and scanned layers stack it over blocks and transpose it, profiled on an H200).
  """
  return _combine_forward(slot_out, top_probs)[0]


def _combine_forward(slot_out, top_probs):
  n, k = top_probs.shape
  weighted = slot_out.reshape(n, k, -1).astype(jnp.float32) * top_probs[..., None].astype(jnp.float32)
  return jnp.sum(weighted, axis=1).astype(slot_out.dtype), (slot_out, top_probs)


def _combine_backward(residuals, d_out):
  slot_out, top_probs = residuals
  n, k = top_probs.shape
  d_weighted = jnp.broadcast_to(d_out.astype(jnp.float32)[:, None, :], (n, k, d_out.shape[-1]))  # [N, k, D]
  d_slot = (d_weighted * top_probs[..., None].astype(jnp.float32)).astype(slot_out.dtype).reshape(slot_out.shape)
  d_probs = jnp.sum(d_weighted * slot_out.reshape(n, k, -1).astype(jnp.float32), axis=-1).astype(top_probs.dtype)
  return d_slot, d_probs


_combine.defvjp(_combine_forward, _combine_backward)


def dropless_expert_parallel(tokens, top_probs, top_experts, w: ExpertWeights, impl: str, megablox: bool,
                             axis: str) -> jax.Array:
  """One device's share inside shard_map: its tokens [n, D], its experts w [E / P, ...] of P on `axis`.

  Slots sorted by expert go to the device holding their expert in fixed [P, n * k] buffers (n * k rows fit any
  routing, so nothing drops); the receiver re-sorts them by its local expert, runs the grouped matmuls, and an
  all_to_all brings the results home. Padding rows carry the id E / P: they form the grouped matmul's tail.
  """
  shards = jax.lax.axis_size(axis)
  local_experts = w.gate.shape[0]
  n, k = top_experts.shape
  slots = n * k
  flat = top_experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sorted_experts = flat[order]
  dest = sorted_experts // local_experts  # [n k] the device of each sorted slot
  per_dest = _group_sizes(dest, shards)
  slot_in_dest = jnp.arange(slots) - (jnp.cumsum(per_dest) - per_dest)[dest]
  send = jnp.zeros((shards, slots, tokens.shape[-1]), tokens.dtype).at[dest, slot_in_dest].set(tokens[order // k])
  send_ids = jnp.full((shards, slots), local_experts, jnp.int32).at[dest, slot_in_dest].set(
      sorted_experts % local_experts)
  exchange = lambda x: jax.lax.all_to_all(x, axis, 0, 0, tiled=True)
  received, received_ids = exchange(send).reshape(shards * slots, -1), exchange(send_ids).reshape(-1)
  local_order = jnp.argsort(received_ids, stable=True)
  local_out = grouped_experts(received[local_order], _group_sizes(received_ids, local_experts), w, impl, megablox)
  returned = exchange(local_out[_inverse(local_order)].reshape(shards, slots, -1))
  return _combine(returned[dest, slot_in_dest][_inverse(order)], top_probs)


def _token_mesh_axes(mesh, batch: int, length: int, num_experts: int
                     ) -> tuple[tuple[str, ...], str | None, str | None]:
  """(mesh axes splitting the rows, the axis splitting each row or None, the expert-parallel axis or None) for
  shard_map on `mesh`, tokens [B, T].

  Axes of size 1 are left out; the expert axis shards experts only when it divides both rows and experts, and
  is otherwise left replicated (each device then holds every expert: correct, not fast).
  """
  axes, product = [], 1
  for name in BATCH_MESH_AXES:
    size = mesh.shape.get(name, 1)
    if size == 1 or batch % (product * size):
      continue
    if name == EXPERT_MESH_AXIS and num_experts % size:
      continue
    axes.append(name)
    product *= size
  context = mesh.shape.get(LENGTH_MESH_AXIS, 1)
  length_axis = LENGTH_MESH_AXIS if context > 1 and length % context == 0 else None
  return tuple(axes), length_axis, (EXPERT_MESH_AXIS if EXPERT_MESH_AXIS in axes else None)


def dropless(tokens, top_probs, top_experts, w: ExpertWeights, impl: str, megablox: bool) -> jax.Array:
  """The sparse_matmul path on tokens [B, T, D] (top_probs, top_experts [B, T, k]) -> [B, T, D]; per device inside
  shard_map when a mesh is active (kernels cannot be partitioned), each device taking its rows and, under context
  parallelism, its part of each row."""
  batch, length, embed = tokens.shape
  flat = lambda x: x.reshape(-1, x.shape[-1])
  mesh = jax.sharding.get_abstract_mesh()
  token_axes, length_axis, expert_axis = (), None, None
  if not mesh.empty:
    token_axes, length_axis, expert_axis = _token_mesh_axes(mesh, batch, length, w.gate.shape[0])
  if not token_axes and length_axis is None:
    return dropless_local(flat(tokens), flat(top_probs), flat(top_experts), w, impl, megablox).reshape(tokens.shape)

  def per_device(tokens, top_probs, top_experts, w):
    args = (flat(tokens), flat(top_probs), flat(top_experts), w, impl, megablox)
    if expert_axis is None:
      out = dropless_local(*args)
    else:
      out = dropless_expert_parallel(*args, expert_axis)
    return out.reshape(*tokens.shape[:2], embed)

  rows = P(token_axes or None, length_axis)
  weights = jax.tree.map(lambda _: P(expert_axis), w)
  # check_vma off: Pallas interpret mode (CPU tests) gives its scratch values no varying mesh axes.
  return jax.shard_map(per_device, mesh=mesh, in_specs=(rows, rows, rows, weights), out_specs=rows,
                       check_vma=False)(tokens, top_probs, top_experts, w)


# ------------------------------------------------------------------------------------------- token dropping


def expert_capacity(tokens_per_sequence: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots each expert takes per sequence: ceil(T * k / E * capacity_factor); <= 0 means T (nothing drops)."""
  if capacity_factor <= 0:
    return tokens_per_sequence
  return max(1, math.ceil(tokens_per_sequence * top_k / num_experts * capacity_factor))


def buffer_places(top_experts: jax.Array, num_experts: int, capacity: int) -> jax.Array:
  """top_experts [B, T, k] -> each slot's place in its expert's buffer [B, T, k], or -1 where it is dropped.

  Places are given in token order, then top-k order within a token: earlier tokens win; a slot whose place would
  be >= capacity is dropped.
  """
  b, t, k = top_experts.shape
  one_hot = jax.nn.one_hot(top_experts.reshape(b, t * k), num_experts, dtype=jnp.int32)  # [B, T k, E]
  place = jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=-1).reshape(b, t, k)
  return jnp.where(place < capacity, place, -1)


def token_dropping(x, top_probs, top_experts, w: ExpertWeights, capacity_factor: float) -> jax.Array:
  """x [B, T, D], routing [B, T, k] -> [B, T, D] through per-expert buffers [B, E, capacity, D]."""
  b, t, _ = x.shape
  num_experts = w.gate.shape[0]
  capacity = expert_capacity(t, top_experts.shape[-1], num_experts, capacity_factor)
  places = buffer_places(top_experts, num_experts, capacity)
  # Column e * C + place of a flattened [E * C] buffer axis; dropped slots point past it and vanish in one_hot.
  columns = jnp.where(places >= 0, top_experts * capacity + places, num_experts * capacity)
  dispatch = combine = jnp.zeros((b, t, num_experts * capacity), jnp.float32)
  for j in range(top_experts.shape[-1]):  # k one-hots summed: never a [B, T, k, E, C] tensor
    slot = jax.nn.one_hot(columns[..., j], num_experts * capacity, dtype=jnp.float32)
    dispatch += slot
    combine += slot * top_probs[..., j:j + 1].astype(jnp.float32)
  dispatch = dispatch.reshape(b, t, num_experts, capacity).astype(x.dtype)
  combine = combine.reshape(b, t, num_experts, capacity).astype(x.dtype)
  buffers = jnp.einsum("btec,btd->becd", dispatch, x)
  hidden = jax.nn.silu(jnp.einsum("becd,edh->bech", buffers, w.gate)) * jnp.einsum("becd,edh->bech", buffers, w.up)
  out = jnp.einsum("bech,ehd->becd", hidden, w.down)
  return jnp.einsum("btec,becd->btd", combine, out)


# ---------------------------------------------------------------------------------------------------- layer


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """-> (probs [..., E] float32, top-k probs [..., k] float32, top-k experts [..., k])."""
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  top_probs, top_experts = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
  return probs, top_probs, top_experts


class SparseMoe(nn.Module):
  spec: MoeSpec
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, RouterStats]:
    """x [B, T, D] -> (y [B, T, D], routing statistics)."""
    spec, numerics = self.spec, self.numerics
    batch, length, embed = x.shape
    tokens = x.reshape(batch * length, embed)
    router_logits = Linear((spec.num_experts,), ("embed", None), numerics, name="gate")(tokens)
    probs, top_probs, top_experts = route(router_logits, spec.top_k, spec.norm_topk_prob)
    weights = RoutedExperts(spec.num_experts, spec.expert_dim, embed, numerics, name="experts")()
    if spec.sparse_matmul:
      per_row = lambda t: t.reshape(batch, length, -1)  # the rows split as x does (batch, and context)
      routed = dropless(x.astype(numerics.dtype), per_row(top_probs), per_row(top_experts), weights, spec.impl,
                        spec.megablox).reshape(tokens.shape)
    else:
      shape = (batch, length, spec.top_k)
      routed = token_dropping(x.astype(numerics.dtype), top_probs.reshape(shape), top_experts.reshape(shape),
                              weights, spec.capacity_factor).reshape(tokens.shape)

    shared = MLP(spec.shared_expert_dim, numerics, name="shared_expert")(tokens)
    shared_gate = Linear((1,), ("embed", None), numerics, name="shared_expert_gate")(tokens)
    out = routed + jax.nn.sigmoid(shared_gate) * shared

    stats = RouterStats(
        slot_counts=_group_sizes(top_experts.reshape(-1), spec.num_experts).astype(jnp.float32),
        prob_sums=jnp.sum(probs, axis=0),
        num_tokens=jnp.asarray(batch * length, jnp.float32),
    )
    return out.reshape(batch, length, embed), stats
