"""Timing of jitted JAX calls on an accelerator, shared by the benchmarks (run as scripts from this folder)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


def time_jax(fn: Callable, *args, min_ms: float = 200.0, repeats: int = 5) -> float:
  """Median over `repeats` of the mean ms per call of back-to-back calls filling min_ms (after a warm-up).

  Back-to-back calls keep the device busy, so launch gaps between calls do not count; the first call compiles.
  """
  import jax  # noqa: PLC0415 - callers choose the platform before jax loads

  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  iters = max(1, int(min_ms / max((time.perf_counter() - start) * 1e3, 1e-3)))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) * 1e3 / iters)
  return statistics.median(samples)


def run_worker(script: str, name: str, argv: list[str], scratch: str) -> dict:
  """Run `script --worker=name` in its own process (so each part has the device alone and a crash stays its own);
  the JSON it wrote, with "error" set to its last stderr line when it failed. Progress and results are printed."""
  output = os.path.join(scratch, f"{os.path.splitext(os.path.basename(script))[0]}_{name}.json")
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, os.path.abspath(script), *argv, f"--worker={name}", f"--json={output}"],
                        check=False, capture_output=True, text=True)
  print(f"--- {name}: exit {proc.returncode} in {time.perf_counter() - start:.0f}s", flush=True)
  result = {}
  if os.path.exists(output):
    with open(output, encoding="utf-8") as f:
      result = json.load(f)
  if proc.returncode:
    tail = proc.stderr.strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    result["error"] = tail[-1] if tail else f"exit {proc.returncode}"
  print(json.dumps(result), flush=True)
  return result
