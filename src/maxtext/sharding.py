"""Logical axis names -> mesh axes: the one place that decides how parameters and activations are laid out.

Layers annotate parameters and activations with logical names only; changing a layout means changing RULES.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

# `context` splits each sequence (context parallelism); it sits inside fsdp and outside tensor, as in MaxText, so
# the sequence's shards are ICI neighbours of one another when tensor is 1.
MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")
CONTEXT_AXIS = "context"

# (logical name, mesh axis or axes). A name absent here, or mapped to None, is replicated. When two names of one
# tensor want the same mesh axis, the first one keeps it.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    # Parameters are also split over the context devices (ZeRO-3 over fsdp x context, as MaxText does): a
    # sequence split over context would otherwise leave each of them a whole fsdp shard of weights and moments.
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("conv_channels", None),
    # activations
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_experts", "expert"),
)


def mesh_shape(parallelism: dict[str, int], num_devices: int, *, prefix: str = "ici", what: str = "devices"
               ) -> tuple[int, ...]:
  """Sizes of MESH_AXES from `<prefix>_*_parallelism` values; one -1 takes the remaining devices.

  Raises ValueError naming the keys when they do not fit `num_devices` (`what` says what is counted: devices,
  hosts, slices).
  """
  sizes = [parallelism.get(axis, 1) for axis in MESH_AXES]  # an axis left out has size 1
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"the {prefix}_*_parallelism product ({fixed}) does not divide the {num_devices} {what}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    given = ", ".join(f"{prefix}_{axis}_parallelism={size}" for axis, size in zip(MESH_AXES, sizes))
    raise ValueError(f"{given} multiply to {math.prod(sizes)}, but there are {num_devices} {what}")
  return tuple(sizes)


def make_mesh(parallelism: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(parallelism, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def config_parallelism(config) -> dict[str, int]:
  return {
      "data": config.ici_data_parallelism,
      "fsdp": config.ici_fsdp_parallelism,
      "tensor": config.ici_tensor_parallelism,
      "expert": config.ici_expert_parallelism,
      "context": config.ici_context_parallelism,
  }


def logical_sharding(tree, mesh: Mesh):
  """NamedShardings for a tree of `nn.Partitioned` metadata (e.g. from `nn.get_partition_spec`)."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def init_sharded(init_fn, abstract_boxed, mesh: Mesh, rng: jax.Array):
  """Run `init_fn(rng)` (returning boxed variables) under jit so every array is born with its rule's sharding.

  Returns unboxed variables and their NamedShardings.
  """
  shardings = logical_sharding(abstract_boxed, mesh)
  with activate(mesh):
    variables = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return variables, shardings


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
  """Make `mesh` current and the logical rules active, so layers' logical constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


def kernel_partition(logical_axes: Sequence[str], sizes: Sequence[int]):
  """(mesh, PartitionSpec) for calling a Pallas kernel inside shard_map on the current mesh, or (None, None).

  Each logical axis takes the mesh axes RULES give it, keeping only those of size > 1 whose product divides the
  dimension and that are not manual already (inside a shard_map); the rest replicate. None when no mesh is active
  or nothing would be split.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None, None
  manual = set(mesh.manual_axes)  # inside a shard_map these are split already
  rules = dict(RULES)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, sizes):
    wanted = rules.get(name)
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
    chosen = []
    for axis in wanted:
      axis_size = mesh.shape.get(axis, 1)
      split = math.prod(mesh.shape[a] for a in chosen) * axis_size
      if axis in used or axis in manual or axis_size == 1 or size % split:
        continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  if all(axis is None for axis in spec):
    return None, None
  return mesh, jax.sharding.PartitionSpec(*spec)


def axes_size(mesh, axes: str | Sequence[str] | None) -> int:
  """Devices a PartitionSpec entry (None, one mesh axis or several) splits a dimension over."""
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def context_shards() -> int:
  """How many devices the active mesh splits each sequence over (its `context` axis); 1 without a mesh, or inside
  a shard_map that already mapped that axis (the per-device code then sees its own shard as a whole sequence)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or CONTEXT_AXIS in mesh.manual_axes:
    return 1
  return mesh.shape.get(CONTEXT_AXIS, 1)
