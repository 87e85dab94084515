"""Train-step throughput of our trainer against HF transformers' Qwen3NextForCausalLM (+ fla) on the same GPU.

  python3 benchmarks/train_step.py [--devices 1,2] [--steps 10] [--weight-dtype bfloat16] [--remat-policy none]

Model: the "2.5B bench" config of shared/bench (hidden 2048, 8 layers = 2 x (3 GDN + 1 attention), 16/2 heads of
256, GDN 16/32 heads of 128, 64 experts top-8, expert and shared MLP 512, vocab 151936, bf16, no MTP), `--batch`
sequences (default 1) of 4096 tokens per device, AdamW. Each side runs in its own subprocess (PyTorch and JAX never
share the GPU); each first checks itself on the device (initial loss ~ ln(vocab), finite, falling on a repeated
batch), then times
`--steps` steps after `--warmup` steps. Ours runs the real build_training step (gdn_kernel=auto: the GPU kernels)
with the layers unrolled (scan_layers=false; --scan-layers false,true adds the scanned layout, whose XLA while
loop copies the stacked per-layer residuals on GPU: measured ~40% slower at this size)
on 1 device and, with --devices 1,N, on N devices (fsdp x expert from --ici) for the scaling efficiency
tokens/s(N) / (N x tokens/s(1)). HF needs fla on the path (e.g. PYTHONPATH=/tmp/site after
`pip install --no-deps --target /tmp/site .fla/*.whl`); fla 0.6.0 refuses its gated backward on Hopper with
Triton < 3.7.1 (fla issue #640), so the guard is lifted for timing (its gradients are not trusted; --keep-fla-guard
keeps it). Prints a table last: tokens/s, step time, TFLOP/s per device, MFU, peak memory, and ours / HF.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from bench_model import BENCH_MODEL, hf_bench_config

LENGTH = 4096


def check_losses(losses: list[float], vocab: int) -> list[str]:
  problems = []
  if not all(math.isfinite(x) for x in losses):
    problems.append(f"non-finite loss {losses}")
  elif abs(losses[0] - math.log(vocab)) > 1.0:
    problems.append(f"initial loss {losses[0]:.3f} is not near ln(vocab) = {math.log(vocab):.3f}")
  elif not losses[-1] < losses[0] - 0.05:
    problems.append(f"loss does not fall on a repeated batch: {losses[0]:.3f} -> {losses[-1]:.3f}")
  return problems


# Kernel name substrings -> what part of the step they are (first match wins); the rest are XLA's own fusions.
KERNEL_GROUPS = (
    ("gated delta rule (Pallas)", ("gdr_",)),
    ("MoE grouped matmul (Pallas)", ("grouped_matmul",)),
    ("attention (cuDNN)", ("cudnn", "flash", "fmha")),
    ("dense GEMMs (cuBLAS/cuBLASLt)", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
    ("copies", ("memcpy", "Memcpy", "copy")),
)


def kernel_groups(totals: dict[str, float]) -> list[tuple[str, float]]:
  """ms per KERNEL_GROUPS entry (+ 'XLA fusions and other') from {kernel name: ms}."""
  grouped = {group: 0.0 for group, _ in KERNEL_GROUPS} | {"XLA fusions and other": 0.0}
  for name, ms in totals.items():
    group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "XLA fusions and other")
    grouped[group] += ms
  return sorted(grouped.items(), key=lambda item: -item[1])


def trace_train_step(training, state, batch, log_dir: str, repeats: int = 3) -> str:
  """Markdown: the step's device time by kernel group, then the top kernels (ms per step, profiler device time)."""
  import jax

  from trace_summary import kernel_totals, profile

  holder = {"state": state}

  def step():
    holder["state"], metrics = training.train_step(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  top_kernels = profile(step, log_dir, top=40, repeats=repeats)
  totals = kernel_totals(log_dir, repeats)
  if os.environ.get("OUT"):  # every kernel's ms per step, for attributing XLA's fusions offline
    with open(os.path.join(os.environ["OUT"], f"kernels_{os.getpid()}.json"), "w", encoding="utf-8") as f:
      json.dump(dict(sorted(totals.items(), key=lambda item: -item[1])), f, indent=0)
  groups = kernel_groups(totals)
  whole = sum(ms for _, ms in groups) or 1.0
  rows = ["| kernel group | ms per step | share |", "|---|---|---|"]
  rows += [f"| {group} | {ms:.2f} | {ms / whole:.1%} |" for group, ms in groups]
  return "\n".join(rows) + "\n\n" + top_kernels


def time_train_steps(config, mesh, length: int, warmup: int, steps: int):
  """Our train step on one repeated synthetic batch: (training, final state, losses of the warm-up steps and the
  last one, seconds per step after the warm-up)."""
  import jax

  from maxtext.input_pipeline.synthetic import SyntheticIterator
  from maxtext.trainers import mesh as train_mesh
  from maxtext.trainers.train_step import build_training

  training = build_training(config, mesh)
  state = training.init_state(jax.random.key(0))
  batch = train_mesh.host_batch_to_global(
      next(SyntheticIterator(training.global_batch_size, length, config.vocab_size, 0)), mesh)
  losses = []
  for _ in range(warmup):
    state, metrics = training.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = training.train_step(state, batch)
  jax.block_until_ready(state)
  elapsed = (time.perf_counter() - start) / steps
  losses.append(float(metrics["loss"]))
  return training, state, losses, elapsed, batch


def _launch_fields(text: str) -> dict:
  """--gdn-launch 'qk_norm_kernel=true,scores_warps=4' -> ChunkedLaunch fields (bool, int or None values)."""
  from maxtext.kernels.gated_delta_rule.gpu import ChunkedLaunch  # noqa: PLC0415

  known = {field.name for field in dataclasses.fields(ChunkedLaunch)}
  words = {"true": True, "false": False, "none": None}
  fields = {}
  for item in filter(None, text.split(",")):
    name, _, value = item.partition("=")
    if name not in known:
      raise SystemExit(f"--gdn-launch: {name!r} is not a ChunkedLaunch field")
    fields[name] = words[value.lower()] if value.lower() in words else int(value)
  return fields


def run_ours(args, devices: int, scanned: bool) -> dict:
  import jax

  from maxtext.configs import load_config
  from maxtext.trainers import flops
  from maxtext.trainers import mesh as train_mesh

  ici = dict(item.split("=") for item in args.ici.split(",")) if devices > 1 else {"fsdp": "-1"}
  overrides = {
      **BENCH_MODEL, "max_target_length": LENGTH, "per_device_batch_size": args.batch, "dtype": "bfloat16",
      "weight_dtype": args.weight_dtype, "remat_policy": args.remat_policy, "gdn_kernel": args.gdn_kernel,
      "scan_layers": scanned, "learning_rate": 1e-4, "warmup_steps_fraction": 0.0, "steps": 1000,
      "max_prefill_predict_length": 64, "ici_data_parallelism": 1, "ici_fsdp_parallelism": 1,
      "ici_tensor_parallelism": 1, "ici_expert_parallelism": 1,
      **{f"ici_{axis}_parallelism": int(value) for axis, value in ici.items()},
  }
  config = load_config(overrides=overrides)
  if args.gdn_launch:  # the GPU kernels' launch for this run: the model calls them with the default one
    from maxtext.kernels.gated_delta_rule import gpu  # noqa: PLC0415

    gpu.chunk_gated_delta_rule_gpu.__kwdefaults__["launch"] = gpu.ChunkedLaunch(**_launch_fields(args.gdn_launch))
  mesh = train_mesh.make_training_mesh(config, jax.devices()[:devices])
  training, state, losses, elapsed, batch = time_train_steps(config, mesh, LENGTH, args.warmup, args.steps)
  trace = None
  if args.trace:
    trace = trace_train_step(training, state, batch, tempfile.mkdtemp(prefix="train_trace_"))
    print(trace, flush=True)
  tokens = training.global_batch_size * LENGTH
  flops_per_token = flops.training_flops_per_token(config)
  peak = flops.peak_tflops(jax.devices()[0].device_kind)
  stats = jax.devices()[0].memory_stats() or {}
  return dict(
      side=f"ours x{devices}" + (" scanned" if scanned else "") + (f" [{args.gdn_launch}]" if args.gdn_launch else ""),
      devices=devices, scanned=scanned, step_s=elapsed,
      tokens_per_s=tokens / elapsed,
      tflops_per_device=flops_per_token * tokens / elapsed / devices / 1e12, peak_tflops=peak,
      peak_memory_gb=stats.get("peak_bytes_in_use", 0) / 1e9, losses=losses,
      problems=check_losses(losses, config.vocab_size), flops_per_token=flops_per_token,
      device=jax.devices()[0].device_kind, params=sum(x.size for x in jax.tree.leaves(state["params"])),
      mesh=dict(mesh.shape), trace=trace,
  )


def run_hf(args) -> dict:
  import torch

  if not args.keep_fla_guard:
    import fla.ops.common.chunk_o as chunk_o  # noqa: F401 - fla must be importable: HF uses it for GDN

    chunk_o.TRITON_ABOVE_3_7_1 = True
  from transformers import Qwen3NextForCausalLM

  config = hf_bench_config()
  torch.manual_seed(0)
  impl = None
  for candidate in ("grouped_mm", "batched_mm", "eager"):
    try:
      with torch.device("cuda"):
        model = Qwen3NextForCausalLM._from_config(config, torch_dtype=torch.bfloat16, experts_implementation=candidate)
      impl = candidate
      break
    except Exception:  # noqa: BLE001 - older transformers lack some implementations
      continue
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
  ids = torch.randint(0, config.vocab_size, (args.batch, LENGTH + 1), device="cuda",
                      generator=torch.Generator("cuda").manual_seed(0))
  inputs, labels = ids[:, :-1], ids[:, :-1]  # HF shifts labels itself
  losses = []

  def step():
    loss = model(input_ids=inputs, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  for _ in range(args.warmup):
    losses.append(float(step()))
  torch.cuda.synchronize()
  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  torch.cuda.synchronize()
  elapsed = (time.perf_counter() - start) / args.steps
  losses.append(float(loss))
  return dict(
      side="HF+fla x1", devices=1, step_s=elapsed, tokens_per_s=args.batch * LENGTH / elapsed, experts_impl=impl,
      peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9, losses=losses,
      problems=check_losses(losses, config.vocab_size), device=torch.cuda.get_device_name(),
      params=sum(p.numel() for p in model.parameters()), fla_guard_lifted=not args.keep_fla_guard,
  )


def _worker_command(args, side: str, output: str) -> list[str]:
  passthrough = [
      f"--steps={args.steps}", f"--batch={args.batch}", f"--warmup={args.warmup}",
      f"--weight-dtype={args.weight_dtype}",
      f"--remat-policy={args.remat_policy}", f"--gdn-kernel={args.gdn_kernel}", f"--ici={args.ici}",
      f"--scan-layers={args.scan_layers}", f"--gdn-launch={args.gdn_launch}",
  ] + (["--keep-fla-guard"] if args.keep_fla_guard else []) + (["--trace"] if args.trace else [])
  return [sys.executable, os.path.abspath(__file__), f"--worker={side}", f"--json={output}", *passthrough]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", default="1", help="device counts for our side, e.g. 1,2 (scaling efficiency)")
  parser.add_argument("--ici", default="fsdp=-1,expert=1", help="our multi-device mesh: axis=size,... (-1 fills)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=1, help="sequences of 4096 tokens per device and step (both sides)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--weight-dtype", default="bfloat16", help="our parameter dtype (HF trains bf16 parameters)")
  parser.add_argument("--remat-policy", default="none")
  parser.add_argument("--scan-layers", default="false",
                      help="our layer layout(s): false (unrolled), true (scan over blocks), or false,true for both")
  parser.add_argument("--gdn-kernel", default="auto")
  parser.add_argument("--gdn-launch", default="",
                      help="the GPU kernels' ChunkedLaunch fields for our side, e.g. qk_norm_kernel=true")
  parser.add_argument("--no-hf", action="store_true", help="skip the HF side")
  parser.add_argument("--keep-fla-guard", action="store_true")
  parser.add_argument("--trace", action="store_true",
                      help="after timing, profile 3 of our steps: device ms by kernel group and the top kernels")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--json", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    if args.worker == "hf":
      result = run_hf(args)
    else:
      _, devices, layout = args.worker.split(":")
      result = run_ours(args, int(devices), layout == "scanned")
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f)
    return

  layouts = ["scanned" if x == "true" else "unscanned" for x in args.scan_layers.split(",")]
  sides = ([] if args.no_hf else ["hf"]) + [f"ours:{n}:{layout}" for layout in layouts for n in args.devices.split(",")]
  results = []
  with tempfile.TemporaryDirectory() as scratch:
    for side in sides:
      output = os.path.join(scratch, side.replace(":", "_") + ".json")
      print(f"--- {side}", flush=True)
      proc = subprocess.run(_worker_command(args, side, output), check=False)
      if proc.returncode or not os.path.exists(output):
        print(f"{side} failed (exit {proc.returncode})", flush=True)
        continue
      with open(output, encoding="utf-8") as f:
        results.append(json.load(f))
      print(json.dumps(results[-1]), flush=True)  # kept in the log if a later side runs past a time limit
  out_dir = os.environ.get("OUT")
  if out_dir:
    with open(os.path.join(out_dir, "train_step.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)

  ours = [r for r in results if r["side"].startswith("ours")]
  hf = next((r for r in results if r["side"].startswith("HF")), None)
  flops_per_token = ours[0]["flops_per_token"] if ours else None
  peak = ours[0]["peak_tflops"] if ours else None
  print(f"\nmodel FLOPs/token (training, maxtext.trainers.flops): {flops_per_token:.4g}" if flops_per_token else "")
  print("| side | device | params | step (s) | tokens/s | TFLOP/s/dev | MFU | peak mem (GB) | vs HF | scaling | check |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    per_device = flops_per_token * r["tokens_per_s"] / r["devices"] / 1e12 if flops_per_token else float("nan")
    mfu = f"{100 * per_device / peak:.1f}%" if peak else "n/a"
    ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "n/a"
    single = next((o for o in ours if o["devices"] == 1 and o["scanned"] == r.get("scanned")), None)
    scaling = (f"{100 * r['tokens_per_s'] / (r['devices'] * single['tokens_per_s']):.0f}%"
               if single and r["side"].startswith("ours") else "")
    check = "ok" if not r["problems"] else "; ".join(r["problems"])
    print(f"| {r['side']} | {r['device']} | {r['params'] / 1e9:.2f}B | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} |"
          f" {per_device:.1f} | {mfu} | {r['peak_memory_gb']:.1f} | {ratio} | {scaling} | {check} |")
  if hf and hf.get("fla_guard_lifted"):
    print("HF: fla's Hopper backward guard lifted for timing (fla issue #640); its gradients are not trusted.")
  sys.exit(0 if results and all(not r["problems"] for r in results) else 1)


if __name__ == "__main__":
  main()
