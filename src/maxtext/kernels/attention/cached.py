"""Attention of new tokens to a KV cache (decode steps and chunks of a long prefill) behind one dispatching API.

query [B, T, Hq, D] sits at cache slots cursor[b]..cursor[b]+T-1 of row b and attends to the slots s <= its own;
key, value [B, S, Hkv, D] (slots past a row's cursor + T are stale or empty and never seen).

impl:
  'auto'      on a GPU, the Pallas-Triton flash kernel (gpu_cached.py) for a chunk of >= MIN_KERNEL_TOKENS tokens
              when it takes the shapes; the reference otherwise (CPU, TPU, decode steps of a few tokens);
  'reference' the jnp reference below: one einsum over all slots for a few tokens (a decode step reads the whole
              cache once: bandwidth-bound already), block by block with an online softmax for a longer T;
  'gpu'       the flash kernel, an error when it cannot take the shapes (on a CPU it runs in the Pallas
              interpreter: tests).
Under an active mesh the kernel runs per device shard inside shard_map (batch rows and whole GQA groups).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from maxtext.kernels import dispatch
from maxtext.kernels.attention import shards

_logger = logging.getLogger("maxtext.kernels")
_AVAILABLE: dict[str, tuple[str, ...]] = {"cpu": ("reference", "gpu"), "gpu": ("gpu", "reference"),
                                          "tpu": ("reference",)}
IMPLS = ("auto", "reference", "gpu")
# Fewer new tokens than this is a decode step (or a short speculative verification): the reference's einsum.
MIN_KERNEL_TOKENS = 16
# The reference attends to the cache block by block (a chunked prefill) when T >= MIN_KERNEL_TOKENS and the cache
# is longer than this many slots, never to all slots at once.
_KV_BLOCK = 512


def cached_attention(query: jax.Array, key: jax.Array, value: jax.Array, cursor: jax.Array, *, scale: float,
                     impl: str = "auto") -> jax.Array:
  """query [B, T, Hq, D] at slots cursor..cursor+T-1 (cursor [B] int32); key, value [B, S, Hkv, D] -> [B, T, Hq, D].

  See the module docstring for `impl`."""
  if choose_impl(impl, query, key) == "reference":
    return cached_attention_reference(query, key, value, cursor, scale=scale)
  from maxtext.kernels.attention import gpu_cached  # noqa: PLC0415 - Pallas Triton imports on demand

  interpret = dispatch.backend() == "cpu"
  kernel = lambda q, k, v, c: gpu_cached.cached_flash_attention(q, k, v, c, scale=scale, interpret=interpret)
  return shards.per_shard(kernel, query, key, value, cursor)


def choose_impl(impl: str, query: jax.Array, key: jax.Array) -> str:
  """'reference' or 'gpu' for these inputs on the current backend (see the module docstring)."""
  if impl not in IMPLS:
    raise ValueError(f"unknown cached attention implementation '{impl}': choose one of {', '.join(IMPLS)}")
  if impl == "auto":
    impl = "gpu" if dispatch.backend() == "gpu" and query.shape[1] >= MIN_KERNEL_TOKENS else "reference"
    reason = _unsupported_reason(query, key) if impl == "gpu" else None
    if reason is not None:
      _note_fallback(reason)
      impl = "reference"
  elif impl == "gpu":
    reason = _unsupported_reason(query, key)
    if reason is not None:
      raise ValueError(f"cached attention impl='gpu': {reason}")
  return dispatch.choose("cached_attention", impl, _AVAILABLE)


def _unsupported_reason(query: jax.Array, key: jax.Array) -> str | None:
  from maxtext.kernels.attention import gpu_cached  # noqa: PLC0415

  return gpu_cached.unsupported_reason(query, key)


@functools.cache
def _note_fallback(reason: str) -> None:
  _logger.info("cached_attention: the 'gpu' kernel does not take these inputs (%s); using the reference", reason)


# ------------------------------------------------------------------------------------------------ reference


def cached_attention_reference(query: jax.Array, key: jax.Array, value: jax.Array, cursor: jax.Array, *,
                               scale: float) -> jax.Array:
  """cached_attention in plain jnp (contract in the module docstring).

  Decode attention reads the whole cache once per step (T is a handful of tokens): a plain einsum is
  bandwidth-bound already, and slots past a row's cursor (stale or empty) are masked out. A long T (a prefill
  chunk) goes block by block over the slots with an online softmax, so memory grows with T x block, not T x slots.
  """
  if query.shape[1] >= MIN_KERNEL_TOKENS and key.shape[1] > _KV_BLOCK:
    return blockwise_cached_attention_reference(query, key, value, cursor, scale=scale, block=_KV_BLOCK)
  batch, length, num_heads, head_dim = query.shape
  slots, num_kv_heads = key.shape[1], key.shape[2]
  grouped = query.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", grouped, key, preferred_element_type=jnp.float32) * scale
  last_visible = cursor[:, None] + jnp.arange(length)  # [B, T]
  mask = jnp.arange(slots)[None, None, :] <= last_visible[:, :, None]  # [B, T, S]
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, value)
  return out.reshape(batch, length, num_heads, head_dim).astype(query.dtype)


def blockwise_cached_attention_reference(query: jax.Array, key: jax.Array, value: jax.Array, cursor: jax.Array, *,
                                         scale: float, block: int) -> jax.Array:
  """cached_attention over `block` slots at a time (flash-style running max and sum, float32), stopping after the
  last block any row can see. The last block is taken flush with the cache's end; slots an earlier block covered
  are masked out there, so any cache length works."""
  batch, length, num_heads, head_dim = query.shape
  slots, num_kv_heads = key.shape[1], key.shape[2]
  groups = num_heads // num_kv_heads
  grouped = query.reshape(batch, length, num_kv_heads, groups, head_dim)
  last_visible = cursor[:, None] + jnp.arange(length)  # [B, T]
  num_blocks = (jnp.max(last_visible) + block) // block  # blocks holding any visible slot

  def body(j, carry):
    running_max, running_sum, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, D] float32
    start = jnp.minimum(j * block, slots - block)
    key_j = jax.lax.dynamic_slice_in_dim(key, start, block, axis=1)
    value_j = jax.lax.dynamic_slice_in_dim(value, start, block, axis=1)
    logits = jnp.einsum("btkgd,bskd->bkgts", grouped, key_j, preferred_element_type=jnp.float32) * scale
    slot = start + jnp.arange(block)
    visible = (slot[None, None, :] >= j * block) & (slot[None, None, :] <= last_visible[:, :, None])  # [B, T, S]
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # a row with nothing visible yet adds nothing
    weights = jnp.exp(logits - safe_max[..., None])
    correction = jnp.exp(running_max - safe_max)
    running_sum = running_sum * correction + jnp.sum(weights, axis=-1)
    update = jnp.einsum("bkgts,bskd->bkgtd", weights.astype(value_j.dtype), value_j,
                        preferred_element_type=jnp.float32)
    return new_max, running_sum, acc * correction[..., None] + update

  stats_shape = (batch, num_kv_heads, groups, length)
  init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
          jnp.zeros(stats_shape + (head_dim,), jnp.float32))
  _, running_sum, acc = jax.lax.fori_loop(0, num_blocks, body, init)
  out = acc / running_sum[..., None]  # every query sees at least its own slot
  out = jnp.moveaxis(out, 3, 1)  # [B, T, K, G, D]
  return out.reshape(batch, length, num_heads, head_dim).astype(query.dtype)
