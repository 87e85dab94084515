"""Sparse MoE with a sigmoid-gated shared expert: softmax router, top-k, dropless grouped matmul."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from maxtext.kernels.grouped_matmul import grouped_matmul
from maxtext.layers.linear import DEFAULT_INIT_STDDEV, Linear, partitioned
from maxtext.layers.specs import MoeSpec, Numerics


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
  """`num_experts` SwiGLU MLPs applied to rows already sorted by expert."""

  num_experts: int
  hidden_dim: int
  impl: str = "auto"
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
    embed = rows.shape[-1]
    init = nn.initializers.normal(DEFAULT_INIT_STDDEV)
    weight = lambda name, shape, axes: self.param(name, partitioned(init, axes), shape, self.numerics.weight_dtype)
    gate = weight("gate_proj", (self.num_experts, embed, self.hidden_dim), ("experts", "embed", "mlp"))
    up = weight("up_proj", (self.num_experts, embed, self.hidden_dim), ("experts", "embed", "mlp"))
    down = weight("down_proj", (self.num_experts, self.hidden_dim, embed), ("experts", "mlp", "embed"))
    dtype = self.numerics.dtype
    rows = rows.astype(dtype)
    mm = lambda lhs, w: grouped_matmul(lhs, w.astype(dtype), group_sizes, impl=self.impl)
    hidden = jax.nn.silu(mm(rows, gate)) * mm(rows, up)
    return mm(hidden, down)


class SparseMoe(nn.Module):
  spec: MoeSpec
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, RouterStats]:
    """x [B, T, E] -> (y [B, T, E], routing statistics)."""
    spec, numerics = self.spec, self.numerics
    batch, length, embed = x.shape
    tokens = x.reshape(batch * length, embed)
    router_logits = Linear((spec.num_experts,), ("embed", None), numerics, name="gate")(tokens)
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_probs, top_experts = jax.lax.top_k(probs, spec.top_k)  # [N, k]
    if spec.norm_topk_prob:
      top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    top_probs = top_probs.astype(numerics.dtype)

    # Dropless dispatch: sort the N * k (token, expert) slots by expert, run each expert on its rows, scatter back.
    flat_experts = top_experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of_slot = order // spec.top_k
    group_sizes = jnp.bincount(flat_experts, length=spec.num_experts)
    expert_out = RoutedExperts(spec.num_experts, spec.expert_dim, spec.impl, numerics, name="experts")(
        tokens[token_of_slot], group_sizes
    )
    expert_out = expert_out * top_probs.reshape(-1)[order][:, None]
    routed = jnp.zeros_like(tokens, dtype=expert_out.dtype).at[token_of_slot].add(expert_out)

    shared = MLP(spec.shared_expert_dim, numerics, name="shared_expert")(tokens)
    shared_gate = Linear((1,), ("embed", None), numerics, name="shared_expert_gate")(tokens)
    out = routed + jax.nn.sigmoid(shared_gate) * shared

    stats = RouterStats(
        slot_counts=group_sizes.astype(jnp.float32),
        prob_sums=jnp.sum(probs, axis=0),
        num_tokens=jnp.asarray(batch * length, jnp.float32),
    )
    return out.reshape(batch, length, embed), stats
