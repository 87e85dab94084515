"""The Gated DeltaNet's causal depthwise conv + SiLU on a GPU: our Pallas kernels (impl='gpu') against XLA.

Usage: python benchmarks/causal_conv.py [--shapes 1x4096x8192,1x16384x8192] [--width 4] [--dtype bfloat16]
                                        [--packed] [--tilings]
Rows per shape:
  xla_old    the layer's former jnp formula, silu(sum_i shift_i(x) * kernel[i]), differentiated by XLA (its kernel
             gradient reduces over tokens in bf16)
  reference  reference.py: the same forward in float32, the hand-written backward with float32 sums
  gpu        gpu.py's forward and backward kernels (with --tilings, also a few other tile sizes)
fwd: y = conv + silu; fwd+bwd: y and (dx, dkernel) for a random cotangent. ms from time_jax (benchmarks/timing.py).
floor: the HBM bytes each must move (fwd: read x, write y; fwd+bwd adds read x, dy, write dx) at 4.8 TB/s (H200).
Each impl's outputs are checked against the reference first. On a CPU the kernels run in interpret mode: smoke test
only, e.g. --shapes 1x64x256.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from timing import time_jax

HBM_BYTES_PER_MS = 4.8e9  # H200: 4.8 TB/s
TILINGS = {  # name -> ConvTiling fields (the default first)
    "gpu": {},
    "gpu_fwd32x256": dict(block_t=32, block_c=256),
    "gpu_fwd128x64": dict(block_t=128, block_c=64, num_warps=8),
    "gpu_bwd16x128": dict(backward_block_t=16, backward_block_c=128, backward_num_warps=4),
    "gpu_bwd64x64": dict(backward_block_t=64, backward_block_c=64, backward_num_warps=8),
    "gpu_bwd16x256": dict(backward_block_t=16, backward_block_c=256, backward_num_warps=4),
    "gpu_bwd16x64": dict(backward_block_t=16, backward_block_c=64, backward_num_warps=2),
    "gpu_bwd32x128w4": dict(backward_block_t=32, backward_block_c=128, backward_num_warps=4),
    "gpu_fwd128x64_bwd16x128": dict(block_t=128, block_c=64, num_warps=8, backward_block_t=16,
                                    backward_block_c=128, backward_num_warps=4),
}


def xla_old(x, kernel, segment_ids, activation):
  """The layer's formula before kernels/causal_conv: shifted multiply-adds in x's dtype, then silu."""
  import jax
  import jax.numpy as jnp

  width, length = kernel.shape[0], x.shape[1]
  padded = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
  if segment_ids is None:
    out = sum(padded[:, i : i + length] * kernel[i] for i in range(width))
  else:
    padded_ids = jnp.pad(segment_ids, ((0, 0), (width - 1, 0)), constant_values=-1)
    same = lambda i: (padded_ids[:, i : i + length] == segment_ids)[..., None].astype(x.dtype)
    out = sum(padded[:, i : i + length] * same(i) * kernel[i] for i in range(width))
  return jax.nn.silu(out) if activation == "silu" else out


def implementations(tilings: bool) -> dict:
  from maxtext.kernels import dispatch
  from maxtext.kernels.causal_conv import causal_conv_reference
  from maxtext.kernels.causal_conv.gpu import ConvTiling, causal_conv_gpu

  interpret = dispatch.backend() == "cpu"
  # The reference first: the others are checked against it.
  impls = {"reference": causal_conv_reference, "xla_old": xla_old}
  for name, fields in TILINGS.items():
    if name == "gpu" or tilings:
      tiling = dataclasses.replace(ConvTiling(), **fields)
      impls[name] = (lambda tiling: lambda *a: causal_conv_gpu(*a, tiling=tiling, interpret=interpret))(tiling)
  return impls


def bench_shape(batch: int, length: int, channels: int, args) -> list[dict]:
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  dtype = jnp.dtype(args.dtype)
  x = jnp.asarray(rng.standard_normal((batch, length, channels)), dtype)
  kernel = jnp.asarray(rng.standard_normal((args.width, channels)) * 0.3, dtype)
  dy = jnp.asarray(rng.standard_normal((batch, length, channels)), dtype)
  ids = None
  if args.packed:  # documents of 1000 tokens
    ids = jnp.asarray(np.arange(length)[None].repeat(batch, 0) // 1000, jnp.int32)
  rows, checked = [], None
  for name, conv in implementations(args.tilings).items():
    forward = jax.jit(lambda x, kernel, conv=conv: conv(x, kernel, ids, "silu"))

    def both(x, kernel, dy, conv=conv):
      y, vjp = jax.vjp(lambda x, kernel: conv(x, kernel, ids, "silu"), x, kernel)
      return (y, *vjp(dy))

    both = jax.jit(both)
    outputs = [np.asarray(o, np.float32) for o in both(x, kernel, dy)]
    if checked is None:
      checked = outputs
    errors = [float(np.abs(o - c).max() / np.abs(c).max()) for o, c in zip(outputs, checked)]
    rows.append(dict(shape=f"{batch}x{length}x{channels}", impl=name, fwd_ms=time_jax(forward, x, kernel),
                     fwd_bwd_ms=time_jax(both, x, kernel, dy), err_y=errors[0], err_dx=errors[1],
                     err_dkernel=errors[2]))
    print(rows[-1], flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="1x4096x8192,1x16384x8192",
                      type=lambda s: [tuple(int(d) for d in shape.split("x")) for shape in s.split(",")],
                      help="BxTxC, comma separated")
  parser.add_argument("--width", type=int, default=4)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--packed", action="store_true", help="segment ids: documents of 1000 tokens")
  parser.add_argument("--tilings", action="store_true", help="also time the tile sizes in TILINGS")
  args = parser.parse_args()
  itemsize = np.dtype(args.dtype).itemsize if args.dtype != "bfloat16" else 2
  print("| shape BxTxC | impl | fwd ms | fwd+bwd ms | fwd vs xla_old | fwd+bwd vs xla_old | HBM floor fwd / fwd+bwd"
        " ms | max rel err vs reference (y, dx, dkernel) |")
  print("|---|---|---|---|---|---|---|---|")
  for batch, length, channels in args.shapes:
    rows = bench_shape(batch, length, channels, args)
    tensor_bytes = batch * length * channels * itemsize
    floor_fwd, floor_both = 2 * tensor_bytes / HBM_BYTES_PER_MS, 5 * tensor_bytes / HBM_BYTES_PER_MS
    old = next(r for r in rows if r["impl"] == "xla_old")
    for r in rows:
      print(f"| {r['shape']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} "
            f"| {old['fwd_ms'] / r['fwd_ms']:.2f}x | {old['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x "
            f"| {floor_fwd:.3f} / {floor_both:.3f} "
            f"| {r['err_y']:.1e}, {r['err_dx']:.1e}, {r['err_dkernel']:.1e} |")


if __name__ == "__main__":
  main()
