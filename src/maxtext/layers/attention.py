"""Gated full attention: q/k RMS norms, partial rotary, GQA, sigmoid output gate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from maxtext.kernels.attention import cached_attention, dot_product_attention
from maxtext.layers.decode_cache import DecodeContext, KVCache, write_rows
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
      self,
      x: jax.Array,
      cos: jax.Array,
      sin: jax.Array,
      segment_ids: jax.Array | None = None,
      cache: KVCache | None = None,
      decode: DecodeContext | None = None,
  ):
    """x [B, T, E]; cos, sin [B, T, rotary_dim]; segment_ids [B, T] or None -> [B, T, E].

    With `decode`, returns ([B, T, E], the new KVCache): a prefill (decode.capacity > 0) attends within x and
    returns its keys and values padded to `capacity` slots; a step writes its T keys and values at the rows'
    cursors and attends to the cache.
    """
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
    new_cache = None
    if decode is not None and not decode.is_prefill:
      new_cache = KVCache(write_rows(cache.key, key, decode.cursor), write_rows(cache.value, value, decode.cursor))
      # attention=reference forces the reference here too; any other choice lets the dispatcher pick per backend.
      impl = "reference" if spec.impl == "reference" else "auto"
      out = cached_attention(query, new_cache.key, new_cache.value, decode.cursor, scale=head_dim**-0.5, impl=impl)
    else:
      out = dot_product_attention(query, key, value, scale=head_dim**-0.5, segment_ids=segment_ids, impl=spec.impl)
      if decode is not None:
        slots = ((0, 0), (0, decode.capacity - key.shape[1]), (0, 0), (0, 0))
        new_cache = KVCache(jnp.pad(key, slots), jnp.pad(value, slots))
    out = out * jax.nn.sigmoid(gate)
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
    out = Linear((x.shape[-1],), ("heads", "head_dim", "embed"), numerics, name="o_proj")(out)
    return out if decode is None else (out, new_cache)

