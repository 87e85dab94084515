"""Chunked gated delta rule on a GPU: ours (impl='gpu') against fla 0.6.0 and the jnp reference, in one run.

Usage: python benchmarks/gated_delta_rule.py [--shapes 1x4096,1x16384,1x65536,8x4096] [--markdown out.md]
           [--docs docs/benchmarks.md] [--no-fla] [--variants]
1. Checks values and gradients (q, k, v, g, beta, initial state) of impl='gpu' against impl='reference' with the
   same bf16 inputs ("vs ref": max|a-b| / max|b|, the target is < 2e-3) and prints the floor that bf16 outputs
   alone impose (the reference's bf16 result against the reference run on the same values in float32).
2. Times forward and forward+backward of ours, fla (PyTorch, in a subprocess: gated_delta_rule_fla.py) and the
   reference; prints a table (ms, tokens/s, ours/fla, reference/ours) and ours per stage.
Shapes: 16 key heads, 32 value heads, head dim 128, chunk 64; q, k, v, beta bf16, g float32 (as fla takes them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

from gated_delta_rule_fla import make_inputs, parse_shape

GRAD_NAMES = ("q", "k", "v", "g", "beta", "h0")


def time_fn(fn: Callable, *args, min_ms: float = 200.0, repeats: int = 5) -> float:
  """Median over `repeats` of the mean ms per call of back-to-back calls filling min_ms (after a warm-up)."""
  import jax
  jax.block_until_ready(fn(*args))  # compile and warm up
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


def run_peer(args, check_path: str) -> dict:
  """fla's timings (and its check outputs at the first shape) from a subprocess; {} if it fails."""
  out_json = os.path.join(tempfile.mkdtemp(prefix="gdn_fla_"), "fla.json")
  command = [sys.executable, os.path.join(os.path.dirname(__file__), "gated_delta_rule_fla.py"),
             "--shapes", args.shapes, "--json", out_json, "--save-check", check_path, "--lift-hopper-guard"]
  try:
    subprocess.run(command, check=True, timeout=args.peer_timeout)
    with open(out_json) as f:
      return json.load(f)
  except (subprocess.SubprocessError, OSError) as error:
    print(f"fla peer failed: {error}", flush=True)
    return {}


class Bench:
  """JAX side: inputs on the device, the functions to time and check, per shape."""

  def __init__(self, args, batch: int, length: int, decay_scale: float = 1.0):
    import jax.numpy as jnp
    x = make_inputs(batch, length, args.key_heads, args.value_heads, args.dim, decay_scale=decay_scale)
    bf16 = lambda name: jnp.asarray(x[name], jnp.bfloat16)
    self.inputs = (bf16("q"), bf16("k"), bf16("v"), jnp.asarray(x["g"]), bf16("beta"))
    self.h0, self.d_state = jnp.asarray(x["h0"]), jnp.asarray(x["d_state"])
    self.d_out = bf16("d_out").astype(jnp.float32)  # the cotangent fla sees too
    self.chunk = args.chunk

  def forward(self, impl: str, **options):
    import jax
    run = self._runner(impl, options)
    return jax.jit(lambda q, k, v, g, beta: run(q, k, v, g, beta, None)[0])

  def forward_backward(self, impl: str, **options):
    import jax
    import jax.numpy as jnp
    run = self._runner(impl, options)
    loss = lambda q, k, v, g, beta, d_out: jnp.sum(run(q, k, v, g, beta, None)[0].astype(jnp.float32) * d_out)
    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    return jax.jit(lambda *a: grad(*a, self.d_out))

  def references(self):
    """values_and_grads of the reference on the bf16 inputs and on the same values in float32 (cached)."""
    import jax.numpy as jnp
    if not hasattr(self, "_references"):
      upcast = tuple(x.astype(jnp.float32) for x in self.inputs)
      self._references = (self.values_and_grads("reference"), self.values_and_grads("reference", inputs=upcast))
    return self._references

  def values_and_grads(self, impl: str, inputs=None, **options):
    """((o, final), grads of a random projection of both w.r.t. q, k, v, g, beta, h0)."""
    import jax
    import jax.numpy as jnp
    run = self._runner(impl, options)

    def loss(q, k, v, g, beta, h0):
      o, final = run(q, k, v, g, beta, h0)
      return jnp.sum(o.astype(jnp.float32) * self.d_out) + jnp.sum(final * self.d_state), (o, final)

    grads, values = jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(
        *(inputs or self.inputs), self.h0)
    return values, grads

  def _runner(self, impl: str, options: dict):
    from maxtext.kernels import gated_delta_rule as gdr
    if not options:
      return lambda q, k, v, g, beta, h0: gdr.chunk_gated_delta_rule(q, k, v, g, beta, h0, chunk_size=self.chunk,
                                                                    impl=impl)
    chunk_options = gdr.ChunkOptions(**options)
    return lambda q, k, v, g, beta, h0: gdr._chunked(
        q, k, v, g, beta, h0, segment_ids=None, chunk_size=self.chunk, use_qk_l2norm=True, scale=None,
        impl=impl, interpret=_on_cpu(), options=chunk_options)


