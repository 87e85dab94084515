"""Compile the real train step for a TPU slice on a machine with no TPU, and say whether it fits.

  python3 -m maxtext.train_compile src/maxtext/configs/base.yml model_name=qwen3-next-80b-a3b \
      compile_topology=v5p-64 compile_topology_num_slices=1 per_device_batch_size=1 max_target_length=4096

libtpu describes the slice's chips (jax.experimental.topologies); the step is lowered for a mesh of them, with the
Pallas TPU kernels (gated delta rule, megablox MoE, splash attention) inside shard_map, and compiled by XLA:TPU on
this CPU. Prints per-chip argument, temporary and output bytes and their total against the chip's HBM, the step's
FLOPs and the compile time; `compiled_trace_file=...` also saves the serialized executable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import tempfile
import time
from collections.abc import Sequence

from maxtext.configs import Config, ConfigError, load_config
from maxtext.utils import cli, distributed
from maxtext.utils.topology import GIB, Topology, TopologyError, device_mesh, mesh_shape, parse_topology, topology_devices

_logger = logging.getLogger("maxtext.train_compile")
MOSAIC_CALL = "tpu_custom_call"


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """What one deviceless compile measured, per chip unless said otherwise."""

  topology: Topology
  num_slices: int
  mesh_shape: dict[str, int]
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int  # donated arguments reused as outputs: counted once
  model_flops_per_step: float  # whole step, all chips (maxtext.trainers.flops)
  xla_flops_per_chip: float  # XLA's cost analysis of one chip's program; Pallas kernels count their CostEstimate
  compile_seconds: float
  pallas_kernels: tuple[str, ...]  # names of the Mosaic kernels in the compiled step, sorted, unique

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.topology.hbm_bytes

  def lines(self) -> list[str]:
    gib = lambda n: f"{n / GIB:.2f} GiB"
    hbm = self.topology.hbm_bytes
    verdict = "fits" if self.fits else "DOES NOT FIT"
    return [
        f"topology {self.topology.name} ({self.topology.libtpu_name}, {self.topology.chips} chips"
        f" x {self.num_slices} slice(s)); mesh {self.mesh_shape}",
        f"per chip: arguments {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, outputs"
        f" {gib(self.output_bytes)}, aliased (donated) {gib(self.alias_bytes)};"
        f" total {gib(self.total_bytes)} of {gib(hbm)} HBM ({100 * self.total_bytes / hbm:.1f}%): {verdict}",
        f"FLOPs per step: {self.model_flops_per_step:.4g} model (all chips, formula);"
        f" {self.xla_flops_per_chip:.4g} per chip by XLA's cost analysis (Pallas kernels: their declared estimates)",
        f"Pallas TPU kernels in the step: {', '.join(self.pallas_kernels) or 'none'}",
        f"compile time: {self.compile_seconds:.1f} s",
    ]


class DoesNotFit(Exception):
  """XLA refused to compile the step for lack of memory (more than the chip's HBM, or a kernel's on-chip scratch)."""


def compile_mesh(config: Config):
  """The Mesh over the deviceless chips of `compile_topology` x `compile_topology_num_slices`."""
  import jax  # noqa: PLC0415 - after the environment is set

  from maxtext import sharding  # noqa: PLC0415

  topology = parse_topology(config.compile_topology)
  slices = config.compile_topology_num_slices
  devices = topology_devices(topology, slices)
  ici = sharding.config_parallelism(config)
  dcn = {axis: getattr(config, f"dcn_{axis}_parallelism") for axis in sharding.MESH_AXES}
  ici_shape, dcn_shape = mesh_shape(ici, dcn, len(devices) // slices, slices)
  grid = device_mesh(devices, ici_shape, dcn_shape)
  return topology, jax.sharding.Mesh(grid, sharding.MESH_AXES)


def pallas_kernel_names(hlo_text: str) -> tuple[str, ...]:
  """Names of the TPU kernels called in compiled HLO text: each Mosaic custom call is named after its kernel
  (gdr_inter_chunk_fwd, splash_mha_fwd_..., gmm, ...; XLA's own ragged-dot kernels show too)."""
  pattern = re.compile(r"^\s*%?([\w\-]+?)(?:\.\d+)? = .*custom_call_target=\"" + MOSAIC_CALL + '"')
  return tuple(sorted({m.group(1) for m in map(pattern.match, hlo_text.splitlines()) if m}))


def compile_train_step(config: Config) -> tuple[CompileReport, object]:
  """Build, lower and compile the train step for the configured topology: (report, compiled executable)."""
  from maxtext.trainers.flops import training_flops_per_token  # noqa: PLC0415
  from maxtext.trainers.train_step import build_training  # noqa: PLC0415

  try:
    topology, mesh = compile_mesh(config)
  except TopologyError as e:
    raise ConfigError(str(e)) from None
  _logger.info("compiling for %s: %d chips, mesh %s", topology.libtpu_name, mesh.devices.size, dict(mesh.shape))
  training = build_training(config, mesh)
  start = time.perf_counter()
  lowered = training.train_step.lower(training.abstract_state, training.abstract_batch)
  _logger.info("lowered in %.1f s; compiling with XLA:TPU (minutes for the 80B model)", time.perf_counter() - start)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - XLA raises its runtime error type; only memory refusals are ours
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    raise DoesNotFit(f"topology {topology.name}, mesh {dict(mesh.shape)}: DOES NOT FIT (XLA refused to compile:"
                     f" {first[:300]})") from None
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  tokens = training.global_batch_size * config.max_target_length
  report = CompileReport(
      topology=topology,
      num_slices=config.compile_topology_num_slices,
      mesh_shape=dict(mesh.shape),
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      model_flops_per_step=training_flops_per_token(config) * tokens,
      xla_flops_per_chip=float((cost or {}).get("flops", 0.0)),
      compile_seconds=seconds,
      pallas_kernels=pallas_kernel_names(compiled.as_text()),
  )
  return report, compiled


def save_compiled(compiled, path: str) -> None:
  """Serialize the executable (jax.experimental.serialize_executable) to `path`, atomically."""
  from jax.experimental import serialize_executable  # noqa: PLC0415

  payload = serialize_executable.serialize(compiled)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".partial") as f:
    pickle.dump(payload, f)
  os.replace(f.name, path)


def main(argv: Sequence[str]) -> int:
  config = load_config(argv)
  if not config.compile_topology:
    raise ConfigError("config key 'compile_topology' is empty: name the TPU slice to compile for, e.g."
                      " compile_topology=v5p-64")
  # libtpu describes topologies without a TPU when told the host list; must be set before jax starts a backend.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # No TPU is opened, so several compiles (or tests) may load libtpu at once; its lockfile would refuse that.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # launched as several processes (each compiles the same step): join them; the mesh is compile_topology's
  distributed.initialize(config, mesh_spans_processes=False)
  try:
    report, compiled = compile_train_step(config)
  except DoesNotFit as e:
    print(e, flush=True)
    return 3
  for line in report.lines():
    print(line, flush=True)
  if config.compiled_trace_file:
    save_compiled(compiled, config.compiled_trace_file)
    print(f"saved the compiled train step to {config.compiled_trace_file}")
  return 0


if __name__ == "__main__":
  cli.run(main)
