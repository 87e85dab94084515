"""Qwen3.6-35B-A3B at its real size on one GPU: our engine and trainer against HF transformers (+ fla), same run.

  python3 benchmarks/qwen36_real_size.py [--parts decode,train] [--new-tokens 128] [--peer-new-tokens 64]
      [--ttft-lengths 4096,32768] [--batch-sizes 1,64] [--scan-layers] [--no-peer] [--json out.json] [--quick]

Model: model_name=qwen3.6-35b-a3b (40 layers = 10 x (3 Gated DeltaNet + 1 gated attention), 256 experts top-8,
hidden 2048, vocab 248320, one MTP layer), random weights initialised on the device, bf16 weights and compute.
Each side runs in its own subprocess, the peer first, so the two never hold GPU memory at the same time.

decode: first a device check (prefill + steps reproduce the full forward's float32 logits, benchmarks/decode.py);
  then greedy decoding of a 128-token prompt at each batch size: tokens/s of the whole call and time per output
  token (after the first); time to first token for each --ttft-lengths prompt (best of 2 after a compile call);
  peak device memory; the MTP round (1 draft + verification) against a plain step, and that its tokens equal plain
  greedy's. Peer: HF Qwen3_5MoeForCausalLM.generate (fla GDN kernels, grouped_mm experts), same measurements
  (fewer new tokens: --peer-new-tokens). Reference point, not measured here: SGLang's published 2.23 ms per output
  token (H200, bf16, batch 1, with MTP, 8k in / 1k out).
train: a 4-layer slice of the real shape (3 GDN + 1 attention, 256 experts top-8, vocab 248320, no MTP), 1 x 4096
  tokens, bf16 parameters, AdamW, no remat: our build_training step (unscanned) against HF + fla (fused AdamW,
  grouped_mm experts); both check that the loss starts near ln(vocab) and falls on a repeated batch.
Prints a markdown table last. --quick: tiny shapes on any backend (a smoke test of this script; numbers mean
nothing). fla for the peer: `pip install --no-index --no-deps --target /tmp/site .fla/*.whl`, PYTHONPATH=/tmp/site.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(_HERE), "src"), _HERE]

from timing import run_worker  # noqa: E402

REAL = {"model_name": "qwen3.6-35b-a3b"}
# --quick: the same family and layer pattern at toy sizes.
QUICK = dict(model_name="qwen3.6-35b-a3b", vocab_size=512, base_emb_dim=64, base_num_decoder_layers=4,
             base_num_query_heads=4, base_num_kv_heads=2, head_dim=32, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=8,
             num_experts_per_tok=2, base_moe_mlp_dim=32, shared_expert_mlp_dim=32)
TRAIN_LENGTH = 4096
SGLANG_TPOT_MS = 2.23  # SGLang cookbook, Qwen3.6-35B-A3B, H200, bf16, batch 1, with MTP (published, not same run)


def model_overrides(args, **more) -> dict:
  return {**(QUICK if args.quick else REAL), **more}


def our_config(args, **more):
  from maxtext.configs import load_config

  values = model_overrides(args, dtype="bfloat16", weight_dtype="bfloat16", scan_layers=args.scan_layers,
                           max_prefill_predict_length=16)
  values.update(more)
  return load_config(overrides=values)


def hf_text_config(args, **more):
  """transformers' Qwen3_5MoeTextConfig of the same model, derived by our export's translation."""
  from transformers import Qwen3_5MoeTextConfig

  from maxtext.configs.hf_config import hf_config_from_config

  text = hf_config_from_config(our_config(args, **more))["text_config"]
  return Qwen3_5MoeTextConfig(**{k: v for k, v in text.items() if k != "model_type"})


def lift_fla_guard() -> bool:
  try:
    import fla.ops.common.chunk_o as chunk_o

    chunk_o.TRITON_ABOVE_3_7_1 = True  # fla 0.6.0's Hopper guard (issue #640): timing only
    return True
  except ImportError:
    return False


def hf_model(config, device):
  import torch
  from transformers import Qwen3_5MoeForCausalLM

  torch.manual_seed(0)
  for impl in ("grouped_mm", "batched_mm", "eager"):
    try:
      with torch.device(device):
        return Qwen3_5MoeForCausalLM._from_config(config, dtype=torch.bfloat16, experts_implementation=impl), impl
    except Exception:  # noqa: BLE001 - older transformers lack some implementations
      continue
  raise RuntimeError("no experts implementation of transformers builds this model")


def sync(device):
  import torch

  if device == "cuda":
    torch.cuda.synchronize()


def peak_gb_torch(device) -> float:
  import torch

  return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")


class Partial(dict):
  """A worker's result that is written to its JSON file after every measurement, so a run cut short by the
  device's time limit still leaves what it measured (in $OUT when set)."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def __setitem__(self, key, value):
    super().__setitem__(key, value)
    with open(self.path, "w", encoding="utf-8") as f:
      json.dump(dict(self), f)


