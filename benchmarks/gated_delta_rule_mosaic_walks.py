"""The Mosaic GPU walks (maxtext.kernels.gated_delta_rule.gpu_mosaic_walks) against the Triton walks they would
replace (gpu_fused.walk_output_kernel without w, saving the history; gpu_kernels.state_grad_kernel with the fused
forward's P; today's launches from gpu.walk_blocks / walk_stages) on the same random arrays: errors of every output
relative to the Triton ones (max|a-b| / max|b|), then ms of each at 1 x 4096, 1 x 16384, 8 x 4096 (Hk 16, Hv 32,
d 128, bf16), the Mosaic walks with one and with two warpgroups a program. Each warpgroup takes 64 value columns: 32
would need a 64-byte swizzle, which wgmma cannot pair with the [C, C] tiles' 128 bytes, and one warpgroup's 128
columns exceed the shared memory.

GPU:  PYTHONPATH=src:benchmarks python3 benchmarks/gated_delta_rule_mosaic_walks.py
CPU, lowering for CUDA only (jax-cuda12-plugin of the same version as jax on the path, see kernel_registers.py):
  JAX_PLATFORMS=cpu PYTHONPATH=/tmp/cudasite:src python3 benchmarks/gated_delta_rule_mosaic_walks.py --lower
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.gpu_mosaic_walks import C, forward_walk, reverse_walk


def random_inputs(batch=1, length=4096, key_heads=16, heads=32, dim=128, seed=0):
  keys = jax.random.split(jax.random.key(seed), 8)
  chunks = length // C
  bf = jnp.bfloat16
  normal = lambda key, shape, s=1.0: (s * jax.random.normal(key, shape)).astype(bf)
  gc = jnp.cumsum(-0.05 * jax.random.uniform(keys[2], (batch, heads, chunks, C)), axis=-1).reshape(batch, heads, -1)
  beta = jax.random.uniform(keys[3], (batch, heads, length))
  tri = jnp.tril(jnp.ones((C, C)), -1)
  t = (jnp.eye(C) + 0.1 * tri * jax.random.normal(keys[4], (batch, heads, chunks, C, C))).astype(bf)
  p = (0.1 * jnp.tril(jnp.ones((C, C))) * jax.random.normal(keys[5], (batch, heads, chunks, C, C))).astype(bf)
  keys_shape = (batch, length, key_heads, dim)
  q, k = normal(keys[0], keys_shape, dim**-0.5), normal(keys[1], keys_shape, dim**-0.5)
  d_out = normal(keys[6], (batch, length, heads, dim))
  d_final = 0.1 * jax.random.normal(keys[7], (batch, heads, dim, dim))
  return q, k, t, gc, beta, d_out, p, d_final


def forward_inputs(batch=1, length=4096, key_heads=16, heads=32, dim=128, seed=1):
  """(q, k, v, gc, beta, t, p, h0) for the forward walk, from the reverse walk's generator (d_out stands for v)."""
  q, k, t, gc, beta, v, p, h0 = random_inputs(batch, length, key_heads, heads, dim, seed)
  return q, k, v, gc, beta, t, p, h0


