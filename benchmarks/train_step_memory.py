"""Train-step memory of the 2.5B bench config on an H200, measured with no GPU: XLA:GPU compiles the real step
ahead of time on this CPU for a described H200 and reports its buffers, scanned and unscanned layers.

  JAX_PLATFORMS=cpu PYTHONPATH=/tmp/cudasite python3 benchmarks/train_step_memory.py --batch 1,4,8 \
      --scan-layers false,true [--dump DIR]

Needs the CUDA plugin, cuDNN, cuBLAS and ptxas as wheels on the path, not a GPU (versions as jax's):
  pip download --no-deps -d /tmp/cudaplug jax-cuda12-plugin==$JAX jax-cuda12-pjrt==$JAX nvidia-cudnn-cu12 \
      nvidia-cuda-nvcc-cu12 nvidia-cublas-cu12
  pip install --no-deps --target /tmp/cudasite /tmp/cudaplug/*.whl

The step is the one train_step.py times on the device (bf16 weights and compute, remat none, AdamW, our Pallas
kernels, cuDNN attention), compiled by the same XLA:GPU passes and buffer assignment. What it cannot see: the
allocator's own overhead and cuBLAS/cuDNN workspaces (the device's peak ran about 4 GB above arguments +
temporaries here: 54.2 against 50.2 GB unscanned at 4 x 4096), and jax's version on the device. jax asks the local
GPU whether it is a Hopper before it lets cuDNN take head_dim 256; with none, the answer is the described H200's
(deviceless_gpu.py).
Each compile runs in its own process (~20 s). `--dump DIR` keeps XLA's buffer assignment and live ranges
(DIR/<layout>_b<batch>/*buffer-assignment.txt, *live-range.txt) for reading what is live at the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench_model import BENCH_MODEL

LENGTH = 4096
GB = 1e9



def compile_one(batch: int, scanned: bool) -> dict:
  """Compile the step for one deviceless H200 in this process; its memory analysis in GB."""
  from deviceless_gpu import h200_mesh, lowering_context  # noqa: PLC0415 - before jax starts

  from maxtext import sharding  # noqa: PLC0415

  mesh = h200_mesh(sharding.MESH_AXES)
  import jax  # noqa: PLC0415

  from maxtext.configs import load_config  # noqa: PLC0415
  from maxtext.trainers.train_step import build_training  # noqa: PLC0415

  config = load_config(overrides={
      **BENCH_MODEL, "max_target_length": LENGTH, "per_device_batch_size": batch, "dtype": "bfloat16",
      "weight_dtype": "bfloat16", "remat_policy": "none", "scan_layers": scanned, "steps": 1000,
  })
  training = build_training(config, mesh)
  with lowering_context(mesh):
    lowered = training.train_step.lower(training.abstract_state, training.abstract_batch)
  memory = lowered.compile().memory_analysis()
  return {"batch": batch, "scanned": scanned, "arguments": memory.argument_size_in_bytes / GB,
          "temporaries": memory.temp_size_in_bytes / GB, "jax": jax.__version__}


def run(batch: int, scanned: bool, dump: str | None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if dump:
    where = os.path.join(dump, f"{'scanned' if scanned else 'unscanned'}_b{batch}")
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_dump_to={where} --xla_dump_hlo_module_re=.*train_step.*"
                        " --xla_dump_hlo_pass_re=^$").strip()
  command = [sys.executable, __file__, "--one", f"{batch},{int(scanned)}"]
  result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  if result.returncode != 0 or not lines:
    tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"batch": batch, "scanned": scanned, "error": tail[:300]}
  return json.loads(lines[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", default="1,4", help="sequences of 4096 tokens a step, comma-separated")
  parser.add_argument("--scan-layers", default="false,true")
  parser.add_argument("--dump", default=None, help="keep XLA's buffer assignment dumps here")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker: "batch,scanned"
  args = parser.parse_args()
  if args.one:
    batch, scanned = args.one.split(",")
    print(json.dumps(compile_one(int(batch), scanned == "1")), flush=True)
    return
  layouts = [value.strip().lower() in ("true", "1", "yes") for value in args.scan_layers.split(",")]
  results = [run(int(b), scanned, args.dump) for b in args.batch.split(",") for scanned in layouts]
  unscanned = {r["batch"]: r for r in results if not r["scanned"] and "error" not in r}
  print("| B x T | layers | arguments (GB) | temporaries (GB) | total (GB) | temporaries / unscanned |")
  print("|---|---|---|---|---|---|")
  for r in results:
    layout = "scanned" if r["scanned"] else "unscanned"
    if "error" in r:
      print(f"| {r['batch']} x {LENGTH} | {layout} | - | - | - | {r['error']} |")
      continue
    base = unscanned.get(r["batch"])
    ratio = f"{r['temporaries'] / base['temporaries']:.2f}" if base else "-"
    print(f"| {r['batch']} x {LENGTH} | {layout} | {r['arguments']:.2f} | {r['temporaries']:.2f} |"
          f" {r['arguments'] + r['temporaries']:.2f} | {ratio} |")
  versions = sorted({r["jax"] for r in results if "jax" in r})
  print(f"deviceless H200 (XLA:GPU on the CPU), jax {', '.join(versions)}")


if __name__ == "__main__":
  main()
