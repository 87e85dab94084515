"""MoE on a GPU: our grouped matmul and MoE layer against torch._grouped_mm, in one process and one run.

Usage: python benchmarks/moe.py [--tokens 8192,32768] [--variants] [--no-tokamax] [--autotune] [--no-layer]
           [--markdown out.md] [--json out.json] [--quick]
1. Grouped matmul, 512 experts [2048 -> 512], rows = tokens * top-10, group sizes drawn as in
   /work/shared/bench (Dirichlet(2) shares): ours (impl='gpu', our Pallas Triton kernels), tokamax (if importable;
   with --autotune tuned for the shape first; through our custom vjp and with tokamax's own vjp), and
   torch._grouped_mm, each checked against torch (forward, d_lhs, d_rhs), then timed forward and
   forward+backward. --variants adds other tiles of our kernel, each product (forward, d_lhs, d_rhs) timed alone.
2. The whole MoE layer (router, top-10, dispatch, 3 grouped matmuls, combine, shared expert), bf16 compute with
   float32 master weights (the default config) and with bf16 weights, against the same layer in torch with
   torch._grouped_mm (benchmarks/moe_torch.py) on the same weights and inputs; time per token.
Prints markdown tables last (TFLOP/s counts 2 M K N per product: 1 product forward, 3 forward+backward).
--quick: tiny shapes, a smoke test that runs on a CPU (Pallas in interpret mode; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU with JAX in this process
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.join(os.path.dirname(_HERE), "src")]  # moe_torch and maxtext from this checkout

import numpy as np  # noqa: E402
from timing import time_jax  # noqa: E402

FULL = dict(experts=512, hidden=2048, expert_dim=512, top_k=10)
QUICK = dict(experts=8, hidden=64, expert_dim=32, top_k=2)


def stub_xprof() -> None:
  """tokamax imports xprof (30 MB) at load for its profiler; we time with our own loops, so a stub stands in."""
  import importlib.util
  import tempfile
  if importlib.util.find_spec("tokamax") is None or importlib.util.find_spec("xprof") is not None:
    return
  root = tempfile.mkdtemp(prefix="moe_bench_xprof_stub_")
  os.makedirs(os.path.join(root, "xprof", "cli"))
  for package in ("xprof", os.path.join("xprof", "cli")):
    open(os.path.join(root, package, "__init__.py"), "w").close()
  with open(os.path.join(root, "xprof", "cli", "tools.py"), "w") as f:
    f.write("def get_kernel_stats_tool(*args, **kwargs):\n  raise RuntimeError('xprof is stubbed')\n")
  sys.path.append(root)


def relative_error(ours, reference) -> float:
  ours, reference = (np.asarray(x, np.float32) for x in (ours, reference))
  return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-30))


def group_sizes(rows: int, groups: int, seed: int = 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  sizes = np.floor(rng.dirichlet(np.ones(groups) * 2) * rows).astype(np.int32)
  sizes[-1] += rows - sizes.sum()
  return sizes


def torch_np(t) -> np.ndarray:
  return t.detach().float().cpu().numpy()


# ------------------------------------------------------------------------------------------ grouped matmul


def gmm_candidates(args, sizes) -> dict:
  """name -> (lhs, rhs) -> out, differentiable; ours first."""
  import jax.numpy as jnp
  from maxtext.kernels.grouped_matmul import grouped_matmul, tokamax_gpu
  gs = jnp.asarray(sizes)
  out = {"ours (gpu kernel)": lambda lhs, rhs: grouped_matmul(lhs, rhs, gs, impl="gpu")}
  if not args.no_tokamax and tokamax_gpu.available() and not args.quick:
    import tokamax
    out["tokamax (our vjp)"] = lambda lhs, rhs: grouped_matmul(lhs, rhs, gs, impl="tokamax")
    out["tokamax (own vjp)"] = lambda lhs, rhs: tokamax.ragged_dot(lhs, rhs, gs)
  if args.quick:
    out["reference (ragged_dot)"] = lambda lhs, rhs: grouped_matmul(lhs, rhs, gs, impl="reference")
  return out


def autotuned(name: str, fn, lhs, rhs, d_out, autotune: bool):
  """With autotune, a tokamax candidate runs inside tokamax's autotuning result for these shapes (forward and
  the backward products); otherwise (and for ours) as it is, tokamax with its shipped or default configs."""
  if not (autotune and name.startswith("tokamax")):
    return fn
  import jax
  import tokamax
  start = time.perf_counter()
  tuned = tokamax.autotune(lambda l, r, d: (fn(l, r), jax.vjp(fn, l, r)[1](d)), lhs, rhs, d_out)
  print(f"{name}: autotuned in {time.perf_counter() - start:.0f} s", flush=True)

  def run(*a):
    with tuned:
      return fn(*a)
  return run


def bench_gmm(args, tokens: int, results: list, variants: list) -> None:
  import jax
  import jax.numpy as jnp
  import torch
  import moe_torch

  shape = QUICK if args.quick else FULL
  g, k, n = shape["experts"], shape["hidden"], shape["expert_dim"]
  m = tokens * shape["top_k"]
  sizes = group_sizes(m, g)
  keys = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  rhs = (jax.random.normal(keys[1], (g, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
  d_out = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
  flops = 2.0 * m * k * n

  t_lhs = moe_torch.to_torch(lhs, requires_grad=True)
  t_rhs = moe_torch.expert_weights(rhs, requires_grad=True)
  t_sizes = torch.from_numpy(sizes).to(moe_torch.device())
  t_dout = moe_torch.to_torch(d_out)
  t_out = moe_torch.grouped_mm(t_lhs, t_rhs, t_sizes)
  t_out.backward(t_dout)
  torch_ref = dict(out=torch_np(t_out), d_lhs=torch_np(t_lhs.grad), d_rhs=torch_np(t_rhs.grad))
  with torch.no_grad():
    torch_fwd = moe_torch.time_ms(lambda: moe_torch.grouped_mm(t_lhs, t_rhs, t_sizes))

  def torch_step():
    t_lhs.grad = t_rhs.grad = None
    moe_torch.grouped_mm(t_lhs, t_rhs, t_sizes).backward(t_dout)
  torch_fb = moe_torch.time_ms(torch_step)
  results.append(dict(kind="grouped matmul", rows=m, name="torch._grouped_mm", fwd_ms=torch_fwd, fwdbwd_ms=torch_fb,
                      fwd_tflops=flops / torch_fwd / 1e9, fwdbwd_tflops=3 * flops / torch_fb / 1e9))
  print(results[-1], flush=True)

  for name, fn in gmm_candidates(args, sizes).items():
    row = dict(kind="grouped matmul", rows=m, name=name)
    try:
      fn = autotuned(name, fn, lhs, rhs, d_out, args.autotune)
      row["autotuned"] = args.autotune and name.startswith("tokamax")
      forward = jax.jit(fn)
      vjp = jax.jit(lambda lhs, rhs, d_out: jax.vjp(fn, lhs, rhs)[1](d_out))
      d_lhs, d_rhs = vjp(lhs, rhs, d_out)
      row.update(err_out=relative_error(forward(lhs, rhs), torch_ref["out"]),
                 err_d_lhs=relative_error(d_lhs, torch_ref["d_lhs"]),
                 err_d_rhs=relative_error(d_rhs, torch_ref["d_rhs"]))
      del d_lhs, d_rhs
      row.update(fwd_ms=time_jax(forward, lhs, rhs), fwdbwd_ms=time_jax(vjp, lhs, rhs, d_out))
      row.update(fwd_tflops=flops / row["fwd_ms"] / 1e9, fwdbwd_tflops=3 * flops / row["fwdbwd_ms"] / 1e9,
                 fwd_vs_torch=torch_fwd / row["fwd_ms"], fwdbwd_vs_torch=torch_fb / row["fwdbwd_ms"])
    except Exception:  # noqa: BLE001 - one failing candidate must not lose the others' numbers
      row["error"] = traceback.format_exc()[-1500:]
    results.append(row)
    print({k: v for k, v in row.items()}, flush=True)
  if args.variants:
    variants.extend(tile_variants(lhs, rhs, d_out, sizes, flops, torch_fwd))
  del lhs, rhs, d_out, t_lhs, t_rhs, t_dout, t_out
  torch.cuda.empty_cache() if torch.cuda.is_available() else None


def tile_variants(lhs, rhs, d_out, sizes, flops: float, torch_fwd: float) -> list[dict]:
  """Each product of our kernel alone under other tiles: forward gmm, d_lhs gmm (rhs transposed), d_rhs tgmm."""
  import jax
  import jax.numpy as jnp
  from maxtext.kernels.grouped_matmul.gpu import GpuTiling, gmm_gpu, tgmm_gpu
  gs = jnp.asarray(sizes)
  on_cpu = jax.default_backend() == "cpu"  # interpret mode there (a smoke test)
  gmm_gpu = functools.partial(gmm_gpu, interpret=on_cpu)
  tgmm_gpu = functools.partial(tgmm_gpu, interpret=on_cpu)
  rows = []
  gmm_tiles = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                                        (128, 256, 64, 8, 3), (64, 256, 64, 4, 3), (128, 128, 128, 8, 3),
                                        (64, 64, 64, 4, 4), (128, 64, 64, 4, 4)]]
  tgmm_tiles = [dict(tgmm_block_m=bm, tgmm_block_k=bk, tgmm_block_n=bn, tgmm_num_warps=w, tgmm_num_stages=s)
                for bm, bk, bn, w, s in [(64, 128, 128, 8, 3), (32, 128, 128, 4, 3), (64, 128, 256, 8, 3),
                                         (64, 256, 128, 8, 3), (128, 128, 128, 8, 2), (32, 64, 64, 4, 4)]]
  products = [("forward gmm", gmm_tiles, lambda t: jax.jit(lambda l, r: gmm_gpu(l, r, gs, tiling=t)), (lhs, rhs)),
              ("d_lhs gmm (rhs^T)", gmm_tiles,
               lambda t: jax.jit(lambda d, r: gmm_gpu(d, r, gs, transpose_rhs=True, tiling=t)), (d_out, rhs)),
              ("d_rhs tgmm", tgmm_tiles, lambda t: jax.jit(lambda l, d: tgmm_gpu(l, d, gs, tiling=t)), (lhs, d_out))]
  for product, tiles, build, args in products:
    for tile in tiles:
      row = dict(product=product, rows=lhs.shape[0], tiles=tile)
      try:
        row["ms"] = time_jax(build(GpuTiling(**tile)), *args)
        row["tflops"] = flops / row["ms"] / 1e9
        row["vs_torch_fwd"] = torch_fwd / row["ms"]
      except Exception:  # noqa: BLE001
        row["error"] = traceback.format_exc()[-600:]
      rows.append(row)
      print(row, flush=True)
  return rows


# ------------------------------------------------------------------------------------------------- layer


def bench_layer(args, tokens: int, results: list) -> None:
  import jax
  import jax.numpy as jnp
  import torch
  from flax import linen as nn
  import moe_torch
  from maxtext.layers.moe import SparseMoe
  from maxtext.layers.specs import MoeSpec, Numerics

  shape = QUICK if args.quick else FULL
  spec = MoeSpec(shape["experts"], shape["top_k"], True, shape["expert_dim"], shape["expert_dim"],
                 impl="gpu")
  batch = 1 if tokens <= 8192 else tokens // 8192
  x = jax.random.normal(jax.random.key(1), (batch, tokens // batch, shape["hidden"]), jnp.bfloat16)
  cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.bfloat16)
  boxed = jax.eval_shape(SparseMoe(spec).init, jax.random.key(0), x)
  leaves, tree = jax.tree.flatten(nn.unbox(boxed)["params"])
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [jax.random.normal(key, a.shape, jnp.float32) / np.sqrt(a.shape[-2])
                                     for key, a in zip(keys, leaves)])

  peer = moe_torch.TorchMoe(params, spec.top_k, requires_grad=True)
  t_x, t_cot = moe_torch.to_torch(x, requires_grad=True), moe_torch.to_torch(cotangent)
  with torch.no_grad():
    torch_out = torch_np(peer(t_x))
    torch_fwd = moe_torch.time_ms(lambda: peer(t_x))

  def torch_step():
    for p in peer.parameters() + [t_x]:
      p.grad = None
    peer(t_x).backward(t_cot)
  torch_fb = moe_torch.time_ms(torch_step)
  results.append(dict(kind="MoE layer", tokens=tokens, name="torch (torch._grouped_mm)", fwd_ms=torch_fwd,
                      fwdbwd_ms=torch_fb))
  print(results[-1], flush=True)
  del peer
  for weight_dtype in (jnp.float32, jnp.bfloat16):
    name = f"ours (gpu kernel, {jnp.dtype(weight_dtype).name} weights)"
    row = dict(kind="MoE layer", tokens=tokens, name=name)
    try:
      layer = SparseMoe(spec, Numerics(jnp.bfloat16, weight_dtype))
      p = jax.tree.map(lambda a: a.astype(weight_dtype), params)
      forward = jax.jit(lambda p, x: layer.apply({"params": p}, x)[0])
      step = jax.jit(lambda p, x, c: jax.vjp(lambda p, x: layer.apply({"params": p}, x)[0], p, x)[1](c))
      out = forward(p, x)
      row["err_out_vs_torch"] = relative_error(out, torch_out)
      row["mean_err_vs_torch"] = float(np.abs(np.asarray(out, np.float32) - torch_out).mean()
                                       / np.abs(torch_out).mean())
      del out
      row.update(fwd_ms=time_jax(forward, p, x), fwdbwd_ms=time_jax(step, p, x, cotangent))
      row.update(fwd_vs_torch=torch_fwd / row["fwd_ms"], fwdbwd_vs_torch=torch_fb / row["fwdbwd_ms"])
    except Exception:  # noqa: BLE001
      row["error"] = traceback.format_exc()[-1500:]
    results.append(row)
    print(row, flush=True)
  for row in results:
    if row.get("kind") == "MoE layer" and "fwd_ms" in row and row["tokens"] == tokens:
      row["fwd_us_per_token"] = row["fwd_ms"] * 1e3 / tokens
      row["fwdbwd_us_per_token"] = row["fwdbwd_ms"] * 1e3 / tokens


# ---------------------------------------------------------------------------------------------- report


def fmt(value, spec: str = ".3f") -> str:
  return "-" if value is None else format(value, spec)


def markdown(meta: dict, results: list, variants: list) -> str:
  lines = [f"### MoE: grouped matmul and layer vs torch._grouped_mm ({meta['date']})", "",
           f"{meta['device']}; jax {meta['jax']}, torch {meta['torch']}; tokamax {meta['tokamax']}. "
           f"{meta['shape']}; bf16 operands, float32 accumulation. Ratios: torch time / ours "
           "(> 1: ours faster). Errors: max |ours - torch| / max |torch|.", "",
           "| grouped matmul | rows | fwd ms | fwd TFLOP/s | vs torch | fwd+bwd ms | fwd+bwd TFLOP/s | vs torch "
           "| err out / d_lhs / d_rhs |", "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    if r["kind"] != "grouped matmul":
      continue
    if "error" in r:
      lines.append(f"| {r['name']} | {r['rows']} | failed: {r['error'].strip().splitlines()[-1][:120]} |||||||")
      continue
    errs = "/".join(fmt(r.get(k), ".1e") for k in ("err_out", "err_d_lhs", "err_d_rhs")) if "err_out" in r else "-"
    lines.append(f"| {r['name']} | {r['rows']} | {fmt(r['fwd_ms'])} | {fmt(r['fwd_tflops'], '.0f')} | "
                 f"{fmt(r.get('fwd_vs_torch'), '.2f')} | {fmt(r['fwdbwd_ms'])} | {fmt(r['fwdbwd_tflops'], '.0f')} | "
                 f"{fmt(r.get('fwdbwd_vs_torch'), '.2f')} | {errs} |")
  layer_rows = [r for r in results if r["kind"] == "MoE layer"]
  if layer_rows:
    lines += ["", "| MoE layer | tokens | fwd ms | fwd us/token | vs torch | fwd+bwd ms | fwd+bwd us/token | vs torch "
              "| err vs torch (max / mean) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in layer_rows:
      if "error" in r:
        lines.append(f"| {r['name']} | {r['tokens']} | failed: {r['error'].strip().splitlines()[-1][:120]} "
                     "|||||||")
        continue
      errs = f"{fmt(r.get('err_out_vs_torch'), '.1e')} / {fmt(r.get('mean_err_vs_torch'), '.1e')}"
      lines.append(f"| {r['name']} | {r['tokens']} | {fmt(r['fwd_ms'])} | {fmt(r.get('fwd_us_per_token'), '.4f')} | "
                   f"{fmt(r.get('fwd_vs_torch'), '.2f')} | {fmt(r['fwdbwd_ms'])} | "
                   f"{fmt(r.get('fwdbwd_us_per_token'), '.4f')} | {fmt(r.get('fwdbwd_vs_torch'), '.2f')} | {errs} |")
  if variants:
    lines += ["", "| our kernel, one product | rows | tiles | ms | TFLOP/s | torch fwd / this |",
              "|---|---|---|---|---|---|"]
    for r in variants:
      tiles = ",".join(f"{k.replace('tgmm_', '')}={v}" for k, v in r["tiles"].items())
      lines.append(f"| {r['product']} | {r['rows']} | {tiles} | {fmt(r.get('ms'))} | {fmt(r.get('tflops'), '.0f')} | "
                   f"{fmt(r.get('vs_torch_fwd'), '.2f')} |" if "error" not in r else
                   f"| {r['product']} | {r['rows']} | {tiles} | failed |||")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--tokens", default=None, help="comma-separated token counts (default 8192,32768)")
  parser.add_argument("--variants", action="store_true", help="also time other tiles of our kernel")
  parser.add_argument("--no-tokamax", action="store_true")
  parser.add_argument("--autotune", action="store_true", help="autotune tokamax for these shapes first (minutes)")
  parser.add_argument("--no-layer", action="store_true", help="grouped matmul only")
  parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke test)")
  parser.add_argument("--markdown", help="also write the tables here")
  parser.add_argument("--json", help="write every measured row here")
  args = parser.parse_args()
  tokens = [int(t) for t in (args.tokens or ("64" if args.quick else "8192,32768")).split(",")]

  import jax
  import torch
  from maxtext.kernels.grouped_matmul import tokamax_gpu
  stub_xprof()
  tokamax_version = "not installed"
  if tokamax_gpu.available():
    try:
      import tokamax
      tokamax_version = tokamax.__version__
    except Exception:  # noqa: BLE001 - its rows will carry the error
      tokamax_version = "import failed: " + traceback.format_exc().strip().splitlines()[-1][:200]
      print(traceback.format_exc(), flush=True)
  meta = dict(date=time.strftime("%Y-%m-%d"), device=str(jax.devices()[0].device_kind), jax=jax.__version__,
              torch=torch.__version__, tokamax=tokamax_version)
  shape = QUICK if args.quick else FULL
  meta["shape"] = (f"{shape['experts']} experts [{shape['hidden']} -> {shape['expert_dim']}], "
                   f"top-{shape['top_k']}")
  print(meta, flush=True)
  results, variants = [], []

  def save() -> str:
    text = markdown(meta, results, variants)
    if args.markdown:
      with open(args.markdown, "w") as f:
        f.write(text)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(meta=meta, results=results, variants=variants), f, indent=1)
    return text

  for t in tokens:
    bench_gmm(args, t, results, variants)
    save()
  if not args.no_layer:
    for t in tokens:
      bench_layer(args, t, results)
      save()
  print(save())


if __name__ == "__main__":
  main()
