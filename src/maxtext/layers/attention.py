"""Gated full attention: q/k RMS norms, partial rotary, GQA, sigmoid output gate."""

from __future__ import annotations

import jax
from flax import linen as nn

from maxtext.kernels.attention import dot_product_attention
from maxtext.layers.linear import Linear
from maxtext.layers.norms import RMSNorm
from maxtext.layers.rotary import apply_rotary
from maxtext.layers.specs import AttentionSpec, Numerics


class GatedAttention(nn.Module):
  spec: AttentionSpec
  eps: float = 1e-6
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(
      self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """x [B, T, E]; cos, sin [B, T, rotary_dim]; segment_ids [B, T] or None -> [B, T, E]."""
    spec, numerics = self.spec, self.numerics
    head_dim = spec.head_dim
    # q_proj emits, per head, the query followed by its output gate: [B, T, Hq, 2 * D].
    query_and_gate = Linear((spec.num_heads, 2 * head_dim), ("embed", "heads", "head_dim"), numerics, name="q_proj")(x)
    query, gate = query_and_gate[..., :head_dim], query_and_gate[..., head_dim:]
    key = Linear((spec.num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), numerics, name="k_proj")(x)
    value = Linear((spec.num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), numerics, name="v_proj")(x)
    query = RMSNorm(self.eps, numerics, name="q_norm")(query)
    key = RMSNorm(self.eps, numerics, name="k_norm")(key)
    query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
    query = nn.with_logical_constraint(query, ("activation_batch", "activation_length", "activation_heads", None))
    key = nn.with_logical_constraint(key, ("activation_batch", "activation_length", "activation_kv_heads", None))
    out = dot_product_attention(query, key, value, scale=head_dim**-0.5, segment_ids=segment_ids, impl=spec.impl)
    out = out * jax.nn.sigmoid(gate)
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
    return Linear((x.shape[-1],), ("heads", "head_dim", "embed"), numerics, name="o_proj")(out)
