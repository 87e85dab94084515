"""Decode on a GPU: our engine against HF transformers' generate (with fla) on the same GPU, in one run.

Usage: python benchmarks/decode.py [--batch-sizes 1,64] [--prompt-length 128] [--new-tokens 256]
           [--ttft-prompt-length 4096] [--no-peer] [--no-mtp] [--json out.json] [--quick]
Model: the 2.5B bench config (hidden 2048, 8 layers = 2 x (3 Gated DeltaNet + 1 attention), 64 experts top-8,
expert and shared intermediate 512, vocab 151936), random weights, bf16 weights and compute, greedy.
1. Checks first: prefill + steps give the full forward pass's logits (float32 copy of a small model, GPU kernels);
   speculative (MTP) decoding returns plain greedy's tokens on the bench model.
2. Peer: HF Qwen3NextForCausalLM.generate (fla kernels, grouped_mm experts), in a subprocess run before ours so the
   two never share GPU memory: tokens/s at each batch size (prompt 128, 256 new tokens, time of the whole call) and
   time to first token (the generate call with one new token) for a 4096-token prompt.
3. Ours, the same measurements; plus the batch-1 bandwidth bound (bytes a step must read / 3.0 TB/s) and the
   fraction of it reached, and speculative decoding: draft acceptance rate and speed-up over plain decoding.
Prints a markdown table last. --quick: a tiny model on any backend (a smoke test; its numbers mean nothing).
fla: `pip install --no-index --no-deps --target /tmp/site .fla/*.whl` and PYTHONPATH=/tmp/site for the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(_HERE), "src")]

from bench_model import BENCH_MODEL, hf_bench_config  # noqa: E402

BANDWIDTH = 3.0e12  # bytes/s: an H100's measured device copy (/work/shared/bench/README.md)
BENCH = {**BENCH_MODEL, "mtp_num_layers": 1}  # ours drafts with the MTP head; HF ignores it
QUICK = dict(model_name="qwen3-next-tiny")


# ----------------------------------------------------------------------------------------------- HF peer


def peer_main(args) -> None:
  """Runs in a subprocess: HF generate timings as one JSON line on stdout."""
  import torch
  try:
    import fla.ops.common.chunk_o as chunk_o  # noqa: F401 - fla's kernels are what HF uses when importable
    chunk_o.TRITON_ABOVE_3_7_1 = True  # forward only here; the guard is about fla's backward on Hopper
    fla_ok = True
  except ImportError:
    fla_ok = False
  from transformers import Qwen3NextForCausalLM

  b = BENCH
  config = hf_bench_config()
  with torch.device("cuda"):
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM._from_config(config, dtype=torch.bfloat16, experts_implementation="grouped_mm")
  model.eval()

  def generate(batch, prompt, new):
    ids = torch.randint(0, b["vocab_size"], (batch, prompt), device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out.shape[1] - prompt

  result = {"fla": fla_ok}
  with torch.no_grad():
    for batch in args.batch_sizes:
      generate(batch, args.prompt_length, 8)
      seconds, new = generate(batch, args.prompt_length, args.new_tokens)
      result[f"tok_s_{batch}"] = batch * new / seconds
    generate(1, args.ttft_prompt_length, 1)
    result["ttft_ms"] = min(generate(1, args.ttft_prompt_length, 1)[0] for _ in range(3)) * 1e3
  print(json.dumps(result), flush=True)


def run_peer(args) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--peer-worker", "--batch-sizes",
             ",".join(map(str, args.batch_sizes)), "--prompt-length", str(args.prompt_length), "--new-tokens",
             str(args.new_tokens), "--ttft-prompt-length", str(args.ttft_prompt_length)]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    print(done.stderr[-3000:], file=sys.stderr)
    return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
  return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- ours


def bench_config(args, **overrides):
  from maxtext.configs import load_config
  values = dict(QUICK if args.quick else BENCH)
  values.update(dtype="bfloat16", weight_dtype="bfloat16", scan_layers=False, max_prefill_predict_length=16)
  values.update(overrides)
  return load_config(overrides=values)


def step_bytes(engine) -> float:
  """Bytes one batch-1 step must read: every weight but the embedding table (one row) and the MTP head, only
  top-k / num_experts of the routed experts, plus the delta-rule states read and written."""
  from maxtext.models import params as model_params
  spec, total = engine.spec, 0.0
  for path, leaf in model_params.flatten(engine.params).items():
    if path.startswith(("token_embedder", "mtp/")):
      continue
    share = spec.moe.top_k / spec.moe.num_experts if "/mlp/experts/" in path else 1.0
    total += leaf.size * leaf.dtype.itemsize * share
  gdn = spec.gated_delta_net
  states = sum(t == "linear_attention" for t in spec.layer_types) * gdn.num_value_heads * gdn.key_head_dim
  return total + 2 * 4 * states * gdn.value_head_dim


def timed_generate(engine, prompts, requests):
  """(seconds of the whole call, seconds to the first event, events)."""
  start = time.perf_counter()
  first, events = None, []
  for event in engine.generate(prompts, requests):
    first = first or time.perf_counter() - start
    events.append(event)
  return time.perf_counter() - start, first, events


def check_logits(args) -> float:
  """Max |logit difference| of prefill + 4 steps against the full forward pass (float32 small model)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from maxtext.configs import load_config
  from maxtext.layers.decode_cache import DecodeContext
  from maxtext.models.qwen3_next import Qwen3NextForCausalLM
  from maxtext.models.spec import ModelSpec

  config = load_config(overrides=dict(dtype="float32", weight_dtype="float32", scan_layers=False,
                                      linear_key_head_dim=32, linear_value_head_dim=32, max_target_length=256))
  spec = ModelSpec.from_config(config)
  model = Qwen3NextForCausalLM(spec)
  params = jax.tree.map(lambda x: getattr(x, "value", x),
                        model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"],
                        is_leaf=lambda x: hasattr(x, "value"))
  lengths, steps = np.array([100, 37]), 4
  seq = jnp.asarray(np.random.default_rng(0).integers(0, spec.vocab_size, (2, 100 + steps)))
  full = np.asarray(model.apply({"params": params}, seq, with_mtp=False).logits)
  hidden_fn = jax.jit(lambda *a: model.apply({"params": params}, *a, method="decode_hidden"))
  logits = lambda h: np.asarray(model.apply({"params": params}, h, method="logits_of"))
  positions = jnp.broadcast_to(jnp.arange(128), (2, 128))
  prompt = jnp.where(positions < lengths[:, None], jnp.pad(seq, ((0, 0), (0, 24))), 0)
  hidden, cache = hidden_fn(prompt, positions, None,
                            DecodeContext(jnp.zeros(2, jnp.int32), positions < lengths[:, None], capacity=160))
  worst = max(float(np.abs(logits(hidden)[r, :n] - full[r, :n]).max()) for r, n in enumerate(lengths))
  cursor = jnp.asarray(lengths, jnp.int32)
  for _ in range(steps):
    token = jnp.take_along_axis(seq, cursor[:, None], axis=1)
    hidden, cache = hidden_fn(token, cursor[:, None], cache, DecodeContext(cursor, jnp.ones((2, 1), bool)))
    expected = np.take_along_axis(full, np.asarray(cursor)[:, None, None], axis=1)
    worst = max(worst, float(np.abs(logits(hidden) - expected).max()))
    cursor = cursor + 1
  return worst