def _on_cpu() -> bool:
  """Pallas kernels run in interpret mode there (a smoke test of this script, not a benchmark)."""
  import jax
  return jax.default_backend() == "cpu"


def errors(ours, reference) -> tuple[float, float]:
  """(max|a-b| / max|b|, ||a-b|| / ||b||), in float32 on the device."""
  import jax.numpy as jnp
  a, b = jnp.asarray(ours, jnp.float32), jnp.asarray(reference, jnp.float32)
  return (float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))),
          float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel())))


def check(bench: Bench, label: str, fla_check: dict | None = None, **options) -> list[dict]:
  """Ours against the reference (same bf16 inputs) and the bf16-output floor; fla's errors where given."""
  (o, final), grads = bench.values_and_grads("gpu", **options)
  ((o_ref, final_ref), grads_ref), ((o_32, final_32), grads_32) = bench.references()
  names = ("o", "final_state") + tuple("d" + n for n in GRAD_NAMES)
  rows = []
  for name, a, b, c in zip(names, (o, final, *grads), (o_ref, final_ref, *grads_ref), (o_32, final_32, *grads_32)):
    row = dict(case=label, name=name, vs_ref=errors(a, b)[0], vs_ref_norm=errors(a, b)[1], floor=errors(b, c)[0])
    if fla_check is not None:
      key = {"o": "o", "final_state": "final"}.get(name, name)
      row["fla_vs_ref"] = errors(fla_check[key], b)[0]
    rows.append(row)
    print(f"  {label:<22}{name:<12} vs ref {row['vs_ref']:.2e} (norm {row['vs_ref_norm']:.2e})  "
          f"bf16 floor {row['floor']:.2e}" + (f"  fla {row['fla_vs_ref']:.2e}" if "fla_vs_ref" in row else ""),
          flush=True)
  return rows


def stage_timings(bench: Bench, **options) -> dict[str, float]:
  """ms of each stage of ours: prepare_chunks fwd/bwd (XLA), the inter-chunk kernels fwd/bwd (Pallas)."""
  import jax
  import jax.numpy as jnp
  from maxtext.kernels import gated_delta_rule as gdr
  from maxtext.kernels.gated_delta_rule.chunking import prepare_chunks
  from maxtext.kernels.gated_delta_rule.gpu import inter_chunk_backward_gpu, inter_chunk_forward_gpu
  q, k, v, g, beta = bench.inputs
  chosen = gdr._options("gpu", q, k, v) if not options else gdr.ChunkOptions(**options)

  def prepare(q, k, v, g, beta):
    chunks = prepare_chunks(q, k, v, g, beta, chunk_size=bench.chunk, solve=chosen.solve, precision=chosen.precision)
    cast = lambda x: x.astype(chosen.operand_dtype)
    return chunks._replace(q=cast(chunks.q), k=cast(chunks.k), w=cast(chunks.w), u=cast(chunks.u),
                           intra=cast(chunks.intra))

  chunks, prepare_vjp = jax.vjp(prepare, *bench.inputs)
  h0 = jnp.zeros_like(bench.h0)
  forward = jax.jit(lambda *a: inter_chunk_forward_gpu(*a, interpret=_on_cpu()))
  result = forward(*chunks, h0)
  d_out = jnp.ones_like(result.out) * 0.01
  backward_args = (chunks.q, chunks.k, chunks.w, chunks.intra, chunks.decay, result.states, result.v_new, d_out,
                   jnp.zeros_like(h0))
  d_chunks = jax.tree.map(lambda x: jnp.full_like(x, 0.01), chunks)
  return {
      "prepare fwd": time_fn(jax.jit(prepare), *bench.inputs),
      "kernel fwd": time_fn(forward, *chunks, h0),
      "kernel bwd": time_fn(jax.jit(lambda *a: inter_chunk_backward_gpu(*a, interpret=_on_cpu())), *backward_args),
      "prepare bwd": time_fn(jax.jit(lambda f, d: f(d)), prepare_vjp, d_chunks),
  }


