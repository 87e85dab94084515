"""Chunked gated delta rule on a GPU: our kernels (one or more gpu.ChunkedLaunch variants) against
jax-linear-attention (`jla`, Pallas Mosaic GPU) and fla (PyTorch + Triton), all in one run on the same inputs.

Usage: python benchmarks/gated_delta_rule_peers.py [--shapes 1x4096,1x16384,1x65536,8x4096]
           [--variants api,split,fused] [--forward-only split] [--no-jla] [--no-fla] [--trace 1x16384]
           [--check-shapes 1x4096]
           [--markdown out.md] [--json out.json] [--docs docs/benchmarks.md]
1. Times forward and forward+backward (gradients w.r.t. q, k, v, g, beta and the initial state, with cotangents
   for the output and the final state) of every variant of ours, of jla and of fla (a subprocess started first,
   alone on the GPU while JAX compiles: gated_delta_rule_fla.py). Median of time_jax (benchmarks/timing.py).
   --forward-only variants (prefill forms, whose backward is another variant's) are timed and checked forward alone.
2. At --check-shapes: each one's output and gradients (bf16 inputs) against the jnp reference run in float32 on
   the same bf16-rounded values, max|a-b| / max|b| (o, and the worst over the final state and the gradients).
3. At --trace: ms per kernel of one forward+backward and of one forward of each JAX implementation (profiler device
   time).
Shapes: 16 key heads, 32 value heads, head dim 128, chunk 64; q, k, v, beta bf16, g float32.
On a CPU the Pallas kernels run in interpret mode (a smoke test of this script, not a benchmark), e.g.
  --shapes 1x128 --check-shapes 1x128 --trace '' --no-fla --no-jla --key-heads 1 --value-heads 2 --dim 16 --chunk 16
On the GPU run with XLA_FLAGS='--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false' (see
gated_delta_rule.py) and jla/fla installed (docs/benchmarks.md gives the command).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import tempfile
import time
import traceback

import numpy as np

from gated_delta_rule import errors, finish_peer, start_peer
from gated_delta_rule_fla import make_inputs, parse_shape
from timing import time_jax

GRAD_NAMES = ("final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0")


def launches() -> dict:
  """Named variants of ours: 'api' is the public entry (impl='gpu', its own launch choice); the others call
  gpu.chunk_gated_delta_rule_gpu with an explicit gpu.ChunkedLaunch."""
  import jax  # noqa: PLC0415 - after the fla subprocess starts, as main's imports
  from maxtext.kernels.gated_delta_rule.gpu import ChunkedLaunch
  w2 = dict(inverse_block=16, parallel_warps=2)  # blocked16_w2's forward (the default on 2026-12-01; 1 warp since)
  whole = dict(inverse_block=None, parallel_warps=4)  # the earlier default: the [C, C] inverse by doubling, 4 warps
  variants = {"api": None, "split": ChunkedLaunch(fused_forward=False, **whole),
              "fused": ChunkedLaunch(fused_forward=True, **whole),
              "fused_w": ChunkedLaunch(fused_forward=True, fused_walk_reads_w=True, **whole),
              "bf16_inverse": ChunkedLaunch(inverse_precision="bf16", **whole),
              "fused_bv64": ChunkedLaunch(fused_forward=True, block_v=64, **whole),
              "fused_w8": ChunkedLaunch(fused_forward=True, walk_warps=8, **whole),
              # gpu_inverse.py: T and P by 16- or 32-wide blocks instead of the [C, C] doubling; 'ieee' runs its small
              # products on the CUDA cores in float32; 2 warps suit the 16 x 16 tiles better (measured: now the default)
              "blocked16": ChunkedLaunch(inverse_block=16, parallel_warps=4),
              "blocked32": ChunkedLaunch(inverse_block=32, parallel_warps=4),
              "blocked16_ieee": ChunkedLaunch(inverse_block=16, inverse_precision="ieee", parallel_warps=4),
              "blocked16_w2": ChunkedLaunch(**w2),
              # gpu_backward.py: one kernel for the backward's parallel part; its launch: grad_warps, grad_block_k/v
              # (key and value columns per step; k >= Dk: one pass), grad_stages (pipelined block loops). Spills per
              # thread as compiled by Triton 3.9 for sm_90 (gpu_backward.py), in order from fusedbwd_w2: ~0.2 KB, 16 B,
              # 72 B, none, 32 B (with 114 KB shared memory), ~0.6 KB
              # Walks with 16 value columns per program: twice the programs (256 for B=1, Hv=32 on 132 SMs), each
              # with a [Dk, 16] state; output-gradient kernel over the whole key dim (no repeated loads of do, v_new,
              # dv_new per key block) or with 32-column value steps; more warps for the WY gradient.
              "bv16": ChunkedLaunch(block_v=16, reverse_block_v=16),
              "bv16_w2": ChunkedLaunch(block_v=16, reverse_block_v=16, walk_warps=2),
              "bv16_s2": ChunkedLaunch(block_v=16, reverse_block_v=16, walk_stages=2),
              "gk128_w8": ChunkedLaunch(grad_block_k=128, grad_warps=8, grad_block_v=32),
              "gk128_w8_v64": ChunkedLaunch(grad_block_k=128, grad_warps=8),
              "gv32": ChunkedLaunch(grad_block_v=32),
              "wyg8": ChunkedLaunch(wy_grad_warps=8),
              # the prep by key head: k k^T and q k^T once for the key head's value heads; 2 or 4 warps
              "prep_kh": ChunkedLaunch(prep_per_key_head=True),
              "prep_kh_w4": ChunkedLaunch(prep_per_key_head=True, parallel_warps=4),
              # gpu_mosaic_backward.py's per-chunk backward (one or two Mosaic GPU warpgroups a chunk, 2 the default)
              # and gpu_mosaic_walks.py's walks (the reverse one the default); 'triton': none of them
              "triton": ChunkedLaunch(chunk_grads_mosaic=0, reverse_walk_mosaic=0, norm_grads_kernel=False,
                                      inverse_precision="tf32", prep_split=False, scores_warps=0),
              # the default launch of the eighth session (2026-12-02): XLA's norm backward, the TF32 inverse, one prep
              "eighth": ChunkedLaunch(norm_grads_kernel=False, inverse_precision="tf32", prep_split=False,
                                      scores_warps=0),
              "mosaic_bwd": ChunkedLaunch(chunk_grads_mosaic=1),
              "mosaic_fwd_walk": ChunkedLaunch(forward_walk_mosaic=1),
              # gpu_mosaic_walks.py with two warpgroups a program (one CTA per value head for Dv = 128, sharing the
              # q, k, T, P loads): both walks, or one of them
              "walks_2wg": ChunkedLaunch(forward_walk_mosaic=2, reverse_walk_mosaic=2),
              "fwd_walk_2wg": ChunkedLaunch(forward_walk_mosaic=2),
              "rev_walk_2wg": ChunkedLaunch(reverse_walk_mosaic=2),
              "walks_1wg": ChunkedLaunch(forward_walk_mosaic=0, reverse_walk_mosaic=1),  # Triton forward, 1-wg reverse
              # a forward alone forms P in the walk (no P launch): the Triton walk's 161 -> 247 registers (sm_90a), the
              # two-warpgroup Mosaic walk's 188 -> 255 (jax 0.11.2); the default (None) only in a Mosaic walk
              "prefill_p": ChunkedLaunch(prefill_scores_in_walk=True),
              "prefill_p_1wg": ChunkedLaunch(prefill_scores_in_walk=True, forward_walk_mosaic=1),
              "prep_p_launch": ChunkedLaunch(prefill_scores_in_walk=False),  # the ninth session's forward
              # gpu_mosaic_roles.py: the forward walk as warpgroups in roles per 64 value columns:
              # state, output, loads and P (142-166 registers, 195 KB of shared memory: jax 0.10.2 / 0.11.2,
              # sm_90a), or state and output-with-loads (roles2); forward alone they form P
              # (prefill_scores_in_walk None), or load the prep's
              "roles": ChunkedLaunch(forward_walk_roles=3),
              "roles2": ChunkedLaunch(forward_walk_roles=2),
              "roles_p_launch": ChunkedLaunch(forward_walk_roles=3, prefill_scores_in_walk=False),
              "tenth": ChunkedLaunch(forward_walk_roles=0, scores_warps=0),  # the tenth session's default
              "eleventh": ChunkedLaunch(scores_warps=0),  # the eleventh session's default
              # P by gpu_fused.scores_kernel (one program of 4 or 8 warps per key head, a whole-tile q k^T; 8 the
              # default) instead of the prep's blocked one-warp program per value head; forward alone, the walk loads it
              "roles_scores4": ChunkedLaunch(scores_warps=4, prefill_scores_in_walk=False),
              "roles_scores8": ChunkedLaunch(scores_warps=8, prefill_scores_in_walk=False),
              # the prep's T and P by separate launches (ptxas, sm_90a: T 255 registers and 120 bytes of spills, P
              # 254 and none, against 255 and 236 for both in one program; at 2 warps 52 bytes and none)
              "prep_split": ChunkedLaunch(prep_split=True),
              "prep_split_w2": ChunkedLaunch(prep_split=True, parallel_warps=2),
              # the blocked inverse's products in bf16 rather than TF32 (ptxas: 164 bytes of spills, 4 with prep_split;
              # end to end on the CPU, interpret mode, 1 x 1024, worst error vs float32 5.4e-3 either way)
              "bf16_inv": ChunkedLaunch(inverse_precision="bf16"),
              "bf16_inv_split": ChunkedLaunch(inverse_precision="bf16", prep_split=True),
              # dq, dk's group sum and the l2 norm's backward in gpu_norm_grads.py's kernel instead of XLA autodiff
              "norm_kernel": ChunkedLaunch(norm_grads_kernel=True),
              # the forward's l2 norm of q and k in gpu_qk_norm.py's one launch instead of XLA's two fusions
              "qk_norm": ChunkedLaunch(qk_norm_kernel=True),
              # a forward alone reads the raw q, k: the T launch writes their reciprocal norms, the walk scales by them
              "walk_norm": ChunkedLaunch(walk_normalizes_qk=True),
              # a forward alone: P's launch (8 or 4 warps) normalises the raw q, k and writes them besides P, the
              # walk loads P (by rows here); the default where the walk is in roles with few programs
              "scores_norm": ChunkedLaunch(prefill_scores_norm=True, scores_warps=8, roles_transposed_chain=False),
              "scores_norm4": ChunkedLaunch(prefill_scores_norm=True, scores_warps=4, roles_transposed_chain=False),
              # the thirteenth session's default: XLA's norm, P formed in the roles walk by rows
              "thirteenth": ChunkedLaunch(prefill_scores_norm=False, roles_transposed_chain=False),
              # the blocked inverse by 32-wide blocks at the prep's 1 or 2 warps (measured at 4 warps only)
              "blocked32_w1": ChunkedLaunch(inverse_block=32, parallel_warps=1),
              "blocked32_w2": ChunkedLaunch(inverse_block=32, parallel_warps=2),
              # the two-kernel backward (the default until 2026-12-01)
              "unfusedbwd": ChunkedLaunch(fused_backward=False),
              # the walks: more warps or other pipelining depths for the [Dk, BV] state's chunk loop
              "walk_w8": ChunkedLaunch(walk_warps=8),
              # the forward walk with 64 value columns (half the programs, wider dots), the reverse walk as before
              "fwd_bv64": ChunkedLaunch(block_v=64, reverse_block_v=32),
              "fwd_bv64_w8": ChunkedLaunch(block_v=64, walk_warps=8, reverse_block_v=32, reverse_walk_warps=4),
              "walk_s2": ChunkedLaunch(walk_stages=2),
              "walk_s4": ChunkedLaunch(walk_stages=4),
              "fusedbwd": ChunkedLaunch(fused_backward=True),
              "fusedbwd_w2": ChunkedLaunch(fused_backward=True, **w2),
              "fusedbwd_w2_b32": ChunkedLaunch(fused_backward=True, **w2, grad_block_k=32, grad_block_v=32),
              "fusedbwd_w2_k32": ChunkedLaunch(fused_backward=True, **w2, grad_block_k=32),
              "fusedbwd_w2_g8": ChunkedLaunch(fused_backward=True, **w2, grad_warps=8, grad_block_v=32),
              "fusedbwd_w2_s2": ChunkedLaunch(fused_backward=True, **w2, grad_block_k=32, grad_stages=2),
              "fusedbwd_w2_k128": ChunkedLaunch(fused_backward=True, **w2, grad_warps=8, grad_block_k=128,
                                                grad_block_v=32),
              # pipelining depth per walk: fewer stages, less shared memory, more programs per SM (matters with many
              # programs, e.g. 8 x 4096); the forward walk's alone ('walk_fs'), the reverse walk's alone ('rev_s')
              "walk_fs1": ChunkedLaunch(walk_stages=1, reverse_walk_stages=3),
              "walk_fs2": ChunkedLaunch(walk_stages=2, reverse_walk_stages=3),
              "rev_s1": ChunkedLaunch(reverse_walk_stages=1),
              "rev_s2": ChunkedLaunch(reverse_walk_stages=2),
              "rev_bv64_s1": ChunkedLaunch(reverse_block_v=64, reverse_walk_stages=1),
              "rev_bv64_s2": ChunkedLaunch(reverse_block_v=64, reverse_walk_stages=2),
              "prep_w1": ChunkedLaunch(parallel_warps=1),
              "bwd_s2": ChunkedLaunch(grad_stages=2),
              "bwd_g8": ChunkedLaunch(grad_warps=8),
              "w1_rev64": ChunkedLaunch(parallel_warps=1, reverse_block_v=64, reverse_walk_stages=2),
              "bwd_v128": ChunkedLaunch(grad_block_v=128),
              "bwd_v128_g8": ChunkedLaunch(grad_block_v=128, grad_warps=8),
              # gpu_backward.py's grid with the chunks fastest (the default until 2026-12-02: grad_heads_fastest)
              "bwd_cf": ChunkedLaunch(grad_heads_fastest=False)}
  if tuple(jax.__version_info__[:2]) >= (0, 11):  # ChunkedLaunch refuses it on jax 0.10
    # a forward alone in roles with the state's transpose on the chain
    variants["roles_t"] = ChunkedLaunch(roles_transposed_chain=True, prefill_scores_norm=False)
    variants["scores_norm_t"] = ChunkedLaunch(prefill_scores_norm=True, scores_warps=8, roles_transposed_chain=True)
  return variants


def describe(launch) -> str:
  """A launch as the fields that differ from gpu.ChunkedLaunch()'s defaults."""
  import dataclasses
  if launch is None:
    return "chunk_gated_delta_rule(impl='gpu')"
  default = type(launch)()
  changed = [f"{f.name}={getattr(launch, f.name)}" for f in dataclasses.fields(launch)
             if getattr(launch, f.name) != getattr(default, f.name)]
  return "ChunkedLaunch(" + ", ".join(changed) + ")"


