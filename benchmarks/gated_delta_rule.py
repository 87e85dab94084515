"""Chunked gated delta rule on a GPU: ours (impl='gpu') against fla 0.6.0 and the jnp reference, in one run.

Usage: python benchmarks/gated_delta_rule.py [--shapes 1x4096,1x16384,1x65536,8x4096] [--markdown out.md]
           [--json out.json] [--docs docs/benchmarks.md] [--no-fla] [--variants]
1. Checks outputs and gradients (q, k, v, g, beta, initial state) of impl='gpu' against impl='reference' (the
   columns are explained in `check`; the target is < 2e-3 max-relative).
2. Times forward and forward+backward of ours, fla (PyTorch, in a subprocess: gated_delta_rule_fla.py) and the
   reference, all with an initial state and both outputs' cotangents; prints a table (ms, tokens/s, ours/fla,
   reference/ours) and ours per kernel (the profiler's device time of one forward+backward). --variants adds
   ours in the 'tf32' precision mode and other launch parameters (gpu.py's ChunkedLaunch).
On a CPU the Pallas kernels run in interpret mode: a smoke test of this script with tiny shapes, e.g.
  --shapes 1x128 --no-fla --no-reference --key-heads 1 --value-heads 2 --dim 16 --chunk 16
Shapes: 16 key heads, 32 value heads, head dim 128, chunk 64; q, k, v, beta bf16, g float32 (as fla takes them).
JAX compiles everything ahead of time while fla runs alone on the GPU: run with
XLA_FLAGS='--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false' so those compiles never touch the GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import numpy as np

from gated_delta_rule_fla import make_inputs, parse_shape
from timing import time_jax

NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0")


def _on_cpu() -> bool:
  """Pallas kernels run in interpret mode there (a smoke test of this script, not a benchmark)."""
  import jax
  return jax.default_backend() == "cpu"


def variant_options() -> dict[str, dict | None]:
  """Choices of ours to compare (None: the public API's own choice for bf16 inputs)."""
  return {"api": None, "tf32 dots, float32 storage": dict(kernel_precision="tf32")}


def runner(impl: str, chunk: int, options: dict | None) -> Callable:
  """(q, k, v, g, beta, h0) -> (o, final state) through the public API or with explicit ChunkOptions."""
  from maxtext.kernels import gated_delta_rule as gdr
  if options is None:
    return lambda q, k, v, g, beta, h0: gdr.chunk_gated_delta_rule(q, k, v, g, beta, h0, chunk_size=chunk, impl=impl)
  chosen = gdr.ChunkOptions(**options)
  return lambda q, k, v, g, beta, h0: gdr.run_chunked(
      q, k, v, g, beta, h0, segment_ids=None, chunk_size=chunk, use_qk_l2norm=True, scale=None, impl=impl,
      interpret=_on_cpu(), options=chosen)


def grads_fn(run: Callable) -> Callable:
  """jit: (inputs, h0, d_out, d_state) -> ((o, final), grads w.r.t. q, k, v, g, beta, h0) of <o, d_out> +
  <final, d_state>: the check and the forward+backward timing at once."""
  import jax
  import jax.numpy as jnp

  def loss(q, k, v, g, beta, h0, d_out, d_state):
    o, final = run(q, k, v, g, beta, h0)
    return jnp.sum(o.astype(jnp.float32) * d_out) + jnp.sum(final * d_state), (o, final)

  grad = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)
  return jax.jit(lambda inputs, h0, d_out, d_state: grad(*inputs, h0, d_out, d_state)[::-1])


