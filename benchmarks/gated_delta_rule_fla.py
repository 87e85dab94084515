"""The peer side of benchmarks/gated_delta_rule.py: fla's chunk_gated_delta_rule (PyTorch + Triton), timed on the
same inputs. Run by that script in a subprocess (so PyTorch and JAX never share the GPU); usable alone.

Usage: python benchmarks/gated_delta_rule_fla.py --shapes 1x4096,8x4096 --json fla.json [--save-check check.npz]
fla 0.6.0 refuses its gated backward on Hopper with Triton < 3.7.1 (fla issue #640); --lift-hopper-guard lifts it
for timings only: gradients from such a run are not trusted.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def make_inputs(batch: int, length: int, key_heads: int, value_heads: int, dim: int, seed: int = 0,
                decay_scale: float = 1.0) -> dict[str, np.ndarray]:
  """float32 numpy inputs shared by both frameworks (each rounds q, k, v, beta to bf16 the same way).

  g = -decay_scale * softplus(normal): log decays as the anchors in shared/bench used; a small decay_scale keeps
  the state alive over many chunks (a harder accuracy check).
  """
  rng = np.random.default_rng(seed)
  normal = lambda *dims: rng.standard_normal(dims, dtype=np.float32)
  return dict(
      q=normal(batch, length, key_heads, dim), k=normal(batch, length, key_heads, dim),
      v=normal(batch, length, value_heads, dim),
      g=(-decay_scale * np.logaddexp(0, normal(batch, length, value_heads))).astype(np.float32),
      beta=(1 / (1 + np.exp(-normal(batch, length, value_heads)))).astype(np.float32),
      h0=normal(batch, value_heads, dim, dim),
      d_out=normal(batch, length, value_heads, dim), d_state=normal(batch, value_heads, dim, dim),
  )


def parse_shape(text: str) -> tuple[int, int]:
  batch, length = text.lower().split("x")
  return int(batch), int(length)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="1x4096,1x16384,1x65536,8x4096", help="BxT, comma separated")
  parser.add_argument("--key-heads", type=int, default=16)
  parser.add_argument("--value-heads", type=int, default=32)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--json", required=True, help="where to write the timings")
  parser.add_argument("--save-check", help="npz of outputs and gradients (with an initial state) at the first shape")
  parser.add_argument("--lift-hopper-guard", action="store_true")
  args = parser.parse_args()

  import torch
  import triton
  import triton.testing

  import fla
  if args.lift_hopper_guard:
    import fla.ops.common.chunk_o as chunk_o
    chunk_o.TRITON_ABOVE_3_7_1 = True
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule

  result = dict(torch=torch.__version__, triton=triton.__version__, fla=getattr(fla, "__version__", "?"),
                device=torch.cuda.get_device_name(), guard_lifted=args.lift_hopper_guard, rows=[])
  bench = lambda fn, grads=(): triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads),
                                                      return_mode="median")
  for index, text in enumerate(args.shapes.split(",")):
    batch, length = parse_shape(text)
    x = make_inputs(batch, length, args.key_heads, args.value_heads, args.dim)
    cuda = lambda name, dtype: torch.from_numpy(x[name]).cuda().to(dtype).requires_grad_()
    q, k, v, beta = (cuda(name, torch.bfloat16) for name in ("q", "k", "v", "beta"))
    g, h0 = cuda("g", torch.float32), cuda("h0", torch.float32)
    d_out = torch.from_numpy(x["d_out"]).cuda().bfloat16()
    d_state = torch.from_numpy(x["d_state"]).cuda()
    run = lambda: chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         use_qk_l2norm_in_kernel=True)

    def run_backward():
      torch.autograd.backward(run(), (d_out, d_state))

    leaves = (q, k, v, g, beta, h0)
    row = dict(batch=batch, length=length, fwd_ms=bench(run), fwd_bwd_ms=bench(run_backward, leaves))
    print("fla", row, flush=True)
    result["rows"].append(row)
    if index == 0 and args.save_check:
      for t in leaves:
        t.grad = None
      out, final = run()
      ((out.float() * d_out.float()).sum() + (final * d_state).sum()).backward()
      as_numpy = lambda t: t.detach().float().cpu().numpy()
      np.savez(args.save_check, o=as_numpy(out), final=as_numpy(final),
               **{f"d{name}": as_numpy(t.grad) for name, t in zip(("q", "k", "v", "g", "beta", "h0"), leaves)})
    del q, k, v, g, beta, h0, d_out, d_state, leaves
    torch.cuda.empty_cache()
    with open(args.json, "w") as f:  # after every shape: a run stopped later keeps these
      json.dump(result, f, indent=1)

if __name__ == "__main__":
  main()
