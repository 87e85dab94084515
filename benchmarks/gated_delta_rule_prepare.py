"""The chunk algebra alone on a GPU: XLA's prepare_chunks against the fused Pallas kernels (gpu_chunk.py).

  XLA_FLAGS='--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false' python3 benchmarks/gated_delta_rule_prepare.py
      [--length 16384]

B=1, Hk=16, Hv=32, Dk=Dv=128, chunk 64, bf16 q/k/v/beta, float32 g. Times forward and backward (median ms, with
benchmarks/timing.py) of prepare_chunks (explicit inverse, TF32: the GPU path's default) and of
prepare_chunks_gpu / prepare_chunks_gpu_backward for TF32 and bf16 dots at 4 and 8 warps, with the fused forward's
max-relative error against prepare_chunks. Prints one line per variant.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")]

from timing import time_jax  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--length", type=int, default=16384)
  args = parser.parse_args()
  import jax
  import jax.numpy as jnp

  from maxtext.kernels.gated_delta_rule import chunking, gpu_chunk
  from maxtext.kernels.gated_delta_rule.chunking import ChunkInputs

  length, key_heads, value_heads, dim, chunk = args.length, 16, 32, 128, 64
  keys = jax.random.split(jax.random.key(0), 6)
  q = jax.random.normal(keys[0], (1, length, key_heads, dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, length, key_heads, dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, length, value_heads, dim), jnp.bfloat16)
  g = -jnp.exp(jax.random.normal(keys[3], (1, length, value_heads))) * 0.1
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (1, length, value_heads))).astype(jnp.bfloat16)
  chunks = length // chunk
  shapes = [(1, value_heads, chunks, chunk, dim)] * 4 + [(1, value_heads, chunks, chunk, chunk), (1, value_heads, chunks)]
  cotangents = ChunkInputs(*(jax.random.normal(keys[5], shape, jnp.float32) for shape in shapes))

  xla = lambda *x: chunking.prepare_chunks(*x, solve="inverse", precision=jax.lax.Precision.DEFAULT)
  xla_forward = jax.jit(xla)
  xla_both = jax.jit(lambda c, *x: jax.vjp(xla, *x)[1](c))
  forward_ms = time_jax(xla_forward, q, k, v, g, beta)
  both_ms = time_jax(xla_both, cotangents, q, k, v, g, beta)
  print(f"XLA prepare_chunks: fwd {forward_ms:.3f} ms, bwd {both_ms - forward_ms:.3f} ms ({both_ms:.3f} with its fwd)")
  reference = xla_forward(q, k, v, g, beta)
  for precision, warps in itertools.product(("tf32", "bf16"), (4, 8)):
    launch = gpu_chunk.PrepareLaunch(num_warps=warps, grad_num_warps=warps)
    forward = jax.jit(lambda *x: gpu_chunk.prepare_chunks_gpu(*x, precision=precision, launch=launch))
    backward = jax.jit(lambda c, *x: gpu_chunk.prepare_chunks_gpu_backward(*x, None, c, precision=precision,
                                                                           launch=launch))
    out = forward(q, k, v, g, beta)
    error = max(float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b).max()) for a, b in zip(out, reference))
    print(f"fused {precision} dots, {warps} warps: fwd {time_jax(forward, q, k, v, g, beta):.3f} ms, "
          f"bwd {time_jax(backward, cotangents, q, k, v, g, beta):.3f} ms, fwd error {error:.1e}", flush=True)


if __name__ == "__main__":
  main()
