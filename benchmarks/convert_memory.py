"""Peak host memory of to_maxtext on a synthetic checkpoint with the real Qwen3-Next-80B-A3B layer shapes.

  python3 benchmarks/convert_memory.py --work-dir /tmp/convert_bench [--layers 4] [--scan-layers true]

Writes an HF-layout safetensors checkpoint (bf16, per-expert tensors as on the hub, 5 GB shards) of the 80B model cut
to `--layers` layers, runs the documented to_maxtext command on it in a subprocess, and reports its peak RSS against
the bound 2 x (largest layer's bytes) + 1 GiB. Appends the result to docs/benchmarks.md with --record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30


def build_checkpoint(directory: str, layers: int) -> tuple[int, int]:
  """Write the synthetic HF checkpoint; returns (total bytes, largest layer's bytes)."""
  from maxtext.configs.hf_config import hf_config_from_config
  from maxtext.checkpoint_conversion.param_mapping import hf_shape, parameter_mappings
  from maxtext.checkpoint_conversion.safetensors_io import ShardedSafetensorsWriter
  from maxtext.configs import load_config
  from maxtext.models import params as model_params
  from maxtext.models.spec import ModelSpec

  config = load_config(overrides={"model_name": "qwen3-next-80b-a3b", "base_num_decoder_layers": layers,
                                  "mtp_num_layers": 0, "scan_layers": False})
  spec = ModelSpec.from_config(config)
  shapes = model_params.flat_shapes(spec)
  # Random bf16 values, drawn once and reused by offset: the content does not matter for memory.
  pool = (np.random.default_rng(0).standard_normal(1 << 25, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  writer = ShardedSafetensorsWriter(directory)
  total, per_layer, offset = 0, {}, 0
  for m in parameter_mappings(spec, include_mtp=False):
    shape = hf_shape(m, shapes[m.ours])
    size = int(np.prod(shape))
    layer = m.hf[0].split(".")[2] if m.hf[0].startswith("model.layers.") else m.hf[0]
    for name in m.hf:
      start = offset % (pool.size - size) if size < pool.size else 0
      tensor = pool[start : start + size] if size <= pool.size else np.resize(pool, size)
      writer.add(name, tensor.reshape(shape))
      offset += 7919
      total += tensor.nbytes
      per_layer[layer] = per_layer.get(layer, 0) + tensor.nbytes
  writer.close()
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump({**hf_config_from_config(config), "dtype": "bfloat16"}, f, indent=2)
  return total, max(per_layer.values())


def main() -> int:
  from maxtext.utils import platforms

  platforms.default_platforms()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--work-dir", required=True, help="scratch directory (needs ~2.2x the checkpoint on disk)")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--scan-layers", default="true", choices=["true", "false"])
  parser.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
  args = parser.parse_args()
  hf_dir, out_dir = os.path.join(args.work_dir, "hf"), os.path.join(args.work_dir, "out")
  shutil.rmtree(args.work_dir, ignore_errors=True)
  os.makedirs(args.work_dir)
  start = time.perf_counter()
  total, largest_layer = build_checkpoint(hf_dir, args.layers)
  print(f"synthetic checkpoint: {total / GIB:.2f} GiB, largest layer {largest_layer / GIB:.2f} GiB,"
        f" written in {time.perf_counter() - start:.0f}s")

  command = [sys.executable, "-m", "maxtext.checkpoint_conversion.to_maxtext",
             os.path.join(REPO, "src/maxtext/configs/base.yml"), f"hf_model_path={hf_dir}",
             f"base_output_directory={out_dir}", f"scan_layers={args.scan_layers}"]
  start = time.perf_counter()
  subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  elapsed = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
  bound = 2 * largest_layer + GIB
  verdict = "PASS" if peak < bound else "FAIL"
  rows = [
      ("checkpoint (bf16)", f"{total / GIB:.2f} GiB"),
      ("largest layer", f"{largest_layer / GIB:.2f} GiB"),
      ("to_maxtext peak RSS", f"{peak / GIB:.2f} GiB"),
      ("bound 2 x layer + 1 GiB", f"{bound / GIB:.2f} GiB"),
      ("peak / checkpoint", f"{peak / total:.2f}"),
      ("conversion time", f"{elapsed:.0f} s ({total / GIB / elapsed:.2f} GiB/s)"),
  ]
  print(f"\n| 80B shapes, {args.layers} layers, scan_layers={args.scan_layers} | |\n|---|---|")
  for name, value in rows:
    print(f"| {name} | {value} |")
  print(f"\n{verdict}: peak RSS {'below' if peak < bound else 'ABOVE'} the bound")
  if args.record:
    import jax
    import orbax.checkpoint

    with open(os.path.join(REPO, "docs", "benchmarks.md"), "a", encoding="utf-8") as f:
      f.write(f"\n## Checkpoint conversion memory ({datetime.date.today()})\n\n")
      f.write(f"`python3 benchmarks/convert_memory.py --work-dir DIR --layers {args.layers} --scan-layers"
              f" {args.scan_layers}` on {platform.machine()} {os.cpu_count()} CPU cores, Python"
              f" {platform.python_version()}, jax {jax.__version__}, orbax-checkpoint {orbax.checkpoint.__version__}."
              f" Synthetic HF checkpoint with the real 80B-A3B shapes (512 experts, hidden 2048) cut to {args.layers}"
              " layers, bf16, per-expert tensors, 5 GB shards.\n\n| measure | value |\n|---|---|\n")
      for name, value in rows:
        f.write(f"| {name} | {value} |\n")
      f.write(f"\nVerdict: {verdict} (peak RSS must stay below 2 x largest layer + 1 GiB).\n")
  shutil.rmtree(args.work_dir, ignore_errors=True)
  return 0 if peak < bound else 1


if __name__ == "__main__":
  sys.exit(main())
