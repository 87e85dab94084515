"""train_compile: the tiny model's real train step compiles for a v5p slice on this CPU (libtpu, no TPU) with the
Pallas TPU kernels of GDN, MoE (megablox) and splash attention in it; bad topologies and meshes fail in one line."""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>'): no deviceless TPU compile",
)
BASE = "src/maxtext/configs/base.yml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_compile(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # the test session's forced host devices mean nothing to a TPU compile
  command = [sys.executable, "-m", "maxtext.train_compile", BASE, *overrides]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_tiny_train_step_compiles_for_v5p_with_the_pallas_kernels(tmp_path):
  saved = tmp_path / "compiled_v5p-8.pickle"
  result = train_compile(
      "compile_topology=v5p-8", "max_target_length=256", "per_device_batch_size=1", f"compiled_trace_file={saved}"
  )
  print(result.stdout)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  lines = result.stdout.splitlines()
  memory = next(line for line in lines if line.startswith("per chip:"))
  assert "GiB of 95.00 GiB HBM" in memory and memory.endswith(": fits"), memory
  kernels = next(line for line in lines if line.startswith("Pallas TPU kernels in the step:"))
  for kernel in ("gdr_inter_chunk_fwd", "gdr_inter_chunk_bwd",  # gated delta rule, forward and backward
                 "gmm", "tgmm",  # megablox MoE: grouped matmul and its transposed form for the weight gradient
                 "splash_mha_fwd", "splash_mha_dkv"):  # splash attention, forward and fused backward
    assert kernel in kernels, f"{kernel} missing from: {kernels}"
  assert any(line.startswith("FLOPs per step:") for line in lines)
  assert saved.stat().st_size > 0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("compile_topology=v5p-63",), "error: config key 'compile_topology': TPU topology 'v5p-63' is not a slice"),
        ((), "error: config key 'compile_topology' is empty"),
        (("compile_topology=v5p-8", "ici_fsdp_parallelism=8"),
         "error: ici_data_parallelism=1, ici_fsdp_parallelism=8, ici_context_parallelism=1, ici_tensor_parallelism=1,"
         " ici_expert_parallelism=1 multiply to 8, but there are 4 devices per slice"),
    ],
    ids=["unknown-topology", "no-topology", "mesh-does-not-fit"],
)
def test_bad_topology_or_mesh_is_one_line(overrides, message):
  result = train_compile(*overrides, timeout=120)
  assert result.returncode == 2, result.stdout + result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]


def test_a_step_xla_refuses_for_memory_is_one_does_not_fit_line():
  # 2048 x 8192 tokens a chip: XLA:TPU refuses the temporaries (over a terabyte) instead of reporting them.
  result = train_compile("compile_topology=v5p-8", "per_device_batch_size=2048", "max_target_length=8192")
  assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith("topology v5p-8, mesh {") and "DOES NOT FIT (XLA refused to compile: RESOURCE_EXHAUSTED" in last
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