def peak_gb_jax() -> float:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 1e9


# ------------------------------------------------------------------------------------------------------- decode


def hf_decode(args) -> dict:
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  fla = lift_fla_guard()
  config = hf_text_config(args)
  model, impl = hf_model(config, device)
  model.eval()
  vocab = config.vocab_size

  def generate(batch, prompt, new):
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False)
    sync(device)
    return time.perf_counter() - start, out.shape[1] - prompt

  result = Partial(args.json)
  result.update(fla=fla, experts_impl=impl, params=sum(p.numel() for p in model.parameters()))
  with torch.no_grad():
    for length in args.ttft_lengths:
      generate(1, length, 1)
      result[f"ttft_ms_{length}"] = min(generate(1, length, 1)[0] for _ in range(2)) * 1e3
    for batch in args.batch_sizes:
      generate(batch, args.prompt_length, 4)
      seconds, new = generate(batch, args.prompt_length, args.peer_new_tokens)
      first = min(generate(batch, args.prompt_length, 1)[0] for _ in range(2))  # prefill + first token
      result[f"tok_s_{batch}"] = batch * new / seconds
      result[f"tpot_ms_{batch}"] = (seconds - first) / max(new - 1, 1) * 1e3
  result["peak_gb"] = peak_gb_torch(device)
  return result


def ours_decode(args) -> dict:
  import jax
  import numpy as np

  from decode import check_logits, timed_generate
  from maxtext.inference.engine import Engine
  from maxtext.inference.sampling import SamplingParams

  result = Partial(args.json)
  result["device"] = jax.devices()[0].device_kind
  result["logits_max_abs_diff"] = check_logits(args)
  rng = np.random.default_rng(0)
  context = args.prompt_length + args.new_tokens + 8
  start = time.perf_counter()
  base = Engine(our_config(args, max_target_length=context))
  jax.block_until_ready(base.params)
  result["init_s"] = time.perf_counter() - start
  result["params"] = sum(x.size for x in jax.tree.leaves(base.params))
  vocab = base.spec.vocab_size
  greedy = SamplingParams(max_tokens=args.new_tokens)
  for batch in args.batch_sizes:
    prompts = rng.integers(0, vocab, (batch, args.prompt_length)).tolist()
    timed_generate(base, prompts, [SamplingParams(max_tokens=4)] * batch)  # compile
    seconds, first, _ = timed_generate(base, prompts, [greedy] * batch)
    result[f"tok_s_{batch}"] = batch * args.new_tokens / seconds
    result[f"tpot_ms_{batch}"] = (seconds - first) / (args.new_tokens - 1) * 1e3
    result["peak_gb"] = peak_gb_jax()
  for length in args.ttft_lengths:
    engine = Engine(our_config(args, max_target_length=length + 16, max_prefill_predict_length=length), base.params)
    prompt = rng.integers(0, vocab, (1, length)).tolist()
    timed_generate(engine, prompt, [SamplingParams(max_tokens=1)])
    result[f"ttft_ms_{length}"] = min(timed_generate(engine, prompt, [SamplingParams(max_tokens=1)])[1]
                                      for _ in range(2)) * 1e3
    result["peak_gb"] = peak_gb_jax()
    del engine
  if args.mtp:
    speculative = Engine(our_config(args, max_target_length=context, mtp_speculative_decoding=True,
                                    mtp_num_draft_tokens=1), base.params)
    prompts = rng.integers(0, vocab, (1, args.prompt_length)).tolist()
    timed_generate(speculative, prompts, [SamplingParams(max_tokens=4)])
    plain_s, plain_first, plain = timed_generate(base, prompts, [greedy])
    spec_s, spec_first, spec = timed_generate(speculative, prompts, [greedy])
    stats = speculative.last_stats
    rounds = max(stats["steps"], 1)
    result["mtp_same_tokens"] = [e.token_id for e in plain] == [e.token_id for e in spec]
    result["mtp_acceptance"] = stats["accepted"] / max(stats["drafted"], 1)
    result["mtp_round_ms"] = (spec_s - spec_first) / rounds * 1e3
    result["mtp_round_over_step"] = result["mtp_round_ms"] / ((plain_s - plain_first) / (args.new_tokens - 1) * 1e3)
    # A trained MTP head accepts most drafts (a random one almost none): time per token if every draft held.
    result["mtp_tpot_ms_all_accepted"] = result["mtp_round_ms"] / 2
  result["peak_gb"] = peak_gb_jax()
  return result