def ours(args) -> dict:
  import jax
  import numpy as np
  from maxtext.inference.engine import Engine
  from maxtext.inference.sampling import SamplingParams

  result = {"device": jax.devices()[0].device_kind, "logits_max_abs_diff": check_logits(args)}
  rng = np.random.default_rng(0)
  vocab = 512 if args.quick else BENCH["vocab_size"]
  context = args.prompt_length + args.new_tokens
  base = Engine(bench_config(args, max_target_length=context))
  result["step_bytes"] = step_bytes(base)
  greedy = SamplingParams(max_tokens=args.new_tokens)
  for batch in args.batch_sizes:
    prompts = rng.integers(0, vocab, (batch, args.prompt_length)).tolist()
    timed_generate(base, prompts, [SamplingParams(max_tokens=8)] * batch)  # compile
    seconds, _, _ = timed_generate(base, prompts, [greedy] * batch)
    result[f"tok_s_{batch}"] = batch * args.new_tokens / seconds

  long = Engine(bench_config(args, max_target_length=args.ttft_prompt_length + 16,
                             max_prefill_predict_length=args.ttft_prompt_length), base.params)
  prompt = rng.integers(0, vocab, (1, args.ttft_prompt_length)).tolist()
  timed_generate(long, prompt, [SamplingParams(max_tokens=1)])
  result["ttft_ms"] = min(timed_generate(long, prompt, [SamplingParams(max_tokens=1)])[1] for _ in range(3)) * 1e3

  if args.mtp:
    spec_engine = Engine(bench_config(args, max_target_length=context, mtp_speculative_decoding=True,
                                      mtp_num_draft_tokens=args.draft_tokens), base.params)
    prompts = rng.integers(0, vocab, (1, args.prompt_length)).tolist()
    timed_generate(spec_engine, prompts, [SamplingParams(max_tokens=8)])
    plain_s, _, plain = timed_generate(base, prompts, [greedy])
    spec_s, _, spec = timed_generate(spec_engine, prompts, [greedy])
    stats = spec_engine.last_stats
    result["mtp_same_tokens"] = [e.token_id for e in plain] == [e.token_id for e in spec]
    result["mtp_acceptance"] = stats["accepted"] / max(stats["drafted"], 1)
    result["mtp_speedup"] = plain_s / spec_s
    # A random MTP head is rarely right: also give the speed-up a trained one would bring if every draft held,
    # from the measured cost of a verification round against a plain step.
    round_s, step_s = spec_s / (stats["steps"] + 1), plain_s / args.new_tokens
    result["mtp_round_over_step"] = round_s / step_s
    result["mtp_speedup_all_accepted"] = (args.draft_tokens + 1) * step_s / round_s
  return result