def implementation(name: str, chunk: int, interpret: bool):
  """(q, k, v, g, beta, h0) -> (o, final state) of ours (a launches() name), 'jla' or 'reference'."""
  from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_reference
  if name == "reference":
    return lambda q, k, v, g, beta, h0: chunk_gated_delta_rule_reference(q, k, v, g, beta, h0, chunk_size=chunk)
  if name == "jla":
    import jla.ops.mosaic_gpu  # noqa: F401, PLC0415 - registers its kernels now: jla's lazy loader races threads
    from jla.ops import linear_attention  # noqa: PLC0415 - a peer, installed on the device only

    return lambda q, k, v, g, beta, h0: linear_attention(
        "gated_deltanet", q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True,
        impl="mosaic_gpu")
  launch = launches()[name]
  if launch is None:
    return lambda q, k, v, g, beta, h0: chunk_gated_delta_rule(q, k, v, g, beta, h0, chunk_size=chunk, impl="gpu")
  from maxtext.kernels.gated_delta_rule.gpu import chunk_gated_delta_rule_gpu
  return lambda q, k, v, g, beta, h0: chunk_gated_delta_rule_gpu(
      q, k, v, g, beta, h0, chunk_size=chunk, launch=launch, interpret=interpret)


def functions(run):
  """(forward(inputs, h0), grads(inputs, h0, d_out, d_state) -> ((o, final), grads of q, k, v, g, beta, h0))."""
  import jax
  import jax.numpy as jnp

  def loss(q, k, v, g, beta, h0, d_out, d_state):
    o, final = run(q, k, v, g, beta, h0)
    return jnp.sum(o.astype(jnp.float32) * d_out) + jnp.sum(final * d_state), (o, final)

  grad = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)
  return (jax.jit(lambda inputs, h0: run(*inputs, h0)),
          jax.jit(lambda inputs, h0, d_out, d_state: grad(*inputs, h0, d_out, d_state)[::-1]))


