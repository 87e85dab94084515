"""Time the inter-chunk recurrence of the chunked gated delta rule: the Pallas GPU kernels against the jnp reference.

Usage: python benchmarks/gated_delta_rule.py --batch 1 --heads 32 --chunks 1024 --dtype bfloat16
Prints one row per pass (forward, backward): milliseconds for ours and the reference, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxtext.kernels.gated_delta_rule.gpu import inter_chunk_backward_gpu, inter_chunk_forward_gpu
from maxtext.kernels.gated_delta_rule.inter_chunk import inter_chunk_backward, inter_chunk_forward


def time_fn(fn: Callable, *args, iters: int = 10, repeats: int = 5) -> float:
  """Median over `repeats` of the mean milliseconds per call of `iters` back-to-back calls (after a warm-up)."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) * 1e3 / iters)
  return statistics.median(samples)


def recurrence_inputs(batch: int, heads: int, chunks: int, chunk: int, key_dim: int, value_dim: int,
                      dtype: str, seed: int = 0) -> dict[str, jax.Array]:
  """Random inputs of the recurrence at realistic scales (values do not matter for timing, only shapes)."""
  rng = np.random.default_rng(seed)
  normal = lambda scale, *dims: jnp.asarray(scale * rng.standard_normal(dims), dtype)
  return dict(
      q=normal(0.1, batch, heads, chunks, chunk, key_dim), k=normal(0.1, batch, heads, chunks, chunk, key_dim),
      w=normal(0.1, batch, heads, chunks, chunk, key_dim), u=normal(1.0, batch, heads, chunks, chunk, value_dim),
      intra=normal(0.1, batch, heads, chunks, chunk, chunk),
      decay=jnp.asarray(rng.uniform(0.5, 1.0, (batch, heads, chunks)), jnp.float32),
      h0=normal(1.0, batch, heads, key_dim, value_dim),
      d_out=jnp.asarray(rng.standard_normal((batch, heads, chunks, chunk, value_dim)), jnp.float32),
      d_final_state=jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), jnp.float32),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=32, help="value heads")
  parser.add_argument("--chunks", type=int, default=256, help="number of chunks N")
  parser.add_argument("--chunk-size", type=int, default=64)
  parser.add_argument("--key-dim", type=int, default=128)
  parser.add_argument("--value-dim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--split-f32-operands", action="store_true", help="hi+lo bf16 dots (~float32 accuracy)")
  parser.add_argument("--iters", type=int, default=10)
  args = parser.parse_args()

  x = recurrence_inputs(args.batch, args.heads, args.chunks, args.chunk_size, args.key_dim, args.value_dim,
                        args.dtype)
  fwd_args = (x["q"], x["k"], x["w"], x["u"], x["intra"], x["decay"], x["h0"])
  split = args.split_f32_operands
  ours_fwd = jax.jit(lambda *a: inter_chunk_forward_gpu(*a, split_f32_operands=split))
  ours_bwd = jax.jit(lambda *a: inter_chunk_backward_gpu(*a, split_f32_operands=split))
  ref_fwd, ref_bwd = jax.jit(inter_chunk_forward), jax.jit(inter_chunk_backward)
  residuals = ours_fwd(*fwd_args)
  bwd_args = (x["q"], x["k"], x["w"], x["intra"], x["decay"], residuals.states, residuals.v_new, x["d_out"],
              x["d_final_state"])

  print(f"device: {jax.devices()[0].device_kind}  shape: B={args.batch} H={args.heads} N={args.chunks} "
        f"C={args.chunk_size} Dk={args.key_dim} Dv={args.value_dim} {args.dtype} split={split}")
  print(f"{'pass':<10}{'ours ms':>10}{'ref ms':>10}{'ref/ours':>10}")
  for name, ours, ref, call_args in (("forward", ours_fwd, ref_fwd, fwd_args),
                                     ("backward", ours_bwd, ref_bwd, bwd_args)):
    ours_ms = time_fn(ours, *call_args, iters=args.iters)
    ref_ms = time_fn(ref, *call_args, iters=args.iters)
    print(f"{name:<10}{ours_ms:>10.3f}{ref_ms:>10.3f}{ref_ms / ours_ms:>10.2f}")


if __name__ == "__main__":
  main()