# ------------------------------------------------------------------------------------------------------- train


def _slice(args) -> dict:
  return dict(base_num_decoder_layers=4, mtp_num_layers=0)


def hf_train(args) -> dict:
  import torch

  from train_step import check_losses

  device = "cuda" if torch.cuda.is_available() else "cpu"
  fla = lift_fla_guard()
  config = hf_text_config(args, **_slice(args))
  model, impl = hf_model(config, device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
  ids = torch.randint(0, config.vocab_size, (1, args.train_length), device=device)

  def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)

  losses = [step() for _ in range(args.warmup)]
  sync(device)
  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  sync(device)
  elapsed = (time.perf_counter() - start) / args.steps
  losses.append(loss)
  return dict(fla=fla, experts_impl=impl, step_s=elapsed, tok_s=args.train_length / elapsed,
              peak_gb=peak_gb_torch(device), losses=losses, problems=check_losses(losses, config.vocab_size))


def ours_train(args) -> dict:
  import jax

  from maxtext.trainers import flops
  from maxtext.trainers import mesh as train_mesh
  from train_step import check_losses, time_train_steps

  config = our_config(args, **_slice(args), scan_layers=False, remat_policy="none", max_target_length=args.train_length,
                      per_device_batch_size=1, learning_rate=1e-4, warmup_steps_fraction=0.0, steps=1000,
                      ici_fsdp_parallelism=1)
  mesh = train_mesh.make_training_mesh(config, jax.devices()[:1])
  _, _, losses, elapsed, _ = time_train_steps(config, mesh, args.train_length, args.warmup, args.steps)
  tflops = flops.training_flops_per_token(config) * args.train_length / elapsed / 1e12
  peak = flops.peak_tflops(jax.devices()[0].device_kind)
  return dict(step_s=elapsed, tok_s=args.train_length / elapsed, tflops=tflops, mfu=tflops / peak if peak else None,
              peak_gb=peak_gb_jax(), losses=losses, problems=check_losses(losses, config.vocab_size))


WORKERS = {"hf_decode": hf_decode, "ours_decode": ours_decode, "hf_train": hf_train, "ours_train": ours_train}


# ------------------------------------------------------------------------------------------------------- driver


def _cell(value, fmt="{:.1f}") -> str:
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _ratio(ours, theirs, higher_is_better=True) -> str:
  if ours is None or theirs is None or not ours or not theirs:
    return "-"
  return f"{(ours / theirs) if higher_is_better else (theirs / ours):.2f}x"