def markdown(meta: dict, rows: list[dict], stages: dict, checks: list[dict], variants: list[dict]) -> str:
  lines = [f"## Gated delta rule, chunked: ours (Pallas GPU) vs fla {meta.get('fla', '?')} vs jnp reference "
           f"({meta['date']})", "",
           f"Device {meta['device']}; jax {meta['jax']}, torch {meta.get('torch', '-')}, triton "
           f"{meta.get('triton', '-')}, fla {meta.get('fla', '-')}. Hk=16, Hv=32, Dk=Dv=128, chunk 64; q, k, v, beta "
           "bf16, g float32. fwd+bwd = gradients w.r.t. q, k, v, g, beta. fla's backward ran with its Hopper guard "
           "lifted (timing only). Median ms; tokens/s from fwd+bwd.", "",
           "| B x T | ours fwd | ours fwd+bwd | fla fwd | fla fwd+bwd | ref fwd | ref fwd+bwd | ours Mtok/s "
           "| ours/fla fwd | ours/fla fwd+bwd | ref/ours fwd | ref/ours fwd+bwd |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda x: "-" if x is None else f"{x:.2f}"
  ratio = lambda a, b: None if a is None or b is None else a / b
  for r in rows:
    lines.append(f"| {r['batch']} x {r['length']} | {fmt(r['ours_fwd'])} | {fmt(r['ours_fwd_bwd'])} | "
                 f"{fmt(r.get('fla_fwd'))} | {fmt(r.get('fla_fwd_bwd'))} | {fmt(r.get('ref_fwd'))} | "
                 f"{fmt(r.get('ref_fwd_bwd'))} | {fmt(ratio(r['batch'] * r['length'] / 1e3, r['ours_fwd_bwd']))} | "
                 f"{fmt(ratio(r['ours_fwd'], r.get('fla_fwd')))} | {fmt(ratio(r['ours_fwd_bwd'], r.get('fla_fwd_bwd')))} | "
                 f"{fmt(ratio(r.get('ref_fwd'), r['ours_fwd']))} | {fmt(ratio(r.get('ref_fwd_bwd'), r['ours_fwd_bwd']))} |")
  if stages:
    lines += ["", "Ours per stage (ms, each timed alone):", "", "| B x T | " + " | ".join(next(iter(stages.values())))
              + " |", "|---|" + "---|" * len(next(iter(stages.values())))]
    for shape, st in stages.items():
      lines.append(f"| {shape} | " + " | ".join(f"{x:.2f}" for x in st.values()) + " |")
  if checks:
    lines += ["", "Accuracy, max|a-b| / max|b| against impl='reference' on the same bf16 inputs (floor: the "
              "reference's own bf16 outputs against it run in float32):", "",
              "| case | tensor | ours vs ref | (norm) | bf16 floor | fla vs ref |", "|---|---|---|---|---|---|"]
    for c in checks:
      fla = f"{c['fla_vs_ref']:.1e}" if "fla_vs_ref" in c else "-"
      lines.append(f"| {c['case']} | {c['name']} | {c['vs_ref']:.1e} | {c['vs_ref_norm']:.1e} | {c['floor']:.1e} "
                   f"| {fla} |")
  if variants:
    lines += ["", f"Variants of ours at {meta['variants_shape']} (ms; worst max-relative error over outputs and "
              "gradients):", "",
              "| variant | fwd | fwd+bwd | worst error |", "|---|---|---|---|"]
    for v in variants:
      lines.append(f"| {v['name']} | {fmt(v.get('fwd'))} | {fmt(v.get('fwd_bwd'))} | {v.get('error', '-')} |")
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
  parser.add_argument("--variants", action="store_true", help="also time and check variants of ours")
  parser.add_argument("--variants-shape", default="1x16384")
  parser.add_argument("--peer-timeout", type=float, default=300)
  parser.add_argument("--markdown", help="write the result section here")
  parser.add_argument("--json", help="write all numbers here")
  parser.add_argument("--docs", help="append the result section to this file (e.g. docs/benchmarks.md)")
  parser.add_argument("--date", default=datetime.date.today().isoformat())
  args = parser.parse_args()

  check_path = os.path.join(tempfile.mkdtemp(prefix="gdn_check_"), "fla_check.npz")
  peer = {} if args.no_fla else run_peer(args, check_path)  # before JAX takes the GPU
  import jax
  import numpy as np
  meta = dict(date=args.date, device=jax.devices()[0].device_kind, jax=jax.__version__, variants_shape=args.variants_shape,
              **{key: peer[key] for key in ("torch", "triton", "fla") if key in peer})
  print(meta, flush=True)
  fla_rows = {(r["batch"], r["length"]): r for r in peer.get("rows", [])}
  rows, stages, checks, variants = [], {}, [], []
  for index, text in enumerate(args.shapes.split(",")):
    batch, length = parse_shape(text)
    fla_row = fla_rows.get((batch, length), {})
    row = dict(batch=batch, length=length, ours_fwd=None, ours_fwd_bwd=None, fla_fwd=fla_row.get("fwd_ms"),
               fla_fwd_bwd=fla_row.get("fwd_bwd_ms"))
    try:  # a failure at one shape must not lose the others' numbers
      bench = Bench(args, batch, length)
      fla_check = dict(np.load(check_path)) if index == 0 and os.path.exists(check_path) else None
      checks += check(bench, f"{batch}x{length}", fla_check)
      del bench._references  # free the device memory before timing
      row.update(ours_fwd=time_fn(bench.forward("gpu"), *bench.inputs),
                 ours_fwd_bwd=time_fn(bench.forward_backward("gpu"), *bench.inputs))
      stages[f"{batch} x {length}"] = stage_timings(bench)
      if not args.no_reference:
        row.update(ref_fwd=time_fn(bench.forward("reference"), *bench.inputs),
                   ref_fwd_bwd=time_fn(bench.forward_backward("reference"), *bench.inputs))
      del bench
    except Exception:
      traceback.print_exc()
    rows.append(row)
    print(row, stages.get(f"{batch} x {length}"), flush=True)
  try:
    checks += check(Bench(args, 1, 4096, decay_scale=0.02), "1x4096 slow decay")  # state lives over many chunks
    if args.variants:
      variants = run_variants(args)
  except Exception:
    traceback.print_exc()
  section = markdown(meta, rows, stages, checks, variants)
  print(section, flush=True)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(section)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, rows=rows, stages=stages, checks=checks, variants=variants), f, indent=1)
  if args.docs:
    with open(args.docs, "a") as f:
      f.write("\n" + section)


