"""Plain dot-product attention with GQA, causal and segment masks; softmax in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    q_offset: int | jax.Array | None = None,
) -> jax.Array:
  """q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv. Returns [B, T, Hq, D] in q's dtype.

  Query i attends to key j when j <= i + q_offset (causal; by default the queries are the last T of the S keys,
  q_offset = S - T; a context-parallel shard passes its own start, possibly traced) and, when segment ids are
  given, both lie in the same segment.
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  q_grouped = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", q_grouped, k, preferred_element_type=jnp.float32) * scale
  mask = jnp.ones((q_len, kv_len), bool)
  if causal:
    offset = kv_len - q_len if q_offset is None else q_offset
    mask = jnp.arange(q_len)[:, None] + offset >= jnp.arange(kv_len)[None, :]
  mask = mask[None, None, None]
  if q_segment_ids is not None:
    kv_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    same = q_segment_ids[:, :, None] == kv_ids[:, None, :]
    mask = mask & same[:, None, None]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
  return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
