"""Causal GQA attention behind one dispatching API: splash attention on TPU, cuDNN flash attention on GPU, the jnp
reference elsewhere.

impl (the `attention` config key maps onto it in models/spec.py):
  'auto'      the backend's flash kernel when it takes the shapes (lengths, dtype), else the reference;
  'flash'     the backend's flash kernel, an error when it cannot take the shapes; the reference on a CPU;
  'reference' plain jnp attention (the decode path);
  'tpu', 'gpu' that kernel by name (on a CPU, 'tpu' runs in the Pallas interpreter: tests).
Attention of new tokens to a KV cache (decode steps, prefill chunks): `cached_attention` (cached.py).
Kernels run per device shard inside shard_map under an active mesh (Mosaic requires it), split over the mesh axes
the sharding rules give the batch and the heads, never the length.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import jax

from maxtext import sharding
from maxtext.kernels import dispatch
from maxtext.kernels.attention import context_parallel, shards
from maxtext.kernels.attention.cached import cached_attention, cached_attention_reference
from maxtext.kernels.attention.reference import dot_product_attention_reference

_logger = logging.getLogger("maxtext.kernels")
_AVAILABLE: dict[str, tuple[str, ...]] = {
    "cpu": ("reference", "tpu", "gpu"),
    "gpu": ("gpu", "reference"),
    "tpu": ("tpu", "reference"),
}
IMPLS = ("auto", "flash", "reference", "tpu", "gpu")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    segment_ids: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
  """Causal GQA attention. q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; segment_ids: [B, T] or None -> [B, T, Hq, D]."""
  if sharding.context_shards() > 1:  # the sequence is split over devices: queries stay, keys are gathered
    return context_parallel.dot_product_attention(q, k, v, scale=scale, segment_ids=segment_ids, impl=impl,
                                                  choose_impl=choose_impl)
  chosen = choose_impl(impl, q, k)
  if chosen == "reference":
    return dot_product_attention_reference(q, k, v, scale=scale, q_segment_ids=segment_ids)
  kernel = _kernel(chosen, scale)
  if segment_ids is None:
    return shards.per_shard(lambda q, k, v: kernel(q, k, v, None), q, k, v)
  return shards.per_shard(kernel, q, k, v, segment_ids)


def choose_impl(impl: str, q: jax.Array, k: jax.Array) -> str:
  """'reference', 'tpu' or 'gpu' for these inputs on the current backend (see the module docstring)."""
  if impl not in IMPLS:
    raise ValueError(f"unknown attention implementation '{impl}': choose one of {', '.join(IMPLS)}")
  platform = dispatch.backend()
  if impl in ("auto", "flash"):
    wanted = {"tpu": "tpu", "gpu": "gpu"}.get(platform, "reference")
    reason = None if wanted == "reference" else _unsupported_reason(wanted, q, k)
    if reason is not None and impl == "flash":
      raise ValueError(f"attention=flash: {reason}")
    if reason is not None:
      _note_fallback(wanted, reason)
      wanted = "reference"
    return dispatch.choose("attention", wanted, _AVAILABLE)
  return dispatch.choose("attention", impl, _AVAILABLE)


def _unsupported_reason(kernel: str, q: jax.Array, k: jax.Array) -> str | None:
  if kernel == "tpu":
    from maxtext.kernels.attention import tpu  # noqa: PLC0415 - Pallas TPU imports on demand

    return tpu.unsupported_reason(q, k)
  from maxtext.kernels.attention import gpu  # noqa: PLC0415

  return gpu.unsupported_reason(q, k)


@functools.cache
def _note_fallback(kernel: str, reason: str) -> None:
  _logger.info("attention: the '%s' kernel does not take these inputs (%s); using the reference", kernel, reason)


def _kernel(chosen: str, scale: float) -> Callable:
  """(q, k, v, segment_ids) -> out for one shard, with the chosen kernel."""
  if chosen == "tpu":
    from maxtext.kernels.attention import tpu  # noqa: PLC0415

    interpret = dispatch.backend() == "cpu"
    return lambda q, k, v, ids: tpu.splash_attention(q, k, v, scale=scale, segment_ids=ids, interpret=interpret)
  from maxtext.kernels.attention import gpu  # noqa: PLC0415

  return lambda q, k, v, ids: gpu.cudnn_attention(q, k, v, scale=scale, segment_ids=ids)


__all__ = ["IMPLS", "cached_attention", "cached_attention_reference", "choose_impl", "dot_product_attention",
           "dot_product_attention_reference"]
