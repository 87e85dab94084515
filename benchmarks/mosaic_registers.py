"""Registers, spills and shared memory of the GDN's Mosaic GPU kernels for an H200, found on a CPU host: XLA:GPU
compiles jax.grad of chunk_gated_delta_rule_gpu ahead of time for a described H200 (deviceless_gpu.py's
target), and Mosaic GPU's own ptxas run reports each kernel (MOSAIC_GPU_DUMP_PTXAS). Exact for the installed jax,
unlike kernel_registers.py's Triton wheel: screen Mosaic kernel changes for spills before a device call.

  JAX_PLATFORMS=cpu PYTHONPATH=/tmp/cudasite python3 benchmarks/mosaic_registers.py [--variants mosaic_all,...]

Setup as train_step_memory.py's docstring (jax-cuda12-plugin and the nvcc wheel's ptxas on the path).
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile

VARIANTS = {"mosaic_bwd": dict(chunk_grads_mosaic=1, reverse_walk_mosaic=0),
            "mosaic_bwd_2wg": dict(chunk_grads_mosaic=2, reverse_walk_mosaic=0),
            "mosaic_walks": dict(forward_walk_mosaic=1, chunk_grads_mosaic=0),
            "mosaic_walks_2wg": dict(forward_walk_mosaic=2, reverse_walk_mosaic=2, chunk_grads_mosaic=0),
            "walk_roles": dict(forward_walk_roles=2, chunk_grads_mosaic=0, reverse_walk_mosaic=0),
            "walk_roles3": dict(forward_walk_roles=3, chunk_grads_mosaic=0, reverse_walk_mosaic=0)}
# compiled as a forward alone (prefill): P formed in the Mosaic walk
PREFILL_VARIANTS = {"prefill_p_walks": dict(forward_walk_mosaic=1, prefill_scores_in_walk=True),
                    "prefill_p_walks_2wg": dict(forward_walk_mosaic=2, prefill_scores_in_walk=True),
                    "prefill_roles": dict(forward_walk_roles=2, prefill_scores_in_walk=True),
                    "prefill_roles3": dict(forward_walk_roles=3, prefill_scores_in_walk=True),
                    "prefill_roles3_t": dict(forward_walk_roles=3, roles_transposed_chain=True)}
SHAPE = dict(batch=1, length=4096, key_heads=16, value_heads=32, dim=128)


def compile_variant(name: str) -> None:
  """Compile forward + backward with VARIANTS[name] (in this process; the dumps go to MOSAIC_GPU_DUMP_TO)."""
  from deviceless_gpu import h200_mesh, lowering_context  # noqa: PLC0415 - before jax starts

  mesh = h200_mesh(("x",))
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from maxtext.kernels.gated_delta_rule.gpu import ChunkedLaunch, chunk_gated_delta_rule_gpu  # noqa: PLC0415

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  b, t, hk, hv, d = (SHAPE[key] for key in ("batch", "length", "key_heads", "value_heads", "dim"))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  args = (spec((b, t, hk, d), jnp.bfloat16), spec((b, t, hk, d), jnp.bfloat16), spec((b, t, hv, d), jnp.bfloat16),
          spec((b, t, hv), jnp.float32), spec((b, t, hv), jnp.float32))
  launch = ChunkedLaunch(**(VARIANTS | PREFILL_VARIANTS)[name])

  def loss(q, k, v, g, beta):
    out, _ = chunk_gated_delta_rule_gpu(q, k, v, g, beta, None, launch=launch)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  prefill = lambda *a: chunk_gated_delta_rule_gpu(*a, None, launch=launch)
  with lowering_context(mesh):
    step = jax.jit(prefill) if name in PREFILL_VARIANTS else jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    lowered = step.lower(*args)
  lowered.compile()


def kernel_rows(dump: str) -> list[dict]:
  """One row per Mosaic kernel compiled into `dump`: grid, threads, registers, spills, shared memory."""
  rows = []
  for ptxas in sorted(glob.glob(os.path.join(dump, "*.ptxas"))):
    text = open(ptxas, encoding="utf-8").read()
    stem = ptxas[: -len(".ptxas")]
    mlir_dump = next((stem + ext for ext in (".before_layout_inference.txt", ".mlir-passes.log")
                      if os.path.exists(stem + ext)), None)  # the name differs between jax versions
    mlir = open(mlir_dump, encoding="utf-8").read() if mlir_dump else ""
    launch = re.search(r"blocks\([^)]*\) in \(([^)]*)\) threads\([^)]*\) in \(%\w+ = %c(\d+)", mlir)
    grid = "x".join(re.findall(r"%c(\d+)", launch.group(1))) if launch else "?"
    smem = re.search(r"dynamic_shared_memory_size %c(\d+)", mlir)
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    rows.append({"kernel": os.path.basename(ptxas)[: -len(".ptxas")], "grid": grid,
                 "threads": int(launch.group(2)) if launch else 0,
                 "registers": int(registers.group(1)) if registers else -1,
                 "spill_stores": int(spills.group(1)) if spills else 0, "spill_loads": int(spills.group(2)) if spills else 0,
                 "smem_kb": int(smem.group(1)) / 1024 if smem else 0.0})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", default="mosaic_bwd,mosaic_bwd_2wg,mosaic_walks")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # worker: compile this variant
  args = parser.parse_args()
  if args.one:
    compile_variant(args.one)
    return
  print("| variant | kernel | grid | threads | registers | spill stores / loads (bytes) | shared memory (KB) |")
  print("|---|---|---|---|---|---|---|")
  for name in args.variants.split(","):
    with tempfile.TemporaryDirectory() as dump:
      env = dict(os.environ, JAX_PLATFORMS="cpu", MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=dump)
      result = subprocess.run([sys.executable, __file__, "--one", name], env=env, capture_output=True, text=True,
                              check=False)
      if result.returncode != 0:
        print(f"| {name} | compile failed: {(result.stderr.strip().splitlines() or ['?'])[-1][:200]} |||||")
        continue
      for row in kernel_rows(dump):
        print(f"| {name} | {row['kernel']} | {row['grid']} | {row['threads']} | {row['registers']} |"
              f" {row['spill_stores']} / {row['spill_loads']} | {row['smem_kb']:.1f} |")
  print(f"deviceless H200 (sm_90a), jax {importlib.metadata.version('jax')}; B {SHAPE['batch']} T {SHAPE['length']} Hk"
        f" {SHAPE['key_heads']} Hv {SHAPE['value_heads']} d {SHAPE['dim']} bf16")


if __name__ == "__main__":
  main()
