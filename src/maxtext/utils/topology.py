"""TPU slices named as users name them (v5p-64, v5e-256, v6e-16) -> libtpu topologies and a mesh of their devices,
for compiling ahead of time on a machine with no TPU (libtpu only; see maxtext.train_compile).

MaxText's naming: v5p-N counts TensorCores (two per chip: v5p-64 is 32 chips), v5e-N and v6e-N count chips.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from maxtext import sharding

GIB = 1024**3


class TopologyError(ValueError):
  """A topology name or mesh that cannot describe a real TPU slice; the message names the culprit."""


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # as in names: 'v5p'
  cores_per_name_unit: int  # TensorCores counted per chip by the name (2 for v5p's core count, else 1)
  dims: int  # torus dimensions: 3 (v5p) or 2 (v5e, v6e)
  hbm_bytes: int  # per chip
  max_chips: int  # the largest single slice


GENERATIONS = {
    "v5p": Generation("v5p", 2, 3, 95 * GIB, 8960),
    "v5e": Generation("v5e", 1, 2, 16 * GIB, 256),
    "v6e": Generation("v6e", 1, 2, 32 * GIB, 256),
}
# Hosts hold 2x2 chips; smaller slices sit on one host.
_HOST_BOUNDS = (2, 2, 1)


@dataclasses.dataclass(frozen=True)
class Topology:
  """One named slice: its generation, chip count and the libtpu layout (e.g. 'v5p:2x4x4')."""

  name: str
  generation: Generation
  chips: int
  shape: tuple[int, ...]

  @property
  def libtpu_name(self) -> str:
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

  @property
  def hbm_bytes(self) -> int:
    return self.generation.hbm_bytes


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The most cube-like power-of-two shape with `chips` chips, largest dimension first (4x4x2 for 32, 2x2x1 for 4:
  libtpu wants a slice to divide into 2x2x1 hosts)."""
  shape = [1] * dims
  for _ in range(int(math.log2(chips))):
    shape[shape.index(min(shape))] *= 2
  return tuple(sorted(shape, reverse=True))


def parse_topology(name: str) -> Topology:
  """'v5p-64' -> Topology(v5p, 32 chips, 2x4x4). Raises TopologyError naming what is wrong."""
  known = ", ".join(f"{g}-N" for g in GENERATIONS)
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip())
  if match is None:
    raise TopologyError(f"unknown TPU topology '{name}': expected one of {known} (e.g. v5p-64, v5e-256)")
  generation_name, count = match.group(1), int(match.group(2))
  generation = GENERATIONS.get(generation_name)
  if generation is None:
    raise TopologyError(f"unknown TPU generation '{generation_name}' in '{name}': expected one of {known}")
  per_chip = generation.cores_per_name_unit
  chips, remainder = divmod(count, per_chip)
  if remainder or chips < 1 or chips & (chips - 1) or chips > generation.max_chips:
    unit = "TensorCores, 2 per chip" if per_chip == 2 else "chips"
    smallest = f"{generation_name}-{4 * per_chip}"
    raise TopologyError(
        f"TPU topology '{name}' is not a slice this tool can build: N counts {unit} and must give a power-of-two"
        f" chip count up to {generation.max_chips} (e.g. {smallest}, {generation_name}-{64 * per_chip})"
    )
  if chips < 4:
    raise TopologyError(f"TPU topology '{name}' is smaller than one host (4 chips): use {generation_name}-{4 * per_chip}")
  return Topology(name, generation, chips, _torus_shape(chips, generation.dims))


def topology_devices(topology: Topology, num_slices: int = 1) -> list:
  """The deviceless TPU devices of `num_slices` such slices (needs libtpu; no TPU)."""
  from jax.experimental import topologies  # noqa: PLC0415 - jax only when compiling

  bounds = tuple(min(s, b) for s, b in zip(topology.shape + (1,) * (3 - len(topology.shape)), _HOST_BOUNDS))
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.libtpu_name, chips_per_host_bounds=bounds, num_slices=num_slices
    )
  except RuntimeError as e:
    raise TopologyError(f"libtpu cannot describe '{topology.name}' ({topology.libtpu_name}): {e}") from None
  return list(desc.devices)


def mesh_shape(ici: dict[str, int], dcn: dict[str, int], devices_per_slice: int, num_slices: int) -> tuple:
  """(ici sizes, dcn sizes) per mesh axis; one -1 in each takes what is left. TopologyError when they do not fit."""
  return (_fill("ici", ici, devices_per_slice, "devices per slice"), _fill("dcn", dcn, num_slices, "slices"))


def _fill(prefix: str, sizes: dict[str, int], total: int, what: str) -> tuple[int, ...]:
  try:
    return sharding.mesh_shape(sizes, total, prefix=prefix, what=what)
  except ValueError as e:
    raise TopologyError(str(e)) from None


def device_mesh(devices: list, ici_shape: tuple[int, ...], dcn_shape: tuple[int, ...]) -> np.ndarray:
  """Devices laid out for the mesh, ICI axes along the torus (jax's mesh_utils), DCN axes across slices."""
  from jax.experimental import mesh_utils  # noqa: PLC0415

  if math.prod(dcn_shape) == 1:
    return mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
  return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, allow_split_physical_axes=True)