def device_inputs(host: dict, upcast: bool):
  """(inputs, h0, d_out, d_state): q, k, v, beta and d_out rounded to bf16 (in float32 when upcast)."""
  import jax.numpy as jnp
  low = jnp.float32 if upcast else jnp.bfloat16
  rounded = lambda n: jnp.asarray(host[n], jnp.bfloat16).astype(jnp.float32)
  inputs = tuple(jnp.asarray(host["g"]) if n == "g" else rounded(n).astype(low) for n in ("q", "k", "v", "g", "beta"))
  return inputs, jnp.asarray(host["h0"]), rounded("d_out"), jnp.asarray(host["d_state"])


def accuracy(result, expected) -> dict:
  """o's error and the worst of the final state's and the gradients' (max|a-b| / max|b|)."""
  (o, final), grads = result
  (o_ref, final_ref), grads_ref = expected
  worst = max(errors(a, b)[0] for a, b in zip((final, *grads), (final_ref, *grads_ref)))
  return dict(o=errors(o, o_ref)[0], worst=worst)


def kernel_table(fn, args, repeats: int = 3, top: int = 16) -> dict[str, float]:
  import jax
  from trace_summary import kernel_totals, profile
  log_dir = tempfile.mkdtemp(prefix="gdn_peers_trace_")
  profile(lambda: jax.block_until_ready(fn(*args)), log_dir, repeats=repeats)
  totals = kernel_totals(log_dir, repeats=repeats)
  return {name[:60]: ms for name, ms in list(totals.items())[:top]} | {"total": sum(totals.values())}


