"""Join the other processes of a multi-host run: jax.distributed, started once at the command-line edge.

A command is one process of several when
  - the config (or JAX's environment) names a coordinator: `coordinator_address` / JAX_COORDINATOR_ADDRESS,
    with `num_processes` / JAX_NUM_PROCESSES and `process_id` / JAX_PROCESS_ID (any cluster, and CPU tests);
  - it runs under `srun` with several tasks, or `mpirun` (jax reads SLURM's / Open MPI's variables itself);
  - it runs on a Cloud TPU VM (jax asks the VM's metadata which slice and worker this is; one host joins alone).
Otherwise nothing starts. `skip_jax_distributed_system=true` turns all of this off.
"""

from __future__ import annotations

import logging
import math
import os

from maxtext.configs import Config, ConfigError
from maxtext.utils import platforms

_logger = logging.getLogger("maxtext.distributed")
_DCN_KEYS = ("dcn_data_parallelism", "dcn_fsdp_parallelism", "dcn_tensor_parallelism", "dcn_expert_parallelism",
             "dcn_context_parallelism")


def _explicit(config: Config) -> tuple[str, int, int]:
  """(coordinator address, process count, process id) from the config, else JAX_* variables; '', 0, -1 when unset."""
  address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  count, pid = config.num_processes, config.process_id
  try:
    count = count or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    pid = pid if pid >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
  except ValueError:
    raise ConfigError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got"
                      f" {os.environ.get('JAX_NUM_PROCESSES')!r} and {os.environ.get('JAX_PROCESS_ID')!r}") from None
  return address, count, pid


def _cluster_launcher() -> str:
  """The launcher jax can read the process layout from, or ''."""
  if "SLURM_STEP_NODELIST" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"  # inside `srun` (a batch script alone has no step node list and runs once)
  if "OMPI_MCA_orte_hnp_uri" in os.environ and int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "mpirun"
  if platforms.has_tpu_devices() and os.environ.get("TPU_SKIP_MDS_QUERY") is None:
    return "tpu"
  return ""


def check_processes_fit_mesh(config: Config, num_processes: int) -> None:
  """One line when the dcn_* parallelism cannot span `num_processes` hosts (GPU and CPU clusters: one process per
  host is one DCN granule; TPU slices count slices instead, checked when the mesh is built)."""
  sizes = {name: getattr(config, name) for name in _DCN_KEYS}
  fixed = math.prod(v for v in sizes.values() if v != -1)
  given = ", ".join(f"{name}={value}" for name, value in sizes.items() if value != 1) or "every dcn_*_parallelism is 1"
  if -1 in sizes.values():
    if num_processes % fixed:
      raise ConfigError(f"{num_processes} processes cannot split over the DCN mesh axes ({given}): the fixed"
                        f" dcn_*_parallelism keys multiply to {fixed}, which does not divide {num_processes}")
  elif fixed != num_processes:
    raise ConfigError(f"{num_processes} processes do not match the DCN mesh axes ({given}: {fixed} in all): make the"
                      f" dcn_*_parallelism keys multiply to {num_processes} (e.g. dcn_data_parallelism={num_processes}"
                      f" or -1), or launch {fixed} process(es)")


def initialize(config: Config, mesh_spans_processes: bool = True) -> None:
  """Start jax.distributed when this process is one of several (see the module docstring); only process 0 then
  logs at INFO (the others keep warnings and errors). Call before anything touches a jax device.
  `mesh_spans_processes`: the command's mesh covers every process (training), so the process count is checked
  against the dcn_* keys; decode (one engine per process) and train_compile (a described topology) pass False."""
  import jax  # noqa: PLC0415 - after cli.run chose the platforms

  if config.skip_jax_distributed_system or jax.distributed.is_initialized():
    return
  address, count, pid = _explicit(config)
  timeout = config.jax_distributed_initialization_timeout
  if address or count > 1:
    missing = [name for name, unset in (("coordinator_address", not address), ("num_processes", count < 1),
                                        ("process_id", pid < 0)) if unset]
    if missing:
      raise ConfigError(f"a multi-process run needs coordinator_address, num_processes and process_id (or"
                        f" JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing: {', '.join(missing)}")
    if not 0 <= pid < count:
      raise ConfigError(f"config key 'process_id' ({pid}) must be in 0..{count - 1} for num_processes={count}")
    if mesh_spans_processes and not platforms.has_tpu_devices():  # TPU: dcn_* counts slices, checked with the mesh
      check_processes_fit_mesh(config, count)
    if jax.config.jax_cpu_collectives_implementation is None:  # CPU processes all-reduce through gloo
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _logger.info("process %d of %d: joining the coordinator at %s", pid, count, address)
    # Given explicitly, nothing is detected: under srun jax would otherwise keep only GPU $SLURM_LOCALID per process.
    jax.distributed.initialize(address, count, pid, initialization_timeout=timeout,
                               cluster_detection_method="deactivate")
  elif launcher := _cluster_launcher():
    jax.distributed.initialize(initialization_timeout=timeout)
    if mesh_spans_processes and launcher != "tpu":
      check_processes_fit_mesh(config, jax.process_count())
  else:
    return
  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)
  _logger.info("%d process(es), %d devices in all (%d here); this is process 0: only it logs and writes metrics",
               jax.process_count(), jax.device_count(), jax.local_device_count())
