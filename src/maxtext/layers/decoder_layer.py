"""One decoder layer: x += mixer(norm(x)); x += moe(norm(x)), the mixer being Gated DeltaNet or attention."""

from __future__ import annotations

import jax
from flax import linen as nn

from maxtext.layers.attention import GatedAttention
from maxtext.layers.gated_delta_net import GatedDeltaNet
from maxtext.layers.moe import RouterStats, SparseMoe
from maxtext.layers.norms import RMSNorm
from maxtext.layers.specs import AttentionSpec, GatedDeltaNetSpec, MoeSpec, Numerics

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"


class DecoderLayer(nn.Module):
  layer_type: str  # LINEAR_ATTENTION or FULL_ATTENTION
  attention: AttentionSpec
  gated_delta_net: GatedDeltaNetSpec
  moe: MoeSpec
  eps: float = 1e-6
  numerics: Numerics = Numerics()

  @nn.compact
  def __call__(
      self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, RouterStats]:
    residual_axes = ("activation_batch", "activation_length", "activation_embed")
    x = nn.with_logical_constraint(x, residual_axes)
    h = RMSNorm(self.eps, self.numerics, name="input_layernorm")(x)
    if self.layer_type == LINEAR_ATTENTION:
      h = GatedDeltaNet(self.gated_delta_net, self.eps, self.numerics, name="linear_attn")(h, segment_ids)
    elif self.layer_type == FULL_ATTENTION:
      h = GatedAttention(self.attention, self.eps, self.numerics, name="self_attn")(h, cos, sin, segment_ids)
    else:
      raise ValueError(f"unknown layer_type '{self.layer_type}'")
    x = x + h.astype(x.dtype)
    h = RMSNorm(self.eps, self.numerics, name="post_attention_layernorm")(x)
    h, stats = SparseMoe(self.moe, self.numerics, name="mlp")(h)
    x = x + h.astype(x.dtype)
    return nn.with_logical_constraint(x, residual_axes), stats