class Bench:
  """One shape: host inputs, their device copies and the compiled functions that check and time it."""

  def __init__(self, args, batch: int, length: int, decay_scale: float = 1.0, label: str | None = None):
    self.batch, self.length, self.chunk = batch, length, args.chunk
    self.label = label or f"{batch}x{length}"
    self.host = make_inputs(batch, length, args.key_heads, args.value_heads, args.dim, decay_scale=decay_scale)
    self.compiled: dict[tuple, Callable] = {}
    self._arrays: dict[bool, tuple] = {}

  def _layout(self, make, upcast: bool):
    """(inputs, h0, d_out, d_state) built by make(name, dtype); q, k, v, beta bf16 unless upcast."""
    import jax.numpy as jnp
    low = jnp.float32 if upcast else jnp.bfloat16
    inputs = tuple(make(n, jnp.float32 if n == "g" else low) for n in ("q", "k", "v", "g", "beta"))
    return inputs, make("h0", jnp.float32), make("d_out", jnp.float32), make("d_state", jnp.float32)

  def specs(self, upcast: bool = False):
    import jax
    return self._layout(lambda n, dtype: jax.ShapeDtypeStruct(self.host[n].shape, dtype), upcast)

  def arrays(self, upcast: bool = False):
    """Device arrays; d_out rounded to bf16 as fla sees it; upcast: q, k, v, beta's bf16 values in float32."""
    import jax.numpy as jnp
    if upcast not in self._arrays:
      rounded = lambda n: jnp.asarray(self.host[n], jnp.bfloat16).astype(jnp.float32) if n in "q k v beta d_out"\
          .split() else jnp.asarray(self.host[n])
      self._arrays[upcast] = self._layout(lambda n, dtype: rounded(n).astype(dtype), upcast)
    return self._arrays[upcast]

  def free(self) -> None:
    self._arrays.clear()

  def add_jobs(self, jobs: list, impl: str, name: str, options: dict | None, timing: bool, f32_options=None):
    """Queue compiles: grads on bf16 inputs (+ forward if timing), grads on upcast inputs with f32_options."""
    run = runner(impl, self.chunk, options)
    jobs.append((self, ("grads", impl, name, False), grads_fn(run), self.specs()))
    if f32_options is not False:
      upcast_run = runner(impl, self.chunk, f32_options if f32_options is not None else options)
      jobs.append((self, ("grads", impl, name, True), grads_fn(upcast_run), self.specs(upcast=True)))
    if timing:
      import jax
      forward = jax.jit(lambda inputs, h0: run(*inputs, h0))
      jobs.append((self, ("fwd", impl, name, False), forward, self.specs()[:2]))

  def call(self, kind: str, impl: str, name: str, upcast: bool = False):
    fn, arrays = self.compiled[(kind, impl, name, upcast)], self.arrays(upcast)
    return fn(*arrays) if kind == "grads" else fn(*arrays[:2])

  def time(self, kind: str, impl: str, name: str) -> float:
    arrays = self.arrays()
    return time_jax(self.compiled[(kind, impl, "api" if impl == "reference" else name, False)],
                   *(arrays if kind == "grads" else arrays[:2]))


def compile_all(jobs: list, workers: int) -> None:
  """AOT-compile every queued function (threads: XLA compiles outside the GIL); failures are kept and reported."""
  def build(job):
    bench, key, fn, specs = job
    start = time.perf_counter()
    try:
      bench.compiled[key] = fn.lower(*specs).compile()
    except Exception as error:
      print(f"compile failed {bench.label} {key}: {type(error).__name__}: {str(error)[:400]}", flush=True)
    return time.perf_counter() - start
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    seconds = list(pool.map(build, jobs))
  print(f"compiled {len(jobs)} functions, {sum(seconds):.0f} s of compile time", flush=True)


def errors(ours, reference) -> tuple[float, float]:
  """(max|a-b| / max|b|, ||a-b|| / ||b||), in float32 on the device."""
  import jax.numpy as jnp
  a, b = jnp.asarray(ours, jnp.float32), jnp.asarray(reference, jnp.float32)
  return (float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))),
          float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel())))


