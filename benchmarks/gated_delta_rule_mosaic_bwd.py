"""The Mosaic GPU chunk backward (maxtext.kernels.gated_delta_rule.gpu_mosaic_backward, one and two warpgroups a
chunk) against the Triton kernel it replaces (gpu_backward.chunk_grad_kernel, ChunkedLaunch()'s launch) on the same
random arrays: errors of the Mosaic outputs relative to the Triton ones (max|a-b| / max|b|), then ms of each at
1 x 4096, 1 x 16384, 8 x 4096 (Hk 16, Hv 32, d 128, bf16).

GPU:  PYTHONPATH=src:benchmarks python3 benchmarks/gated_delta_rule_mosaic_bwd.py
CPU, lowering for CUDA only (jax-cuda12-plugin of the same version as jax on the path, see kernel_registers.py):
  JAX_PLATFORMS=cpu PYTHONPATH=/tmp/cudasite:src python3 benchmarks/gated_delta_rule_mosaic_bwd.py --lower
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.gpu_mosaic_backward import C, KERNELS as BY_WARPGROUPS


def random_inputs(batch=1, length=4096, key_heads=16, heads=32, dim=128, seed=0):
  keys = jax.random.split(jax.random.key(seed), 12)
  chunks = length // C
  bf = jnp.bfloat16
  normal = lambda key, shape, s=1.0: (s * jax.random.normal(key, shape)).astype(bf)
  gc = jnp.cumsum(-0.05 * jax.random.uniform(keys[3], (batch, heads, chunks, C)), axis=-1).reshape(batch, heads, -1)
  beta = jax.random.uniform(keys[4], (batch, heads, length))
  tri = jnp.tril(jnp.ones((C, C)), -1)
  t = (jnp.eye(C) + 0.1 * tri * jax.random.normal(keys[5], (batch, heads, chunks, C, C))).astype(bf)
  p = (0.1 * jnp.tril(jnp.ones((C, C))) * jax.random.normal(keys[11], (batch, heads, chunks, C, C))).astype(bf)
  keys_shape, values_shape = (batch, length, key_heads, dim), (batch, length, heads, dim)
  states_shape = (batch, heads, chunks, dim, dim)
  q, k = normal(keys[0], keys_shape, dim**-0.5), normal(keys[1], keys_shape, dim**-0.5)
  states, d_states = normal(keys[6], states_shape, 0.1), normal(keys[7], states_shape, 0.1)
  d_out, v_new, dv_new = (normal(keys[i], values_shape) for i in (8, 9, 10))
  return q, k, normal(keys[2], values_shape), gc, beta, t, states, d_states, d_out, v_new, dv_new, p


def triton_chunk_grads(*args, scale, groups):
  """gpu.py's fused-backward call of chunk_grad_kernel (its default launch) on the same arrays."""
  from maxtext.kernels.gated_delta_rule import gpu_backward
  from maxtext.kernels.gated_delta_rule.gpu import ChunkedLaunch
  from maxtext.kernels.gated_delta_rule.gpu_precision import matmul_mode
  from maxtext.kernels.triton_compat import TritonParams
  launch = ChunkedLaunch()
  q, v = args[0], args[2]
  batch, length, heads, dim = v.shape
  _, store, mm = matmul_mode((q, v), None, False)
  struct = lambda *shape, dtype=store: jax.ShapeDtypeStruct(shape, dtype)
  kernel = functools.partial(gpu_backward.chunk_grad_kernel, segmented=False, chunk=C, groups=groups,
                             block_k=launch.grad_block_k, block_v=launch.grad_block_v, scale=scale, with_scores=True,
                             mm=mm, heads_fastest=launch.grad_heads_fastest)
  grid = (heads, length // C, batch) if launch.grad_heads_fastest else (length // C, heads, batch)
  return pl.pallas_call(kernel, grid=grid, name="gdr_chunk_bwd",
                        out_shape=(struct(batch, length, heads, dim), struct(batch, length, heads, dim),
                                   struct(batch, length, heads, dim), struct(batch, heads, length, dtype=jnp.float32),
                                   struct(batch, heads, length, dtype=jnp.float32)),
                        compiler_params=TritonParams(num_warps=launch.grad_warps, num_stages=launch.grad_stages))(*args)


KERNELS = {f"mosaic_{n}wg": kernel for n, kernel in BY_WARPGROUPS.items()}


def main() -> None:
  scale, groups = 128**-0.5, 2
  if "--lower" in sys.argv:
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_inputs(length=256, key_heads=2,
                                                                                          heads=4))
    for name, kernel in KERNELS.items():
      lowered = jax.jit(functools.partial(kernel, scale=scale, groups=groups)).trace(*args).lower(
          lowering_platforms=("cuda",))
      print(f"{name} lowered:", len(lowered.as_text()), "characters", flush=True)
    return
  from gated_delta_rule import time_against  # benchmarks/
  for batch, length in ((1, 4096), (1, 16384), (8, 4096)):
    candidates = {name: jax.jit(functools.partial(kernel, scale=scale, groups=groups))
                  for name, kernel in KERNELS.items()}
    time_against(f"{batch}x{length}", jax.jit(functools.partial(triton_chunk_grads, scale=scale, groups=groups)),
                 candidates, random_inputs(batch, length), "dq, dk, dv, dgc, dbeta")

if __name__ == "__main__":
  main()
