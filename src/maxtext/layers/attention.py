"""Gated full attention: q/k RMS norms, partial rotary, GQA, sigmoid output gate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from maxtext.kernels.attention import dot_product_attention
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
      out = cached_attention(query, new_cache, decode.cursor, scale=head_dim**-0.5)
    else:
      out = dot_product_attention(query, key, value, scale=head_dim**-0.5, segment_ids=segment_ids, impl=spec.impl)
      if decode is not None:
        slots = ((0, 0), (0, decode.capacity - key.shape[1]), (0, 0), (0, 0))
        new_cache = KVCache(jnp.pad(key, slots), jnp.pad(value, slots))
    out = out * jax.nn.sigmoid(gate)
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
    out = Linear((x.shape[-1],), ("heads", "head_dim", "embed"), numerics, name="o_proj")(out)
    return out if decode is None else (out, new_cache)


def cached_attention(query: jax.Array, cache: KVCache, cursor: jax.Array, *, scale: float) -> jax.Array:
  """query [B, T, Hq, D] at slots cursor..cursor+T-1 of each row; attends to cache slots <= its own. -> [B, T, Hq, D].

  Decode attention reads the whole cache once per step (T is a handful of tokens): a plain einsum is
  bandwidth-bound already, and slots past a row's cursor (stale or empty) are masked out.
  """
  batch, length, num_heads, head_dim = query.shape
  slots, num_kv_heads = cache.key.shape[1], cache.key.shape[2]
  grouped = query.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", grouped, cache.key, preferred_element_type=jnp.float32) * scale
  last_visible = cursor[:, None] + jnp.arange(length)  # [B, T]
  mask = jnp.arange(slots)[None, None, :] <= last_visible[:, :, None]  # [B, T, S]
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(cache.value.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, cache.value)
  return out.reshape(batch, length, num_heads, head_dim).astype(query.dtype)