def time_against(label: str, reference: Callable, candidates: dict[str, Callable], args, outputs: str) -> None:
  """Prints each candidate's error per output against the reference's (max|a-b| / max|b|), then every time (ms), one
  line each; a candidate that fails is reported and the others still run. Functions jitted by the caller."""
  want = reference(*args)
  times = {"triton": time_jax(reference, *args)}
  for name, fn in candidates.items():
    try:
      worst = [errors(a, b)[0] for a, b in zip(fn(*args), want)]
      print(f"{label} {name} error vs triton ({outputs}): " + ", ".join(f"{e:.1e}" for e in worst), flush=True)
      times[name] = time_jax(fn, *args)
    except Exception as e:  # pylint: disable=broad-except  # one candidate failing must not hide the others
      print(f"{label} {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
  print(f"{label} ms: " + "  ".join(f"{k} {v:.3f}" for k, v in times.items()), flush=True)


def check(bench: Bench, name: str = "api", fla_check: dict | None = None) -> list[dict]:
  """Ours against the reference, per output and gradient (max|a-b| / max|b| unless marked norm):

  f32:    ours on the same values in float32 with the bf16 path's choices (TF32 etc.), so with float32 outputs,
          against the reference in float32: our arithmetic's error alone (the < 2e-3 target).
  vs ref: ours against the reference, both with bf16 inputs, through the public API. bf16 outputs and gradients
          round at the end: at these sizes a one-ulp flip of one near-maximal element already reads ~4e-3.
  floor:  the reference's own bf16 result against it in float32: what the bf16 output dtype alone costs.
  fla:    fla's result (bf16 where its inputs are) against the reference in float32, to compare with floor.
  """
  flat = lambda result: (*result[0], *result[1])
  results = [flat(bench.call("grads", impl, n, upcast)) for impl, n, upcast in
             (("gpu", name, False), ("gpu", name, True), ("reference", "api", False), ("reference", "api", True))]
  rows = []
  for tensor, a, a32, b, b32 in zip(NAMES, *results):
    row = dict(case=bench.label if name == "api" else name, name=tensor, f32=errors(a32, b32)[0],
               f32_norm=errors(a32, b32)[1], vs_ref=errors(a, b)[0], floor=errors(b, b32)[0])
    if fla_check is not None:
      row["fla"] = errors(fla_check[{"o": "o", "final_state": "final"}.get(tensor, tensor)], b32)[0]
    rows.append(row)
    print(f"  {row['case']:<22}{tensor:<12} f32 {row['f32']:.2e} (norm {row['f32_norm']:.2e})  vs ref "
          f"{row['vs_ref']:.2e}  floor {row['floor']:.2e}" + (f"  fla {row['fla']:.2e}" if "fla" in row else ""),
          flush=True)
  return rows


def kernel_timings(bench: Bench, name: str = "api") -> dict[str, float]:
  """ms per kernel of one forward+backward of ours (profiler device time, mean of 3): our Pallas kernels by
  name, everything else (XLA's l2 norm, cumulative sums, padding and the sums over value heads) as 'XLA ops'."""
  import jax
  from trace_summary import kernel_totals, profile
  log_dir = tempfile.mkdtemp(prefix="gdn_trace_")
  profile(lambda: jax.block_until_ready(bench.call("grads", "gpu", name)), log_dir, repeats=3)
  totals = kernel_totals(log_dir, repeats=3)
  ours = {k.removeprefix("gdr_"): v for k, v in totals.items() if k.startswith("gdr_")}
  return {**ours, "XLA ops": sum(v for k, v in totals.items() if not k.startswith("gdr_"))}


def launch_variants() -> dict[str, object]:
  """Launch parameters of gpu.py's kernels to compare with the defaults."""
  from maxtext.kernels.gated_delta_rule.gpu import ChunkedLaunch
  return {"walk_stages=2": ChunkedLaunch(walk_stages=2), "block_v=64": ChunkedLaunch(block_v=64),
          "grad_warps=8, wy_grad_warps=8": ChunkedLaunch(grad_warps=8, wy_grad_warps=8),
          "grad_block_k=128 (whole key dim)": ChunkedLaunch(grad_block_k=128)}


def add_launch_jobs(bench: Bench, jobs: list) -> None:
  from maxtext.kernels.gated_delta_rule.gpu import chunk_gated_delta_rule_gpu
  for name, launch in launch_variants().items():
    run = lambda q, k, v, g, beta, h0, launch=launch: chunk_gated_delta_rule_gpu(
        q, k, v, g, beta, h0, chunk_size=bench.chunk, launch=launch, interpret=_on_cpu())
    jobs.append((bench, ("grads", "gpu", name, False), grads_fn(run), bench.specs()))


def start_peer(args, json_path: str, check_path: str):
  command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gated_delta_rule_fla.py"),
             "--shapes", args.shapes, "--json", json_path, "--save-check", check_path, "--lift-hopper-guard"]
  return subprocess.Popen(command)


