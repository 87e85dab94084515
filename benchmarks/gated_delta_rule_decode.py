"""Decode step of the gated delta rule on a GPU: ours (recurrent_gated_delta_rule, impl='gpu') against fla 0.6.0's
fused_recurrent_gated_delta_rule, one token per row from a carried float32 state, batch 1..256.

Usage: python benchmarks/gated_delta_rule_decode.py [--batches 1,8,32,64,128,256] [--no-fla] [--json out.json]
fla runs first in a subprocess (`--fla-side`, PyTorch alone on the GPU, triton.testing.do_bench median); ours then
under JAX (time_jax, benchmarks/timing.py). Both: Hk 16, Hv 32, d 128, bf16 q, k, v, beta, float32 g and state,
qk l2-norm in the op. Ours' output and state are checked against the jnp reference on the same inputs first.
Ours is timed twice: as a jitted call that keeps its input state (XLA copies it for the kernel's in-place update),
and "in place", the state donated and chained from call to call as a decode loop does (DonatedStateChain).
On a CPU ours runs in interpret mode (smoke test): --batches 1 --no-fla --key-heads 1 --value-heads 2 --dim 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def inputs(batch: int, key_heads: int, value_heads: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  return dict(q=normal(batch, 1, key_heads, dim), k=normal(batch, 1, key_heads, dim),
              v=normal(batch, 1, value_heads, dim),
              g=-np.logaddexp(0, normal(batch, 1, value_heads)).astype(np.float32),
              beta=(1 / (1 + np.exp(-normal(batch, 1, value_heads)))).astype(np.float32),
              h0=normal(batch, value_heads, dim, dim))


def fla_side(args) -> None:
  import torch
  import triton.testing
  from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
  rows = {}
  for batch in args.batches:
    x = inputs(batch, args.key_heads, args.value_heads, args.dim)
    cuda = lambda n, dtype: torch.from_numpy(x[n]).cuda().to(dtype)
    q, k, v, beta = (cuda(n, torch.bfloat16) for n in ("q", "k", "v", "beta"))
    g, h0 = cuda("g", torch.float32), cuda("h0", torch.float32)
    run = lambda: fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=h0,
                                                   output_final_state=True, use_qk_l2norm_in_kernel=True)
    rows[batch] = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    print("fla", batch, rows[batch], flush=True)
  with open(args.json_fla, "w") as f:
    json.dump(rows, f)


class DonatedStateChain:
  """Our decode step as a decode loop runs it: the state donated, each call taking the last call's new state, so the
  kernel updates it in place (its state output aliases the input). Without donation, as `ours` is timed, XLA copies
  the state before the kernel to keep the caller's, which moves the state twice."""

  def __init__(self, state):
    import jax
    from maxtext.kernels.gated_delta_rule import recurrent_gated_delta_rule
    self.state = state
    self.step = jax.jit(lambda *a: recurrent_gated_delta_rule(*a, impl="gpu"), donate_argnums=5)

  def __call__(self, q, k, v, g, beta):
    out, self.state = self.step(q, k, v, g, beta, self.state)
    return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", default="1,8,32,64,128,256", type=lambda s: [int(b) for b in s.split(",")])
  parser.add_argument("--key-heads", type=int, default=16)
  parser.add_argument("--value-heads", type=int, default=32)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--no-fla", action="store_true")
  parser.add_argument("--fla-side", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--json-fla", help=argparse.SUPPRESS)
  parser.add_argument("--json", help="write the rows here")
  args = parser.parse_args()
  if args.fla_side:
    fla_side(args)
    return
  fla = {}
  if not args.no_fla:
    path = os.path.join(tempfile.mkdtemp(prefix="gdn_decode_"), "fla.json")
    command = [sys.executable, os.path.abspath(__file__), "--fla-side", "--json-fla", path, "--batches",
               ",".join(map(str, args.batches)), "--key-heads", str(args.key_heads), "--value-heads",
               str(args.value_heads), "--dim", str(args.dim)]
    if subprocess.run(command, timeout=300).returncode == 0:
      with open(path) as f:
        fla = {int(b): ms for b, ms in json.load(f).items()}

  import jax
  import jax.numpy as jnp
  from maxtext.kernels.gated_delta_rule import recurrent_gated_delta_rule, recurrent_gated_delta_rule_reference
  from timing import time_jax
  rows = []
  for batch in args.batches:
    x = inputs(batch, args.key_heads, args.value_heads, args.dim)
    args_dev = [jnp.asarray(x[n], jnp.float32 if n == "g" else jnp.bfloat16) for n in ("q", "k", "v", "g", "beta")]
    h0 = jnp.asarray(x["h0"])
    ours = jax.jit(lambda *a: recurrent_gated_delta_rule(*a, impl="gpu"))
    o, state = ours(*args_dev, h0)
    o_ref, state_ref = recurrent_gated_delta_rule_reference(*(a.astype(jnp.float32) for a in args_dev), h0)
    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
    in_place = DonatedStateChain(jnp.copy(h0))
    row = dict(batch=batch, ours_ms=time_jax(ours, *args_dev, h0), ours_in_place_ms=time_jax(in_place, *args_dev),
               fla_ms=fla.get(batch), o_error=rel(o, o_ref), state_error=rel(state, state_ref))
    rows.append(row)
    print(row, flush=True)
  lines = ["| batch | ours ms | ours in place ms | fla ms | ours / fla | in place / fla | o error | state error |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = lambda ms: f"{ms / r['fla_ms']:.2f}" if r["fla_ms"] else "-"
    fla_ms = f"{r['fla_ms']:.4f}" if r["fla_ms"] else "-"
    lines.append(f"| {r['batch']} | {r['ours_ms']:.4f} | {r['ours_in_place_ms']:.4f} | {fla_ms} | "
                 f"{ratio(r['ours_ms'])} | {ratio(r['ours_in_place_ms'])} | {r['o_error']:.1e} | "
                 f"{r['state_error']:.1e} |")
  print("\n".join(lines), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
