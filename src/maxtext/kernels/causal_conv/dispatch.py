"""Choosing a causal conv implementation, and running it per device shard.

Each implementation registers with the backends on which impl='auto' may take it and a `supports` predicate on the
call's kernel width and dtype; 'auto' takes the first entry, in registry order, that accepts both, and logs the
choice once. A name chosen explicitly runs as asked (on a CPU the 'gpu' kernels run in the Pallas interpreter).
  'gpu'        Pallas-Triton forward and backward (gpu.py): any T and C, widths up to 8
  'reference'  jnp with a float32 hand-written backward (reference.py): CPU, TPU, and the GPU fallback
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from maxtext import sharding
from maxtext.kernels import dispatch as kernel_dispatch
from maxtext.kernels.causal_conv.reference import causal_conv_reference, check_args
from maxtext.kernels.gated_delta_rule import context_parallel


def _gpu_supports(width: int, dtype) -> bool:
  from maxtext.kernels.causal_conv import gpu  # noqa: PLC0415 - Pallas imports on demand

  return gpu.supports(width, dtype)


@dataclasses.dataclass(frozen=True)
class Implementation:
  """name; auto_on: the backends where impl='auto' may take it; supports(width, dtype)."""

  name: str
  auto_on: tuple[str, ...]
  supports: Callable[[int, object], bool] = lambda width, dtype: True


# Best first: 'auto' takes the first entry that runs on the backend and supports the call. On an H200 (2026-12-01,
# docs/benchmarks.md, C = 8192 bf16) the kernel's forward+backward took 0.32 ms against the reference's 0.71 at
# T = 4096, 0.37 against 1.52 with packed documents, 1.23 against 1.17 at T = 16384 (the one shape where the
# reference is ahead, by 5%); its compiled device test passes.
REGISTRY = (
    Implementation("gpu", ("gpu",), _gpu_supports),
    Implementation("reference", ("cpu", "gpu", "tpu")),
)


def choose_impl(impl: str, width: int, dtype) -> str:
  """Resolve impl ('auto' or a registered name) on the current backend; logs the choice once."""
  if impl == "auto":
    platform = kernel_dispatch.backend()
    impl = next((e.name for e in REGISTRY if platform in e.auto_on and e.supports(width, dtype)), "reference")
  return kernel_dispatch.choose("causal_conv", impl, {"any": tuple(e.name for e in REGISTRY)})


def causal_conv(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None = None,
                activation: str | None = "silu", impl: str = "auto", *, interpret: bool = False) -> jax.Array:
  """Causal depthwise conv, then `activation` ('silu' or None): x [B, T, C], kernel [K, C] -> [B, T, C] in x's dtype.

  segment_ids [B, T] keep packed documents apart (inputs of another segment count as zeros); the contract is
  reference.py's. impl: 'auto' (the kernel on a GPU, else the reference: see REGISTRY), 'reference' or 'gpu'. With the
  sequence split over a context axis, each device adds the K - 1 inputs before its shard and runs this on it.
  """
  check_args(x, kernel, segment_ids, activation)
  if sharding.context_shards() > 1:  # the sequence is split over devices: each takes its halo from the previous
    local = lambda x, kernel, ids: causal_conv(x, kernel, ids, activation, impl, interpret=interpret)
    return context_parallel.causal_conv(local, x, kernel, segment_ids)
  chosen = choose_impl(impl, kernel.shape[0], x.dtype)
  if chosen == "reference":
    return causal_conv_reference(x, kernel, segment_ids, activation)
  from maxtext.kernels.causal_conv import gpu  # noqa: PLC0415

  interpret = interpret or kernel_dispatch.backend() == "cpu"
  conv = lambda x, kernel, ids: gpu.causal_conv_gpu(x, kernel, ids, activation, interpret=interpret)
  return _per_shard(conv, x, kernel, segment_ids)


def _per_shard(conv: Callable, x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """Run `conv(x, kernel, segment_ids)` on each device's batch rows (XLA cannot partition a Pallas call).

  The conv is per channel, so channels could split too, but their rule replicates them; the length never splits
  here (context parallelism adds halos first, above). Without a mesh, or when nothing would split, runs as is.
  """
  mesh, spec = sharding.kernel_partition(("activation_batch", None, None), x.shape)
  if mesh is None:
    return conv(x, kernel, segment_ids)
  P = jax.sharding.PartitionSpec
  rows = P(spec[0], None)
  if segment_ids is None:
    body, args, in_specs = (lambda x, k: conv(x, k, None)), (x, kernel), (P(*rows, None), P())
  else:
    body, args, in_specs = conv, (x, kernel, segment_ids), (P(*rows, None), P(), rows)
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(*rows, None), check_vma=False)(*args)