def table(results: dict, args) -> str:
  rows = ["| Qwen3.6-35B-A3B, one GPU, bf16 | ours | HF + fla | ours vs HF |", "|---|---|---|---|"]
  ours, hf = results.get("ours_decode", {}), results.get("hf_decode", {})
  if ours or hf:
    for batch in args.batch_sizes:
      rows.append(f"| decode tokens/s, batch {batch} (prompt {args.prompt_length}) | "
                  f"{_cell(ours.get(f'tok_s_{batch}'), '{:.0f}')} | {_cell(hf.get(f'tok_s_{batch}'), '{:.0f}')} | "
                  f"{_ratio(ours.get(f'tok_s_{batch}'), hf.get(f'tok_s_{batch}'))} |")
      rows.append(f"| time per output token, batch {batch} (ms) | {_cell(ours.get(f'tpot_ms_{batch}'), '{:.2f}')} | "
                  f"{_cell(hf.get(f'tpot_ms_{batch}'), '{:.2f}')} | "
                  f"{_ratio(ours.get(f'tpot_ms_{batch}'), hf.get(f'tpot_ms_{batch}'), False)} |")
    for length in args.ttft_lengths:
      key = f"ttft_ms_{length}"
      rows.append(f"| time to first token, {length}-token prompt (ms) | {_cell(ours.get(key))} | "
                  f"{_cell(hf.get(key))} | {_ratio(ours.get(key), hf.get(key), False)} |")
    rows.append(f"| peak device memory, decode (GB) | {_cell(ours.get('peak_gb'))} | {_cell(hf.get('peak_gb'))} | |")
    if "mtp_round_ms" in ours:
      rows.append(f"| MTP round (1 draft + verify) ms; / plain step; same tokens as greedy | "
                  f"{ours['mtp_round_ms']:.2f}; {ours['mtp_round_over_step']:.2f}; {ours['mtp_same_tokens']} | | |")
      rows.append(f"| time per output token if every draft held (ms); SGLang published, H200, with MTP | "
                  f"{ours['mtp_tpot_ms_all_accepted']:.2f} | {SGLANG_TPOT_MS} (SGLang, not same run) | |")
    if "logits_max_abs_diff" in ours:
      rows.append(f"| device check: prefill + steps vs full forward, max abs logit diff (f32) | "
                  f"{ours['logits_max_abs_diff']:.1e} | | |")
  ours_t, hf_t = results.get("ours_train", {}), results.get("hf_train", {})
  if ours_t or hf_t:
    rows.append(f"| train step, 4-layer real-shape slice, 1 x {args.train_length} tokens (tokens/s) | "
                f"{_cell(ours_t.get('tok_s'), '{:.0f}')} | {_cell(hf_t.get('tok_s'), '{:.0f}')} | "
                f"{_ratio(ours_t.get('tok_s'), hf_t.get('tok_s'))} |")
    rows.append(f"| peak device memory, train slice (GB) | {_cell(ours_t.get('peak_gb'))} | "
                f"{_cell(hf_t.get('peak_gb'))} | |")
    problems = ours_t.get("problems", []) + hf_t.get("problems", [])
    rows.append(f"| train checks (loss near ln V, falling) | {'ok' if not problems else '; '.join(problems)} | | |")
  errors = {k: v["error"] for k, v in results.items() if "error" in v}
  if errors:
    rows.append(f"| failed workers | {errors} | | |")
  return "\n".join(rows)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", default="decode,train", type=lambda s: s.split(","))
  parser.add_argument("--batch-sizes", default="1,64", type=lambda s: [int(x) for x in s.split(",")])
  parser.add_argument("--prompt-length", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--peer-new-tokens", type=int, default=64)
  parser.add_argument("--ttft-lengths", default="4096,32768", type=lambda s: [int(x) for x in s.split(",")])
  parser.add_argument("--train-length", type=int, default=TRAIN_LENGTH)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--scan-layers", action="store_true", help="our decode with scanned layers (faster compile)")
  parser.add_argument("--no-peer", dest="peer", action="store_false")
  parser.add_argument("--no-mtp", dest="mtp", action="store_false")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--json")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    args.batch_sizes, args.prompt_length, args.new_tokens, args.peer_new_tokens = [1, 4], 8, 8, 4
    args.ttft_lengths, args.train_length, args.steps, args.warmup = [32, 64], 64, 2, 3
  if args.worker:
    result = WORKERS[args.worker](args)
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f)
    return 0
  argv = sys.argv[1:]
  # "--json PATH" and "--json=PATH" are this process's output only, never the workers'.
  passthrough = [a for i, a in enumerate(argv) if not a.startswith("--json") and not (i and argv[i - 1] == "--json")]
  results = {}
  scratch = os.environ.get("OUT") or tempfile.mkdtemp(prefix="qwen36_bench_")
  for part in args.parts:
    for side in (["hf"] if args.peer else []) + ["ours"]:
      results[f"{side}_{part}"] = run_worker(__file__, f"{side}_{part}", passthrough, scratch)
  text = table(results, args)
  print(text)
  out = args.json or (os.path.join(os.environ["OUT"], "qwen36_real_size.json") if os.environ.get("OUT") else None)
  if out:
    with open(out, "w", encoding="utf-8") as f:
      json.dump({"results": results, "args": vars(args), "table": text}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
