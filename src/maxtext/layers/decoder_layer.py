"""One decoder layer: x += mixer(norm(x)); x += moe(norm(x)), the mixer being Gated DeltaNet or attention."""

from __future__ import annotations

import jax
from flax import linen as nn

from maxtext.layers.attention import GatedAttention
from maxtext.layers.decode_cache import DecodeContext, GdnCache, KVCache
from maxtext.layers.gated_delta_net import GatedDeltaNet
from maxtext.layers.moe import SparseMoe
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
      self,
      x: jax.Array,
      cos: jax.Array,
      sin: jax.Array,
      segment_ids: jax.Array | None = None,
      cache: KVCache | GdnCache | None = None,
      decode: DecodeContext | None = None,
  ):
    """-> (x, router stats); with `decode` -> (x, router stats, the mixer's new cache)."""
    residual_axes = ("activation_batch", "activation_length", "activation_embed")
    x = nn.with_logical_constraint(x, residual_axes)
    h = RMSNorm(self.eps, self.numerics, name="input_layernorm")(x)
    if self.layer_type == LINEAR_ATTENTION:
      mixer = GatedDeltaNet(self.gated_delta_net, self.eps, self.numerics, name="linear_attn")
      h = mixer(h, segment_ids) if decode is None else mixer(h, None, cache, decode)
    elif self.layer_type == FULL_ATTENTION:
      mixer = GatedAttention(self.attention, self.eps, self.numerics, name="self_attn")
      h = mixer(h, cos, sin, segment_ids) if decode is None else mixer(h, cos, sin, None, cache, decode)
    else:
      raise ValueError(f"unknown layer_type '{self.layer_type}'")
    new_cache = None
    if decode is not None:
      h, new_cache = h
    x = x + h.astype(x.dtype)
    h = RMSNorm(self.eps, self.numerics, name="post_attention_layernorm")(x)
    h, stats = SparseMoe(self.moe, self.numerics, name="mlp")(h)
    x = x + h.astype(x.dtype)
    x = nn.with_logical_constraint(x, residual_axes)
    return (x, stats) if decode is None else (x, stats, new_cache)
