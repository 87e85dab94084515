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


# A call of more tokens than this attends to the cache block by block (a chunked prefill), never all slots at once.
_BLOCKWISE_MIN_TOKENS = 16
_KV_BLOCK = 512


def cached_attention(query: jax.Array, cache: KVCache, cursor: jax.Array, *, scale: float) -> jax.Array:
  """query [B, T, Hq, D] at slots cursor..cursor+T-1 of each row; attends to cache slots <= its own. -> [B, T, Hq, D].

  Decode attention reads the whole cache once per step (T is a handful of tokens): a plain einsum is
  bandwidth-bound already, and slots past a row's cursor (stale or empty) are masked out. A long T (a prefill
  chunk) goes block by block over the slots with an online softmax, so memory grows with T x block, not T x slots.
  """
  if query.shape[1] >= _BLOCKWISE_MIN_TOKENS and cache.key.shape[1] > _KV_BLOCK:
    return _blockwise_cached_attention(query, cache, cursor, scale=scale, block=_KV_BLOCK)
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


def _blockwise_cached_attention(query: jax.Array, cache: KVCache, cursor: jax.Array, *, scale: float,
                                block: int) -> jax.Array:
  """cached_attention over `block` slots at a time (flash-style running max and sum, float32), stopping after the
  last block any row can see. The last block is taken flush with the cache's end; slots an earlier block covered
  are masked out there, so any cache length works."""
  batch, length, num_heads, head_dim = query.shape
  slots, num_kv_heads = cache.key.shape[1], cache.key.shape[2]
  groups = num_heads // num_kv_heads
  grouped = query.reshape(batch, length, num_kv_heads, groups, head_dim)
  last_visible = cursor[:, None] + jnp.arange(length)  # [B, T]
  num_blocks = (jnp.max(last_visible) + block) // block  # blocks holding any visible slot

  def body(j, carry):
    running_max, running_sum, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, D] float32
    start = jnp.minimum(j * block, slots - block)
    key = jax.lax.dynamic_slice_in_dim(cache.key, start, block, axis=1)
    value = jax.lax.dynamic_slice_in_dim(cache.value, start, block, axis=1)
    logits = jnp.einsum("btkgd,bskd->bkgts", grouped, key, preferred_element_type=jnp.float32) * scale
    slot = start + jnp.arange(block)
    visible = (slot[None, None, :] >= j * block) & (slot[None, None, :] <= last_visible[:, :, None])  # [B, T, S]
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # a row with nothing visible yet adds nothing
    weights = jnp.exp(logits - safe_max[..., None])
    correction = jnp.exp(running_max - safe_max)
    running_sum = running_sum * correction + jnp.sum(weights, axis=-1)
    update = jnp.einsum("bkgts,bskd->bkgtd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    return new_max, running_sum, acc * correction[..., None] + update

  stats_shape = (batch, num_kv_heads, groups, length)
  init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
          jnp.zeros(stats_shape + (head_dim,), jnp.float32))
  _, running_sum, acc = jax.lax.fori_loop(0, num_blocks, body, init)
  out = acc / running_sum[..., None]  # every query sees at least its own slot
  out = jnp.moveaxis(out, 3, 1)  # [B, T, K, G, D]
  return out.reshape(batch, length, num_heads, head_dim).astype(query.dtype)