def markdown(meta: dict, rows: list[dict], checks: dict, traces: dict, names: list[str]) -> str:
  fmt = lambda x: "-" if x is None else f"{x:.2f}"
  best = lambda row, kind: min((row.get(f"{n}_{kind}") or float("inf"), n) for n in names)
  lines = [f"## Gated delta rule, chunked: ours vs jax-linear-attention {meta.get('jla', '-')} vs fla "
           f"{meta.get('fla', '-')} ({meta['date']})", "",
           f"Device {meta['device']}; jax {meta['jax']}; torch {meta.get('torch', '-')}, triton "
           f"{meta.get('triton', '-')}; XLA_FLAGS='{meta['xla_flags']}'. benchmarks/gated_delta_rule_peers.py, one "
           "run. Hk=16, Hv=32, Dk=Dv=128, chunk 64; q, k, v, beta bf16, g float32, qk l2-norm in the op; all with "
           "an initial state, fwd+bwd = gradients w.r.t. q, k, v, g, beta and the initial state (fla's backward "
           "with its Hopper guard lifted: timing only). Median ms. Ours: " + ", ".join(
               f"{n} = {meta['variants'][n]}" for n in names) + ".", "",
           "| B x T | " + " | ".join(f"{n} fwd+bwd" for n in names) + " | jla fwd+bwd | fla fwd+bwd | best ours / jla "
           "| " + " | ".join(f"{n} fwd" for n in names) + " | jla fwd | fla fwd | best ours / jla fwd |",
           "|---" * (2 * len(names) + 7) + "|"]
  for r in rows:
    ratio = lambda kind: fmt(best(r, kind)[0] / r[f"jla_{kind}"]) if r.get(f"jla_{kind}") else "-"
    cells = [f"{r['batch']} x {r['length']}", *(fmt(r.get(f"{n}_fwd_bwd")) for n in names),
             fmt(r.get("jla_fwd_bwd")), fmt(r.get("fla_fwd_bwd")), ratio("fwd_bwd"),
             *(fmt(r.get(f"{n}_fwd")) for n in names), fmt(r.get("jla_fwd")), fmt(r.get("fla_fwd")), ratio("fwd")]
    lines.append("| " + " | ".join(cells) + " |")
  if checks:
    lines += ["", "Error against the jnp reference in float32 on the same bf16-rounded inputs (max|a-b| / max|b|; "
              "worst = over the final state and every gradient; fla: output and its gradients, no initial-state "
              "gradient):", "", "| B x T | implementation | o | worst |", "|---|---|---|---|"]
    lines += [f"| {shape} | {impl} | {e['o']:.1e} | {e['worst']:.1e} |" for shape, per in checks.items()
              for impl, e in per.items()]
  for shape, per in traces.items():
    for impl, table in per.items():
      lines += ["", f"Kernels of {impl} at {shape} (ms, profiler device time; fwd: a forward alone):", "",
                "| kernel | ms |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in table.items()]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="1x4096,1x16384,1x65536,8x4096", help="BxT, comma separated")
  parser.add_argument("--variants", default="api", help="ours, comma separated, of launches()")
  parser.add_argument("--check-shapes", default="1x4096", help="shapes checked against the float32 reference")
  parser.add_argument("--trace", default="1x16384", help="shape whose kernels are listed ('' for none)")
  parser.add_argument("--key-heads", type=int, default=16)
  parser.add_argument("--value-heads", type=int, default=32)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--forward-only", default="", help="variants timed and checked as a forward alone (prefill)")
  parser.add_argument("--no-jla", action="store_true")
  parser.add_argument("--no-fla", action="store_true")
  parser.add_argument("--peer-timeout", type=float, default=300, help="seconds for fla, its autotuning included")
  parser.add_argument("--compile-workers", type=int, default=8)
  parser.add_argument("--markdown", help="write the result section here")
  parser.add_argument("--json", help="write all numbers here")
  parser.add_argument("--docs", help="append the result section to this file")
  parser.add_argument("--date", default=datetime.date.today().isoformat())
  args = parser.parse_args()

  scratch = tempfile.mkdtemp(prefix="gdn_peers_")
  peer_json, check_path = os.path.join(scratch, "fla.json"), os.path.join(scratch, "fla_check.npz")
  process = None if args.no_fla else start_peer(args, peer_json, check_path)
  import jax
  interpret = jax.default_backend() == "cpu"
  names = args.variants.split(",")
  forward_only = set(filter(None, args.forward_only.split(",")))
  impls = names + ([] if args.no_jla else ["jla"])
  shapes = [parse_shape(s) for s in args.shapes.split(",")]
  checked = [parse_shape(s) for s in args.check_shapes.split(",") if s]
  hosts = {shape: make_inputs(*shape, args.key_heads, args.value_heads, args.dim) for shape in set(shapes + checked)}
  compiled, jobs = {}, []
  for shape in hosts:
    specs = {up: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), device_inputs(hosts[shape], up))
             for up in (False, True)}
    for impl in impls + (["reference"] if shape in checked else []):
      forward, grads = functions(implementation(impl, args.chunk, interpret))
      up = impl == "reference"
      if (shape in shapes or impl in forward_only) and not up:
        jobs.append(((shape, impl, "fwd"), forward, specs[up][:2]))
      if impl not in forward_only:
        jobs.append(((shape, impl, "fwd_bwd"), grads, specs[up]))

  def build(job):
    key, fn, spec = job
    try:
      compiled[key] = fn.lower(*spec).compile()
    except Exception as error:  # one failing variant must not cost the others' numbers
      print(f"compile failed {key}: {type(error).__name__}: {str(error)[:600]}", flush=True)
  started = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(args.compile_workers) as pool:
    list(pool.map(build, jobs))
  print(f"compiled {len(compiled)}/{len(jobs)} in {time.perf_counter() - started:.0f} s", flush=True)
  peer = finish_peer(process, peer_json, args.peer_timeout) if process else {}
  meta = dict(date=args.date, device=jax.devices()[0].device_kind, jax=jax.__version__,
              xla_flags=os.environ.get("XLA_FLAGS", ""), variants={n: describe(launches()[n]) for n in names},
              **{key: peer[key] for key in ("torch", "triton", "fla") if key in peer})
  try:
    import importlib.metadata
    meta["jla"] = importlib.metadata.version("jax-linear-attention")
  except Exception:  # not installed: --no-jla
    pass
  fla_rows = {(r["batch"], r["length"]): r for r in peer.get("rows", [])}
  rows, checks, traces = [], {}, {}

  def save() -> str:
    section = markdown(meta, rows, checks, traces, names)
    for path, text in ((args.markdown, section),
                       (args.json, json.dumps(dict(meta=meta, rows=rows, checks=checks, traces=traces), indent=1))):
      if path:
        with open(path, "w") as f:
          f.write(text)
    return section

  for shape in hosts:
    label = f"{shape[0]}x{shape[1]}"
    arrays = device_inputs(hosts[shape], False)
    if shape in checked and (shape, "reference", "fwd_bwd") in compiled:
      try:
        expected = compiled[(shape, "reference", "fwd_bwd")](*device_inputs(hosts[shape], True))
        checks[label] = {impl: accuracy(compiled[(shape, impl, "fwd_bwd")](*arrays), expected)
                         for impl in impls if (shape, impl, "fwd_bwd") in compiled}
        for impl in forward_only & {i for (s, i, kind) in compiled if s == shape and kind == "fwd"}:
          o, final = compiled[(shape, impl, "fwd")](*arrays[:2])  # a forward alone: o and the final state
          checks[label][impl] = dict(o=errors(o, expected[0][0])[0], worst=errors(final, expected[0][1])[0])
        if shape == checked[0] and os.path.exists(check_path):
          fla = dict(np.load(check_path))
          (o_ref, final_ref), grads_ref = expected
          checks[label]["fla"] = dict(o=errors(fla["o"], o_ref)[0], worst=max(
              errors(fla[n], r)[0] for n, r in zip(("final", "dq", "dk", "dv", "dg", "dbeta", "dh0"),
                                                    (final_ref, *grads_ref)) if n in fla))
        print(label, checks[label], flush=True)
      except Exception:
        traceback.print_exc()
    if shape not in shapes:
      continue
    row = dict(batch=shape[0], length=shape[1])
    fla_row = fla_rows.get(shape, {})
    row.update(fla_fwd=fla_row.get("fwd_ms"), fla_fwd_bwd=fla_row.get("fwd_bwd_ms"))
    for impl in impls:
      for kind in ("fwd", "fwd_bwd"):
        fn = compiled.get((shape, impl, kind))
        try:
          row[f"{impl}_{kind}"] = None if fn is None else time_jax(fn, *(arrays if kind == "fwd_bwd" else arrays[:2]))
        except Exception:
          traceback.print_exc()
    rows.append(row)
    print(row, flush=True)
    if label == args.trace:
      traces[label] = {}
      for impl in impls:
        for kind, inputs in (("fwd_bwd", arrays), ("fwd", arrays[:2])):
          if (shape, impl, kind) in compiled:
            traces[label][f"{impl} {kind}"] = kernel_table(compiled[(shape, impl, kind)], inputs)
            print(impl, kind, traces[label][f"{impl} {kind}"], flush=True)
    save()
  section = save()
  print(section, flush=True)
  if args.docs:
    with open(args.docs, "a") as f:
      f.write("\n" + section)


if __name__ == "__main__":
  main()