def run_variants(args) -> list[dict]:
  """Ours with other prepare_chunks choices: what each choice costs and gains."""
  import jax
  import jax.numpy as jnp
  bench = Bench(args, *parse_shape(args.variants_shape))
  highest, default = jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT
  choices = {
      "inverse, TF32, bf16 operands": dict(solve="inverse", precision=default, operand_dtype=jnp.bfloat16),
      "solve_triangular, TF32, bf16 operands": dict(solve="solve_triangular", precision=default,
                                                     operand_dtype=jnp.bfloat16),
      "inverse, f32 matmuls, bf16 operands": dict(solve="inverse", precision=highest, operand_dtype=jnp.bfloat16),
      "inverse, f32 matmuls, f32 operands": dict(solve="inverse", precision=highest, operand_dtype=jnp.float32),
  }
  results = []
  for name, options in choices.items():
    entry = dict(name=name)
    try:
      entry["fwd"] = time_fn(bench.forward("gpu", **options), *bench.inputs)
      entry["fwd_bwd"] = time_fn(bench.forward_backward("gpu", **options), *bench.inputs)
      worst = check(bench, name, **options)
      entry["error"] = f"{max(r['vs_ref'] for r in worst):.1e}"
      entry["stages"] = stage_timings(bench, **options)
    except Exception as error:  # a variant that fails to compile must not stop the others
      entry["error"] = f"FAILED: {type(error).__name__}: {str(error)[:300]}"
    print(entry, flush=True)
    results.append(entry)
  return results


if __name__ == "__main__":
  main()