def finish_peer(process, json_path: str, timeout: float) -> dict:
  """fla's results (those of the shapes it finished, if it ran out of time); {} if none."""
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    print(f"fla peer stopped after {timeout:.0f} s", flush=True)
  if not os.path.exists(json_path):
    return {}
  with open(json_path) as f:
    return json.load(f)


def markdown(meta: dict, rows: list[dict], stages: dict, checks: list[dict], variants: list[dict],
             tiles: list[dict]) -> str:
  fmt = lambda x: "-" if x is None else f"{x:.2f}"
  ratio = lambda a, b: None if a is None or b is None else a / b
  lines = [f"## Gated delta rule, chunked: ours (Pallas GPU) vs fla {meta.get('fla', '?')} vs jnp reference "
           f"({meta['date']})", "",
           f"Device {meta['device']}; jax {meta['jax']}, torch {meta.get('torch', '-')}, triton "
           f"{meta.get('triton', '-')} (PyTorch's), fla {meta.get('fla', '-')}; XLA_FLAGS='{meta['xla_flags']}'. "
           "Hk=16, Hv=32, Dk=Dv=128, chunk 64; q, k, v, beta bf16, g float32; all three with an initial state; "
           "fwd+bwd = gradients w.r.t. q, k, v, g, beta and the initial state. fla's backward ran with its Hopper "
           "guard lifted (timing only). Median ms; Mtok/s from ours' fwd+bwd.", "",
           "| B x T | ours fwd | ours fwd+bwd | fla fwd | fla fwd+bwd | ref fwd | ref fwd+bwd | ours Mtok/s "
           "| ours/fla fwd | ours/fla fwd+bwd | ref/ours fwd | ref/ours fwd+bwd |", "|---" * 12 + "|"]
  for r in rows:
    lines.append(" | ".join([f"| {r['batch']} x {r['length']}", *(fmt(r.get(k)) for k in (
        "ours_fwd", "ours_fwd_bwd", "fla_fwd", "fla_fwd_bwd", "ref_fwd", "ref_fwd_bwd")),
        fmt(ratio(r['batch'] * r['length'] / 1e3, r.get('ours_fwd_bwd'))),
        fmt(ratio(r.get('ours_fwd'), r.get('fla_fwd'))), fmt(ratio(r.get('ours_fwd_bwd'), r.get('fla_fwd_bwd'))),
        fmt(ratio(r.get('ref_fwd'), r.get('ours_fwd'))), fmt(ratio(r.get('ref_fwd_bwd'), r.get('ours_fwd_bwd')))])
        + " |")
  if stages:
    keys = list(next(iter(stages.values())))
    lines += ["", "Ours per kernel (ms of one forward+backward, profiler device time; wy = the WY system, state = "
              "the sequential walks, output = o and its gradient's main part; XLA ops = l2 norm, cumsum, padding, "
              "sums over value heads):", "", "| B x T | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {shape} | " + " | ".join(fmt(st.get(k)) for k in keys) + " |" for shape, st in stages.items()]
  if checks:
    lines += ["", "Accuracy, max|a-b| / max|b| against impl='reference' (columns as `check` in "
              "benchmarks/gated_delta_rule.py: f32 = ours with float32 outputs against the reference in float32, "
              "our arithmetic alone; vs ref = both through the API with bf16 inputs and outputs; floor = what bf16 "
              "outputs alone cost the reference; fla = fla against the float32 reference):", "",
              "| case | tensor | f32 | f32 (norm) | vs ref | floor | fla |", "|---" * 7 + "|"]
    lines += [f"| {c['case']} | {c['name']} | {c['f32']:.1e} | {c['f32_norm']:.1e} | {c['vs_ref']:.1e} | "
              f"{c['floor']:.1e} | {c['fla']:.1e} |".replace("| nan |", "| - |") if "fla" in c else
              f"| {c['case']} | {c['name']} | {c['f32']:.1e} | {c['f32_norm']:.1e} | {c['vs_ref']:.1e} | "
              f"{c['floor']:.1e} | - |" for c in checks]
  if variants:
    lines += ["", f"Variants of ours at {meta['variants_shape']} (ms; worst f32 error over outputs and gradients):",
              "", "| variant | fwd | fwd+bwd | worst f32 error |", "|---|---|---|---|"]
    lines += [f"| {v['name']} | {fmt(v.get('fwd'))} | {fmt(v.get('fwd_bwd'))} | {v.get('error', '-')} |"
              for v in variants]
  if tiles:
    lines += ["", f"Other launch parameters at {meta['variants_shape']} (ms of forward+backward; defaults: "
              "gpu.ChunkedLaunch()):", "", "| launch | fwd+bwd |", "|---|---|"]
    lines += [f"| {t['launch']} | {fmt(t.get('fwd_bwd'))} |" + (f" {t['error']}" if "error" in t else "")
              for t in tiles]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="1x4096,1x16384,1x65536,8x4096", help="BxT, comma separated")
  parser.add_argument("--key-heads", type=int, default=16)
  parser.add_argument("--value-heads", type=int, default=32)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--no-fla", action="store_true", help="skip the fla peer")
  parser.add_argument("--no-reference", action="store_true", help="skip timing the jnp reference")
  parser.add_argument("--variants", action="store_true", help="also other choices of ours and kernel tiles")
  parser.add_argument("--variants-shape", default="1x16384")
  parser.add_argument("--peer-timeout", type=float, default=420, help="seconds for fla, its autotuning included")
  parser.add_argument("--compile-workers", type=int, default=8)
  parser.add_argument("--markdown", help="write the result section here")
  parser.add_argument("--json", help="write all numbers here")
  parser.add_argument("--docs", help="append the result section to this file (e.g. docs/benchmarks.md)")
  parser.add_argument("--date", default=datetime.date.today().isoformat())
  args = parser.parse_args()

  scratch = tempfile.mkdtemp(prefix="gdn_bench_")
  peer_json, check_path = os.path.join(scratch, "fla.json"), os.path.join(scratch, "fla_check.npz")
  process = None if args.no_fla else start_peer(args, peer_json, check_path)  # alone on the GPU from here
  import jax
  started = time.perf_counter()
  benches = [Bench(args, *parse_shape(text)) for text in args.shapes.split(",")]
  benches.append(Bench(args, 1, 4096, decay_scale=0.02, label="1x4096 slow decay"))  # state lives long
  api_f32 = dict(kernel_precision="bf16")  # the bf16 path's dots on float32 inputs: our arithmetic alone
  jobs: list = []
  for bench in benches:
    timing = "slow" not in bench.label
    bench.add_jobs(jobs, "gpu", "api", None, timing, f32_options=api_f32)
    bench.add_jobs(jobs, "reference", "api", None, timing and not args.no_reference)
  by_label = {bench.label: bench for bench in benches}
  variant_bench = by_label.get(args.variants_shape) if args.variants else None
  if args.variants and variant_bench is None:
    variant_bench = Bench(args, *parse_shape(args.variants_shape))
    variant_bench.add_jobs(jobs, "reference", "api", None, timing=False)
  variants_to_run = {n: o for n, o in variant_options().items() if o is not None} if variant_bench else {}
  for name, options in variants_to_run.items():
    variant_bench.add_jobs(jobs, "gpu", name, options, timing=True)
  if variant_bench is not None:
    add_launch_jobs(variant_bench, jobs)
  compile_all(jobs, args.compile_workers)
  print(f"inputs and compiles took {time.perf_counter() - started:.0f} s", flush=True)
  peer = finish_peer(process, peer_json, args.peer_timeout) if process else {}
  meta = dict(date=args.date, device=jax.devices()[0].device_kind, jax=jax.__version__,
              variants_shape=args.variants_shape, xla_flags=os.environ.get("XLA_FLAGS", ""),
              **{key: peer[key] for key in ("torch", "triton", "fla") if key in peer})
  print(meta, flush=True)
  fla_rows = {(r["batch"], r["length"]): r for r in peer.get("rows", [])}
  rows, stages, checks, variants, tiles = [], {}, [], [], []

  def save() -> str:  # after every step, so a run stopped later keeps what it measured
    section = markdown(meta, rows, stages, checks, variants, tiles)
    for path, text in ((args.markdown, section),
                       (args.json, json.dumps(dict(meta=meta, rows=rows, stages=stages, checks=checks,
                                                   variants=variants, tiles=tiles), indent=1))):
      if path:
        with open(path, "w") as f:
          f.write(text)
    return section

  for index, bench in enumerate(benches):
    fla_row = fla_rows.get((bench.batch, bench.length), {})
    row = dict(batch=bench.batch, length=bench.length, fla_fwd=fla_row.get("fwd_ms"),
               fla_fwd_bwd=fla_row.get("fwd_bwd_ms"))
    try:  # a failure at one shape must not lose the others' numbers
      fla_check = dict(np.load(check_path)) if index == 0 and os.path.exists(check_path) else None
      checks += check(bench, fla_check=fla_check)
    except Exception:
      traceback.print_exc()
    try:
      if "slow" not in bench.label:
        row.update(ours_fwd=bench.time("fwd", "gpu", "api"), ours_fwd_bwd=bench.time("grads", "gpu", "api"))
        if not args.no_reference:
          row.update(ref_fwd=bench.time("fwd", "reference", "api"),
                     ref_fwd_bwd=bench.time("grads", "reference", "api"))
        rows.append(row)
        print(row, flush=True)
        stages[f"{bench.batch} x {bench.length}"] = kernel_timings(bench)
        print(stages[f"{bench.batch} x {bench.length}"], flush=True)
    except Exception:
      traceback.print_exc()
    save()
    if bench is not variant_bench:
      bench.free()
  for name in variants_to_run:
    entry = dict(name=name)
    try:
      entry.update(fwd=variant_bench.time("fwd", "gpu", name), fwd_bwd=variant_bench.time("grads", "gpu", name))
      entry["error"] = f"{max(r['f32'] for r in check(variant_bench, name)):.1e}"
    except Exception as error:  # a variant that fails to compile or run must not stop the others
      entry["error"] = f"FAILED: {type(error).__name__}: {str(error)[:300]}"
    print(entry, flush=True)
    variants.append(entry)
    save()
  for name in launch_variants() if variant_bench is not None else ():
    entry = dict(launch=name)
    try:
      entry["fwd_bwd"] = variant_bench.time("grads", "gpu", name)
    except Exception as error:
      entry["error"] = f"FAILED: {type(error).__name__}: {str(error)[:200]}"
    print(entry, flush=True)
    tiles.append(entry)
    save()
  section = save()
  print(section, flush=True)
  if args.docs:
    with open(args.docs, "a") as f:
      f.write("\n" + section)


if __name__ == "__main__":
  main()
