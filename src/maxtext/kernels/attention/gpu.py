"""Causal GQA flash attention on NVIDIA GPUs: cuDNN's fused attention through JAX.

`jax.nn.dot_product_attention(implementation='cudnn')`, causal; with segment ids a same-segment mask is added
(checked on the device by benchmarks/attention.py). cuDNN brings its own backward; nothing here differentiates by
hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def unsupported_reason(q: jax.Array, k: jax.Array) -> str | None:
  """Why cuDNN flash attention cannot take these inputs, or None when it can."""
  if q.dtype not in CUDNN_DTYPES:
    return f"cuDNN flash attention needs bfloat16 or float16 inputs, got {q.dtype} (set dtype=bfloat16)"
  if q.shape[-1] % 8 or q.shape[-1] > 256:
    return f"cuDNN flash attention needs a head_dim that is a multiple of 8 and at most 256, got {q.shape[-1]}"
  if q.shape[1] != k.shape[1]:
    return f"cuDNN causal attention here needs as many keys as queries, got {k.shape[1]} and {q.shape[1]}"
  return None


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
  """q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] (bf16/fp16); segment_ids: [B, T] or None. Returns [B, T, Hq, D]."""
  reason = unsupported_reason(q, k)
  if reason is not None:
    raise ValueError(reason)
  # Packed documents go to cuDNN as a [B, 1, T, T] same-segment mask (one bit pattern shared by the heads).
  # cuDNN's ragged "packed" layout (q/kv offsets) was measured on an H100 to need a 542 GiB workspace for a
  # 2.5B-model train step at T=4096, because its segment count must be T in the worst case (docs/benchmarks.md).
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
  length = q.shape[1]
  # cuDNN's backward with a mask needs an even length (JAX refuses "Unsupported sequence length Q 769" otherwise;
  # RL's packed rows are prompt + response + 1 long). One trailing token pads it: under the causal mask no real
  # query sees it, so the real rows' outputs and gradients are unchanged, and its own row is sliced away.
  pad = length % 2
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
  mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation="cudnn")
  return out[:, :length]
