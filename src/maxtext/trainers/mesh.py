"""The training mesh from `ici_*` and `dcn_*` parallelism, the batch's layout on it, and multi-host start-up."""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxtext import sharding
from maxtext.configs import Config, ConfigError

_logger = logging.getLogger("maxtext.trainers")
# Logical axes of every batch array [B, T]: the batch splits over the data-parallel mesh axes.
BATCH_AXES = ("activation_batch", "activation_length")


def _dcn_parallelism(config: Config) -> dict[str, int]:
  return {
      "data": config.dcn_data_parallelism,
      "fsdp": config.dcn_fsdp_parallelism,
      "tensor": config.dcn_tensor_parallelism,
      "expert": config.dcn_expert_parallelism,
      "context": config.dcn_context_parallelism,
  }


def make_training_mesh(config: Config, devices=None) -> Mesh:
  """Mesh over sharding.MESH_AXES: each axis is ici x dcn; the dcn part spans hosts (or slices)."""
  devices = list(jax.devices() if devices is None else devices)
  dcn = _dcn_parallelism(config)
  # DCN granules: TPU slices (all hosts of a slice share ICI), elsewhere processes (one per host).
  on_tpu = devices[0].platform == "tpu"
  granules = len({d.slice_index if on_tpu else d.process_index for d in devices})
  what = "TPU slices" if on_tpu else "processes (hosts)"
  try:
    if granules == 1 and all(v in (1, -1) for v in dcn.values()):
      return sharding.make_mesh(sharding.config_parallelism(config), devices)
    dcn_shape = sharding.mesh_shape(dcn, granules, prefix="dcn", what=what)
    if len(devices) % granules:
      raise ValueError(f"the {len(devices)} devices do not split evenly over the {granules} {what}")
    per = "devices per slice" if on_tpu else "devices per process"
    ici_shape = sharding.mesh_shape(sharding.config_parallelism(config), len(devices) // granules, what=per)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  from jax.experimental import mesh_utils  # noqa: PLC0415

  grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, process_is_granule=not on_tpu)
  return Mesh(grid, sharding.MESH_AXES)


def data_parallel_size(mesh) -> int:
  """Devices the batch dimension is split over (the mesh axes the `activation_batch` rule names)."""
  return sharding.axes_size(mesh, dict(sharding.RULES)["activation_batch"])


def global_batch_size(config: Config, mesh) -> int:
  """per_device_batch_size x devices, checked to be whole and to split evenly over the data-parallel axes."""
  num_devices = mesh.devices.size if hasattr(mesh, "devices") else math.prod(mesh.shape.values())
  batch = config.per_device_batch_size * num_devices
  if abs(batch - round(batch)) > 1e-9 or round(batch) < 1:
    raise ConfigError(
        f"config key 'per_device_batch_size' ({config.per_device_batch_size}) times the {num_devices} devices must"
        f" be a whole number of rows, got {batch}"
    )
  batch = int(round(batch))
  parallel = data_parallel_size(mesh)
  if batch % parallel:
    raise ConfigError(
        f"the global batch ({batch} = per_device_batch_size {config.per_device_batch_size} x {num_devices} devices)"
        f" does not divide over the {parallel} data-parallel devices (data x fsdp x expert of mesh {dict(mesh.shape)})"
    )
  return batch


def batch_sharding(mesh) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(BATCH_AXES, sharding.RULES)
  return NamedSharding(mesh, PartitionSpec(*spec))


def host_batch_to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This host's rows of the batch -> global arrays laid out by `batch_sharding` (one host: the whole batch)."""
  target = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(target, np.asarray(v)) for k, v in batch.items()}
