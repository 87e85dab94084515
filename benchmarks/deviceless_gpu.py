"""A described H200 for XLA:GPU on a machine with no GPU (benchmarks/train_step_memory.py, mosaic_registers.py).

jax.experimental.topologies builds the device from a GpuTargetConfig; XLA:GPU then compiles for it with the same
passes and buffer assignment as on the device. Needs jax-cuda12-plugin (and cuDNN, cuBLAS, the nvcc wheel's ptxas)
on the path: train_step_memory.py's docstring has the commands.
"""

from __future__ import annotations

import contextlib
import os

# What XLA:GPU needs to know of the device (xla GpuTargetConfig, text proto): an H200 SXM, CUDA 12.8, cuDNN 9.8.
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150754820096
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H200"
"""
COMPUTE_CAPABILITY = (9, 0)


def h200_mesh(axis_names: tuple[str, ...]):
  """A Mesh of one deviceless H200 with these axes (all of size 1). Call before any other jax use."""
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
  import jax  # noqa: PLC0415 - after the environment
  import numpy as np  # noqa: PLC0415
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # noqa: PLC0415
  from jax.experimental import topologies  # noqa: PLC0415

  # jax reads the compute capability off a local GPU before it lets cuDNN take head_dim 256; there is none, so
  # answer for the described one.
  version = lambda capability: tuple(map(int, capability.split(".")))
  cudnn_attention.check_compute_capability = lambda c: version(c) <= COMPUTE_CAPABILITY
  cudnn_attention.is_cuda_compute_capability_equal = lambda c: version(c) == COMPUTE_CAPABILITY
  topology = topologies.get_topology_desc(platform="cuda", target_config=H200_TARGET, topology="1x1x1")
  return jax.sharding.Mesh(np.array(topology.devices).reshape((1,) * len(axis_names)), axis_names)


def lowering_context(mesh):
  """The context to lower in: jax >= 0.11 lowers Pallas Triton and Mosaic kernels for the device kind of the mesh
  in context (none is local)."""
  import jax  # noqa: PLC0415

  return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else contextlib.nullcontext()