def triton_forward_walk(q, k, v, gc, beta, t, p, h0, *, scale, groups):
  """gpu.py's fused forward walk (walk_output_kernel without w, saving the history, ChunkedLaunch()'s launch)."""
  from maxtext.kernels.gated_delta_rule import gpu_fused
  from maxtext.kernels.gated_delta_rule.gpu import ChunkedLaunch, walk_blocks, walk_stages
  from maxtext.kernels.gated_delta_rule.gpu_precision import matmul_mode
  from maxtext.kernels.triton_compat import TritonParams
  launch = ChunkedLaunch()
  batch, length, heads, dim = v.shape
  _, store, mm = matmul_mode((q, v), None, False)
  block_v, _ = walk_blocks(launch, batch, heads, dim, store)
  chunks = length // C
  kernel = functools.partial(gpu_fused.walk_output_kernel, chunk=C, groups=groups, num_chunks=chunks,
                             block_v=block_v, scale=scale, segmented=False, save=True, with_w=False, mm=mm)
  return pl.pallas_call(
      kernel, grid=(dim // block_v, heads, batch), name="gdr_walk_fwd",
      out_shape=(jax.ShapeDtypeStruct((batch, length, heads, dim), v.dtype),
                 jax.ShapeDtypeStruct((batch, heads, dim, dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, chunks, dim, dim), store),
                 jax.ShapeDtypeStruct((batch, length, heads, dim), store)),
      compiler_params=TritonParams(num_warps=launch.walk_warps, num_stages=walk_stages(launch, store, block_v)),
  )(q, k, v, gc, beta, t, p, h0)


def triton_reverse_walk(q, k, t, gc, beta, d_out, p, d_final, *, scale, groups):
  """gpu.py's reverse walk (state_grad_kernel with P, ChunkedLaunch()'s launch) on the same arrays."""
  from maxtext.kernels.gated_delta_rule import gpu_kernels
  from maxtext.kernels.gated_delta_rule.gpu import ChunkedLaunch, walk_blocks, walk_stages
  from maxtext.kernels.gated_delta_rule.gpu_precision import matmul_mode
  from maxtext.kernels.triton_compat import TritonParams
  launch = ChunkedLaunch()
  batch, length, heads, dim = d_out.shape
  _, store, mm = matmul_mode((q, d_out), None, False)
  _, block_v = walk_blocks(launch, batch, heads, dim, store)
  chunks = length // C
  kernel = functools.partial(gpu_kernels.state_grad_kernel, chunk=C, groups=groups, num_chunks=chunks,
                             block_v=block_v, scale=scale, segmented=False, mm=mm, local_from_scores=True)
  return pl.pallas_call(
      kernel, grid=(dim // block_v, heads, batch), name="gdr_state_bwd",
      out_shape=(jax.ShapeDtypeStruct((batch, length, heads, dim), store),
                 jax.ShapeDtypeStruct((batch, heads, chunks, dim, dim), store),
                 jax.ShapeDtypeStruct((batch, heads, dim, dim), jnp.float32)),
      compiler_params=TritonParams(num_warps=launch.reverse_walk_warps or launch.walk_warps,
                                   num_stages=walk_stages(launch, store, block_v, reverse=True)),
  )(q, k, t, gc, beta, d_out, p, d_final)


# name -> (ours, Triton's, inputs, output names)
WALKS = {"forward": (forward_walk, triton_forward_walk, forward_inputs, ("o", "final", "states", "v_new")),
         "reverse": (reverse_walk, triton_reverse_walk, random_inputs, ("dv_new", "d_states", "dh0"))}


def main() -> None:
  scale, groups = 128**-0.5, 2
  if "--lower" in sys.argv:
    for name, (ours, _, inputs, _) in WALKS.items():
      args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs(length=256, key_heads=2, heads=4))
      for warpgroups in (1, 2):
        lowered = jax.jit(functools.partial(ours, scale=scale, groups=groups, warpgroups=warpgroups)).trace(
            *args).lower(lowering_platforms=("cuda",))
        print(f"{name} walk, {warpgroups} warpgroups, lowered:", len(lowered.as_text()), "characters", flush=True)
    return
  from gated_delta_rule import time_against  # benchmarks/
  for batch, length in ((1, 4096), (1, 16384), (8, 4096)):
    for name, (ours, triton, inputs, outputs) in WALKS.items():
      candidates = {f"mosaic_{n}wg": jax.jit(functools.partial(ours, scale=scale, groups=groups, warpgroups=n))
                    for n in (1, 2)}
      time_against(f"{batch}x{length} {name} walk", jax.jit(functools.partial(triton, scale=scale, groups=groups)),
                   candidates, inputs(batch, length), ", ".join(outputs))

if __name__ == "__main__":
  main()
