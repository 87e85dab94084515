"""The MoE layer's megablox path compiles for a TPU topology without a TPU (deviceless AOT with libtpu)."""

import importlib.util
import os
import subprocess
import sys

import pytest

NO_LIBTPU = "libtpu is not installed (pip install 'jax[tpu]==<jax version>'): no deviceless TPU compile"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=NO_LIBTPU)
def test_megablox_moe_compiles_for_tpu_topology_inside_sharded_jit():
  """Forward + backward over a (fsdp 2, expert 2) v5p mesh: Mosaic kernels and the expert all-to-all are in it.

  Small shapes keep CI fast; `python -m maxtext.kernels.grouped_matmul.tpu_aot_check` (no flags) compiles
  Qwen3-Next's (512 experts, top-10, 2048 -> 512, 4 x 1024 tokens).
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
  command = [sys.executable, "-m", "maxtext.kernels.grouped_matmul.tpu_aot_check", "--topology", "v5p:2x2x1",
             "--shape", "4,256,512", "--experts", "16,4,256"]
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  print(result.stdout)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  assert "compiled tpu_custom_call=True all-to-all=True" in result.stdout, result.stdout
