"""One RL iteration of the 2.5B bench model on one device: rollout by our engine on the live parameters, then the
GRPO update by our trainer, with the time of each phase and the bf16 train/rollout mismatch.

  python3 benchmarks/rl_step.py [--prompts 8] [--generations 8] [--prompt-length 256] [--response-length 512] \
      [--draft-tokens 1] [--check-tokens 64] [--rows 8] [--weight-dtype float32] [--json out.json] [--tiny]

Model: the "2.5B bench" config of shared/bench (see bench_model.py) plus one MTP layer, bf16 compute, random
weights. Phases, each compiled by a warm-up call first and then timed:
  - rollout: prompts x generations responses sampled at temperature 1 (the RL setting), exactly --response-length
    tokens each (no stop token), with the engine's per-token log-probs, without and with MTP speculation
    (speculative sampling: the same distribution, --draft-tokens drafts a round). A random MTP head's acceptance
    says little about a trained one's, so the table also gives the speed if every draft held, from the measured
    cost of a verification round against a plain step;
  - a greedy check on --check-tokens tokens: greedy speculation against plain greedy (bf16: rows may part at near
    ties, see greedy_divergence; the float32 CPU tests require identical tokens);
  - train: the GRPO update on each rollout from the same starting state (packing, on-policy forward + backward,
    AdamW); train tokens/s counts prompt and response tokens (the second, timed update). Mismatch = |logp_train -
    logp_rollout| over response tokens and k3 KL, in bf16, for the plain and the speculative rollout.
--tiny runs the tiny model at toy lengths on a CPU (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench_model import BENCH_MODEL, prefer_fast_gpu_compiles


def rl_config(args, **overrides):
  from maxtext.configs import load_config

  model = {"model_name": "qwen3-next-tiny"} if args.tiny else {**BENCH_MODEL, "mtp_num_layers": 1}
  return load_config(overrides={
      **model, "dtype": "bfloat16", "weight_dtype": args.weight_dtype, "scan_layers": args.scan_layers,
      "remat_policy": args.remat_policy, "max_target_length": args.prompt_length + args.response_length + 1,
      "max_prefill_predict_length": args.prompt_length, "per_device_batch_size": args.rows,
      "num_generations": args.generations, "rollout_batch_size": args.prompts,
      "max_response_length": args.response_length, "rl_temperature": 1.0, "rl_algorithm": "grpo",
      "learning_rate": 1e-6, "warmup_steps_fraction": 0.0, "steps": 10, "mtp_loss_scaling_factor": 0.2,
      "mtp_num_draft_tokens": args.draft_tokens, "enable_checkpointing": False, "enable_tensorboard": False,
      **overrides,
  })


def generate(engine, prompts, sampling):
  """(seconds, responses, log-probs) of one generate call, waited for."""
  responses = [[] for _ in prompts]
  logprobs = [[] for _ in prompts]
  began = time.perf_counter()
  for event in engine.generate(prompts, sampling):
    responses[event.request].append(event.token_id)
    logprobs[event.request].append(event.logprob)
  return time.perf_counter() - began, responses, logprobs


def _timed_rollout(engine, prompts, sampled):
  """(seconds, responses, log-probs, engine stats) of the sampled rollout, after a short compiling call."""
  from maxtext.inference.sampling import SamplingParams

  n = len(prompts)
  generate(engine, prompts, [SamplingParams(max_tokens=4, temperature=1.0, seed=i) for i in range(n)])  # compile
  seconds, responses, logprobs = generate(engine, prompts, sampled)
  return seconds, responses, logprobs, dict(engine.last_stats)


def greedy_divergence(plain, plain_lp, spec, spec_lp) -> dict:
  """Where greedy speculation and plain greedy part: rows that differ, the mean first differing position, and the
  largest |logp(plain's pick) - logp(speculation's pick)| there, each under its own engine. In bf16 the verify pass
  (k + 1 tokens at once) rounds differently from a one-token step, so a near tie can flip: a gap near bf16's noise
  says that happened; a large one would point at a bug."""
  firsts, gaps = [], []
  for a, a_lp, b, b_lp in zip(plain, plain_lp, spec, spec_lp):
    if a != b:
      i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
      firsts.append(i)
      gaps.append(abs(a_lp[i] - b_lp[i]))
  return {"mtp_greedy_rows_differing": len(firsts), "mtp_greedy_first_difference_mean": float(sum(firsts) / max(
      len(firsts), 1)), "mtp_greedy_gap_max": max(gaps, default=0.0)}


def run(args, save=lambda result: None) -> dict:
  """The measurements; save(result so far) runs after each phase (a run cut by a time limit keeps them)."""
  import jax
  import numpy as np

  from maxtext.inference.engine import Engine
  from maxtext.inference.sampling import SamplingParams
  from maxtext.trainers import mesh as train_mesh
  from maxtext.trainers.post_train.rl.rollout import Rollout
  from maxtext.trainers.post_train.rl.step import build_rl_step
  from maxtext.trainers.post_train.rl.update import train_on_rollout
  from maxtext.trainers.train_step import build_training

  config = rl_config(args)
  devices = jax.devices()[:1]
  mesh = train_mesh.make_training_mesh(config, devices)
  training = build_training(config, mesh)
  rl_step = build_rl_step(config, training)
  state = training.init_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  unique = rng.integers(0, config.vocab_size, (args.prompts, args.prompt_length)).tolist()
  prompts = [p for p in unique for _ in range(args.generations)]
  n, k = len(prompts), args.draft_tokens
  sampled = [SamplingParams(max_tokens=args.response_length, temperature=1.0, seed=i) for i in range(n)]
  result = {"device": jax.devices()[0].device_kind, "responses": n, "params": int(sum(
      x.size for x in jax.tree.leaves(state["params"])))}

  engine = Engine(config, params=state["params"], devices=devices)  # the live parameters, no copy
  plain_s, responses, logprobs, _ = _timed_rollout(engine, prompts, sampled)
  result["rollout_s"], result["rollout_tok_s"] = plain_s, n * args.response_length / plain_s
  save(result)
  greedy = [SamplingParams(max_tokens=args.check_tokens)] * n
  _, plain_greedy, plain_greedy_lp = generate(engine, prompts, greedy)
  del engine

  spec_engine = Engine(rl_config(args, mtp_speculative_decoding=True), params=state["params"], devices=devices)
  spec_s, spec_responses, spec_logprobs, stats = _timed_rollout(spec_engine, prompts, sampled)
  result["mtp_rollout_s"], result["mtp_rollout_tok_s"] = spec_s, n * args.response_length / spec_s
  result["mtp_acceptance"] = stats["accepted"] / max(stats["drafted"], 1)
  # A round costs spec_s / rounds (the prefill counted as one); a plain step plain_s / response_length. If every
  # draft held, a round would emit k + 1 tokens.
  round_s, step_s = spec_s / (stats["steps"] + 1), plain_s / args.response_length
  result["mtp_round_over_step"] = round_s / step_s
  result["mtp_tok_s_all_accepted"] = result["rollout_tok_s"] * (k + 1) * step_s / round_s
  _, spec_greedy, spec_greedy_lp = generate(spec_engine, prompts, greedy)
  result["mtp_greedy_same_tokens"] = spec_greedy == plain_greedy
  result.update(greedy_divergence(plain_greedy, plain_greedy_lp, spec_greedy, spec_greedy_lp))
  del spec_engine
  save(result)

  rewards = rng.integers(0, 2, n).astype(np.float32)  # random verdicts: every group has signal, as in a real step
  make = lambda r, lp, s: Rollout(args.generations, [tuple(p) for p in prompts], r, lp, rewards, s)
  # Both updates start from the same parameters (a copy; the update donates its state): each mismatch is on-policy.
  start = jax.tree.map(lambda x: x.copy(), state)
  _, first = train_on_rollout(config, training, rl_step, start, make(spec_responses, spec_logprobs, spec_s))  # compiles
  del start
  result.update({f"mtp_{key}": first[key] for key in ("mismatch_mean", "mismatch_max", "mismatch_k3")})
  save(result)
  state, timed = train_on_rollout(config, training, rl_step, state, make(responses, logprobs, plain_s))
  result.update({key: timed[key] for key in ("mismatch_mean", "mismatch_max", "mismatch_k3")})
  result["first_ratio_deviation_max"] = max(first["first_ratio_deviation_max"], timed["first_ratio_deviation_max"])
  result["train_s"], result["train_tok_s"] = timed["train_s"], timed["train_tokens_per_s"]
  result["optimizer_steps"], result["train_tokens"] = timed["optimizer_steps"], timed["train_tokens"]
  result["policy_loss_finite"] = bool(np.isfinite(timed["policy_loss"]) and np.isfinite(timed["grad_norm"]))
  result["iteration_s"] = result["rollout_s"] + result["train_s"]
  result["mtp_iteration_s"] = result["mtp_rollout_s"] + result["train_s"]
  memory = jax.devices()[0].memory_stats() or {}
  result["peak_gib"] = memory.get("peak_bytes_in_use", 0) / 2**30
  return result


def table(r: dict, args) -> str:
  rows = [
      ("rollout, sampled T=1, no speculation (tokens/s)", f"{r['rollout_tok_s']:,.0f}"),
      (f"rollout, sampled T=1, MTP speculation {args.draft_tokens} draft (tokens/s)", f"{r['mtp_rollout_tok_s']:,.0f}"),
      ("MTP drafts accepted (random head)", f"{r['mtp_acceptance']:.3f}"),
      ("MTP round cost / plain step cost", f"{r['mtp_round_over_step']:.2f}"),
      ("MTP tokens/s if every draft held (from the round cost)", f"{r['mtp_tok_s_all_accepted']:,.0f}"),
      (f"greedy speculation = plain greedy ({args.check_tokens} tokens)", f"{r['mtp_greedy_same_tokens']}"),
      ("greedy rows differing / mean first difference / max logp gap there",
       f"{r['mtp_greedy_rows_differing']} of {r['responses']} / {r['mtp_greedy_first_difference_mean']:.1f} / "
       f"{r['mtp_greedy_gap_max']:.2e}"),
      ("train (prompt + response tokens/s)", f"{r['train_tok_s']:,.0f}"),
      ("time: rollout / train / iteration (s)", f"{r['rollout_s']:.2f} / {r['train_s']:.2f} / {r['iteration_s']:.2f}"),
      ("time with MTP rollout: rollout / iteration (s)", f"{r['mtp_rollout_s']:.2f} / {r['mtp_iteration_s']:.2f}"),
      ("mismatch bf16, plain rollout: mean / max abs logp diff", f"{r['mismatch_mean']:.4f} / {r['mismatch_max']:.4f}"),
      ("mismatch bf16, MTP rollout: mean / max abs logp diff",
       f"{r['mtp_mismatch_mean']:.4f} / {r['mtp_mismatch_max']:.4f}"),
      ("mismatch bf16: k3 KL(rollout || train) per token, plain / MTP",
       f"{r['mismatch_k3']:.2e} / {r['mtp_mismatch_k3']:.2e}"),
      ("first update max abs(ratio - 1)", f"{r['first_ratio_deviation_max']:.1e}"),
      ("optimizer steps / peak memory (GiB)", f"{r['optimizer_steps']} / {r['peak_gib']:.1f}"),
  ]
  head = (f"{r['device']}: {r['params']:,} parameters, {args.prompts} prompts x {args.generations} responses, prompt"
          f" {args.prompt_length} + response {args.response_length} tokens, bf16 compute, {args.weight_dtype} weights")
  return "\n".join([head, "", "| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--generations", type=int, default=8)
  parser.add_argument("--prompt-length", type=int, default=256)
  parser.add_argument("--response-length", type=int, default=512)
  parser.add_argument("--draft-tokens", type=int, default=1)
  parser.add_argument("--check-tokens", type=int, default=64, help="tokens of the greedy speculation check")
  parser.add_argument("--rows", type=int, default=8, help="packed training rows per micro-batch")
  parser.add_argument("--weight-dtype", default="float32", help="parameter dtype (the trainer's master weights)")
  parser.add_argument("--remat-policy", default="full")
  parser.add_argument("--json", help="also write the numbers to this file (after each phase)")
  parser.add_argument("--tiny", action="store_true", help="the tiny model at toy lengths (CPU check)")
  parser.add_argument("--scan-layers", action="store_true",
                      help="scanned layers: one compile of the layer body (the unscanned bench model compiles for minutes a shape on a GPU)")
  args = parser.parse_args()
  args.xla_flags = prefer_fast_gpu_compiles()
  if args.tiny:
    args.prompts, args.generations, args.prompt_length, args.response_length, args.rows = 2, 2, 8, 8, 1
    args.check_tokens = 8

  def save(partial: dict) -> None:
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"ours": partial, "args": vars(args)}, f, indent=1)

  result = run(args, save)
  save(result)
  print("ours:", json.dumps(result), flush=True)
  print(table(result, args))
  ok = result["policy_loss_finite"] and result["first_ratio_deviation_max"] == 0.0
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
