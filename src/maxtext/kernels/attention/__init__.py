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
import jax.numpy as jnp

from maxtext import sharding
from maxtext.kernels import dispatch
from maxtext.kernels.attention import context_parallel
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
  return _per_shard(_kernel(chosen, scale), q, k, v, segment_ids)


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


def _per_shard(kernel: Callable, q, k, v, segment_ids) -> jax.Array:
  """Run `kernel(q, k, v, segment_ids)` on each device's batch rows and heads under the active mesh.

  Query and key heads split by the same factor so every shard keeps whole GQA groups; when the key heads do not
  divide by it (2 KV heads on 4 head shards), keys and values are repeated up to one per query head first.
  Without a mesh, or when nothing would split, the kernel runs as is.
  """
  mesh, q_spec = sharding.kernel_partition(("activation_batch", None, "activation_heads", None), q.shape)
  if mesh is None:
    return kernel(q, k, v, segment_ids)
  batch_axes, head_axes = q_spec[0], q_spec[2]
  head_shards = sharding.axes_size(mesh, head_axes)
  if k.shape[2] % head_shards:
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  P = jax.sharding.PartitionSpec
  per_token = P(batch_axes, None, head_axes, None)
  if segment_ids is None:
    body, args, in_specs = (lambda q, k, v: kernel(q, k, v, None)), (q, k, v), (per_token,) * 3
  else:
    body, args = kernel, (q, k, v, segment_ids)
    in_specs = (per_token,) * 3 + (P(batch_axes, None),)
  # check_vma off: the Pallas interpreter's scratch buffers carry no varying axes (as in the GDN dispatch).
  mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=per_token, check_vma=False)
  return mapped(*args)


__all__ = ["IMPLS", "cached_attention", "cached_attention_reference", "choose_impl", "dot_product_attention",
           "dot_product_attention_reference"]