def table(peer: dict, mine: dict, args) -> str:
  rows = ["| measure | ours | HF generate (fla) | ours / HF |", "|---|---|---|---|"]
  for batch in args.batch_sizes:
    a, b = mine.get(f"tok_s_{batch}"), peer.get(f"tok_s_{batch}")
    rows.append(f"| tokens/s, batch {batch} (prompt {args.prompt_length}, {args.new_tokens} new) | {a:.0f} | "
                + (f"{b:.0f} | {a / b:.1f}x |" if b else "- | - |"))
  a, b = mine["ttft_ms"], peer.get("ttft_ms")
  rows.append(f"| time to first token, {args.ttft_prompt_length}-token prompt (ms) | {a:.1f} | "
              + (f"{b:.1f} | {b / a:.2f}x faster |" if b else "- | - |"))
  bound = BANDWIDTH / mine["step_bytes"]
  if 1 in args.batch_sizes:
    rows.append(f"| batch-1 bound ({mine['step_bytes'] / 1e9:.2f} GB/step at 3.0 TB/s): {bound:.0f} tok/s | "
                f"{mine['tok_s_1'] / bound:.0%} of it | | |")
  if "mtp_acceptance" in mine:
    rows.append(f"| MTP speculative ({args.draft_tokens} draft), batch 1: acceptance, speed-up, same tokens | "
                f"{mine['mtp_acceptance']:.2f}, {mine['mtp_speedup']:.2f}x, {mine['mtp_same_tokens']} | | |")
    rows.append(f"| MTP round / plain step time; speed-up if every draft held | {mine['mtp_round_over_step']:.2f}, "
                f"{mine['mtp_speedup_all_accepted']:.2f}x | | |")
  rows.append(f"| check: prefill + steps vs full forward, max abs logit diff (f32) | {mine['logits_max_abs_diff']:.1e}"
              " | | |")
  return "\n".join(rows)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-sizes", default="1,64", type=lambda s: [int(x) for x in s.split(",")])
  parser.add_argument("--prompt-length", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--ttft-prompt-length", type=int, default=4096)
  parser.add_argument("--draft-tokens", type=int, default=1)
  parser.add_argument("--no-peer", dest="peer", action="store_false")
  parser.add_argument("--no-mtp", dest="mtp", action="store_false")
  parser.add_argument("--json")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.peer_worker:
    peer_main(args)
    return 0
  if args.quick:
    args.batch_sizes, args.prompt_length, args.new_tokens, args.ttft_prompt_length = [1, 4], 8, 16, 32
  peer = run_peer(args) if args.peer else {}
  print("peer:", json.dumps(peer), flush=True)
  mine = ours(args)
  print("ours:", json.dumps(mine), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peer": peer, "ours": mine, "args": vars(args)}, f, indent=1)
  print(table(peer, mine, args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
