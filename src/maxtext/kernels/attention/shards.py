"""Running an attention kernel per device shard under the active mesh (the kernels are not auto-partitioned)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from maxtext import sharding


def per_shard(kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array, *per_row: jax.Array) -> jax.Array:
  """Run `kernel(q, k, v, *per_row)` on each device's batch rows and heads under the active mesh.

  q [B, T, Hq, D]; k, v [B, S, Hkv, D]; per_row: arrays with the batch first (segment ids, cursors), split like it.
  Query and key heads split by the same factor so every shard keeps whole GQA groups; when the key heads do not
  divide by it (2 KV heads on 4 head shards), keys and values are repeated up to one per query head first.
  Without a mesh, or when nothing would split, the kernel runs as is.
  """
  mesh, q_spec = sharding.kernel_partition(("activation_batch", None, "activation_heads", None), q.shape)
  if mesh is None:
    return kernel(q, k, v, *per_row)
  batch_axes, head_axes = q_spec[0], q_spec[2]
  if k.shape[2] % sharding.axes_size(mesh, head_axes):
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  P = jax.sharding.PartitionSpec
  per_token = P(batch_axes, None, head_axes, None)
  row_specs = tuple(P(batch_axes, *(None,) * (x.ndim - 1)) for x in per_row)
  # check_vma off: the Pallas interpreter's scratch buffers carry no varying axes (as in the GDN dispatch).
  mapped = jax.shard_map(kernel, mesh=mesh, in_specs=(per_token,) * 3 + row_specs, out_specs=per_token,
                         check_vma=False)
  return mapped(q, k, v, *per_row)
