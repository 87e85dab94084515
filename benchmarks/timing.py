"""Timing of jitted JAX calls on an accelerator, shared by the benchmarks (run as scripts from this folder)."""

from __future__ import annotations

import statistics
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
