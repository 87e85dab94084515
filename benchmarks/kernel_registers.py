"""Registers, spills and shared memory of the GDN GPU kernels for sm_90, found on a CPU host (no GPU needed).

Lowers chunk_gated_delta_rule_gpu's forward+backward for CUDA (JAX's cross-platform lowering), keeps the Triton IR
of each Pallas-Triton kernel, compiles it with a Triton wheel for sm_90 and reads ptxas -v. Spills and the register
count bound how many programs share an SM (65536 registers: 255 per thread at 4 warps allows two); use it to screen
launch variants before a device call. Triton and ptxas here are the wheel's, not jaxlib's, so the numbers are
indicative (a pid swap alone moved the fused backward's spills from 124 to 236 bytes).

Needs two wheels beside the project's environment, neither installed into it (both from PyPI):
  pip download --no-deps -d /tmp/whl jax-cuda12-plugin==<jax version> triton
  pip install --no-deps --target /tmp/cudasite /tmp/whl/jax_cuda12_plugin-*.whl
  pip install --no-deps --target /tmp/tritonsite /tmp/whl/triton-*.whl
Usage (from benchmarks/):
  JAX_PLATFORMS=cpu PYTHONPATH=/tmp/cudasite:../src python3 kernel_registers.py --triton /tmp/tritonsite \
      [--launch 'grad_block_k=32,parallel_warps=2'] [--packed]
The same cross-platform lowering also checks Mosaic GPU kernels' layouts and shapes on a CPU host (Pallas' interpret
mode cannot run their TMA copies).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile


def kernel_modules(launch_fields: dict, packed: bool) -> dict[str, tuple[str, int, int]]:
  """{kernel name: (Triton IR, warps, stages)} of one forward+backward at a small shape (Hk 2, Hv 4, d 128)."""
  import jax
  import jax.numpy as jnp
  from jax._src.pallas.triton import lowering, pallas_call_registration

  from maxtext.kernels.gated_delta_rule.gpu import ChunkedLaunch, chunk_gated_delta_rule_gpu

  captured, original = {}, lowering.lower_jaxpr_to_triton_module

  def keep(jaxpr, *args, **kwargs):
    result = original(jaxpr, *args, **kwargs)
    caller = sys._getframe(1).f_locals  # pallas_call_lowering: its launch parameters, resolved before this call
    captured[jaxpr.debug_info.func_name] = (result.module.operation.get_asm(enable_debug_info=False),
                                            caller.get("num_warps", 4), caller.get("num_stages", 1))
    return result

  pallas_call_registration.lowering.lower_jaxpr_to_triton_module = keep
  try:
    launch = ChunkedLaunch(**launch_fields)
    batch, length, key_heads, value_heads, dim = 1, 256, 2, 4, 128
    segment_ids = jnp.zeros((batch, length), jnp.int32).at[:, length // 3:].set(1) if packed else None

    def loss(q, k, v, g, beta, h0):
      out, final = chunk_gated_delta_rule_gpu(q, k, v, g, beta, h0, segment_ids=segment_ids, launch=launch)
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final)

    spec = jax.ShapeDtypeStruct
    args = (spec((batch, length, key_heads, dim), jnp.bfloat16), spec((batch, length, key_heads, dim), jnp.bfloat16),
            spec((batch, length, value_heads, dim), jnp.bfloat16), spec((batch, length, value_heads), jnp.float32),
            spec((batch, length, value_heads), jnp.bfloat16), spec((batch, value_heads, dim, dim), jnp.float32))
    jax.jit(jax.grad(loss, argnums=range(6))).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = original
  return captured


def compile_report(ir: str, warps: int, stages: int, triton_site: str) -> str:
  """Triton's shared memory and ptxas' registers/spills for one kernel's IR."""
  if triton_site not in sys.path:
    sys.path.insert(0, triton_site)
  import triton
  from triton.backends.compiler import GPUTarget

  with tempfile.TemporaryDirectory() as scratch:
    path = os.path.join(scratch, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ir)
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = os.path.join(scratch, "kernel.ptx")
    with open(ptx, "w") as f:
      f.write(kernel.asm["ptx"])
    # the wheel's newest ptxas: Triton 3.9 writes PTX 9.4, which its CUDA 12.9 ptxas refuses
    ptxas = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")))[-1]
    result = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(scratch, "k.cubin")],
                            capture_output=True, text=True, check=False)
  info = " ".join(line.split(":", 1)[-1].strip() for line in result.stderr.splitlines()
                  if "registers" in line or "spill" in line)
  return f"shared {kernel.metadata.shared} B; {info or 'ptxas: ' + result.stderr.strip()[:200]}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--triton", required=True, help="a folder holding the triton wheel's package (--target)")
  parser.add_argument("--launch", default="", help="gpu.ChunkedLaunch fields, e.g. 'grad_block_k=32,grad_warps=8'")
  parser.add_argument("--packed", action="store_true", help="with segment ids (the segmented kernels)")
  args = parser.parse_args()
  fields = eval(f"dict({args.launch})")  # noqa: S307 - a developer's own command line
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  print(f"| kernel | warps | stages | report (sm_90, launch {fields or 'default'}) |\n|---|---|---|---|")
  for name, (ir, warps, stages) in kernel_modules(fields, args.packed).items():
    print(f"| {name} | {warps} | {stages} | {compile_report(ir, warps, stages, args.triton)} |", flush=True)


if __name__ == "__main__":
  main()
