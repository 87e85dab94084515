"""Attention behind one dispatching API (flash kernels plug in here)."""

from __future__ import annotations

import jax

from maxtext.kernels import dispatch
from maxtext.kernels.attention.reference import dot_product_attention_reference

_AVAILABLE: dict[str, tuple[str, ...]] = {"cpu": ("reference",), "gpu": ("reference",), "tpu": ("reference",)}


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    segment_ids: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
  """Causal GQA attention. q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; segment_ids: [B, T] or None."""
  dispatch.choose("attention", impl, _AVAILABLE)
  return dot_product_attention_reference(q, k, v, scale=scale, q_segment_ids=segment_ids)


__all__ = ["dot_product_attention", "dot_product_attention_reference"]
