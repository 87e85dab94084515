"""Serving benchmark: the real HTTP server (continuous batching, prefix cache on and off) under a mixed workload,
against HF transformers' generate on the same GPU in the same run.

Usage: python benchmarks/serving.py [--users 1,16,64] [--requests 128] [--rate 32] [--prefix-length 512]
           [--prefixes 4] [--suffix 32,256] [--new-tokens 32,256] [--chunk 64] [--scoring-requests 64]
           [--no-peer] [--scan-layers] [--json out.json] [--quick]
Model: the 2.5B bench config (benchmarks/bench_model.py), random weights, bf16, greedy.
Workload (one seed, the same for every run and the peer): each request is one of `--prefixes` shared prefixes
(a system prompt / few-shot block of --prefix-length tokens) + a random suffix (length uniform in --suffix),
asking for a number of new tokens uniform in --new-tokens. Requests arrive as a Poisson process of --rate per second
(0: all at once) and at most --users are in flight, streamed, token-id prompts; a run sends max(16, 2 x users) of
them (all 128 at 64 users).
Reported per (users, prefix cache): output tokens/s over the run, TTFT and time per output token (p50/p90/p99),
prefix cache hit rate; at users=1 also decode tokens/s (1 / TPOT) against the batch-1 bandwidth bound (the bytes a
step reads / 4.8 TB/s, an H200's HBM); lm-eval's MMLU load (echo + logprobs=1 + max_tokens=1, 4 prompts a
request of ~prefix-length tokens, 8 in flight): requests/s. Peer: HF generate (fla when importable) over the same
requests in static batches of `users` (left-padded, the longest request's new tokens), useful tokens/s.
--quick: a tiny model on any backend and a small workload (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(_HERE), "src"), _HERE]

from bench_model import BENCH_MODEL, hf_bench_config, prefer_fast_gpu_compiles  # noqa: E402

HBM_BANDWIDTH = 4.8e12  # bytes/s: an H200's HBM3e
QUICK = dict(model_name="qwen3-next-tiny", vocab_size=2048)


# ----------------------------------------------------------------------------------------------- workload


def workload(args) -> list[dict]:
  """[{"prompt": ids, "max_tokens": n, "arrival": seconds}] from one seed."""
  import numpy as np
  rng = np.random.default_rng(0)
  vocab = args.vocab
  prefixes = [rng.integers(0, vocab, args.prefix_length).tolist() for _ in range(args.prefixes)]
  arrivals = np.cumsum(rng.exponential(1 / args.rate, args.requests)) if args.rate > 0 else np.zeros(args.requests)
  out = []
  for i in range(args.requests):
    suffix = rng.integers(0, vocab, int(rng.integers(args.suffix[0], args.suffix[1] + 1))).tolist()
    out.append({"prompt": prefixes[i % args.prefixes] + suffix, "arrival": float(arrivals[i]),
                "max_tokens": int(rng.integers(args.new_tokens[0], args.new_tokens[1] + 1))})
  return out


def requests_for(users: int, total: int) -> int:
  """Requests a run sends: two waves of `users` (at least 16), capped by the workload; keeps the
  batch-1 runs (ours and HF's) inside one device call."""
  return min(total, max(16, 2 * users))


def percentiles(values: list[float]) -> dict[str, float]:
  if not values:
    return {}
  ordered = sorted(values)
  pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
  return {"p50": statistics.median(ordered), "p90": pick(0.9), "p99": pick(0.99)}


# ----------------------------------------------------------------------------------------------- client


def stream_one(port: int, request: dict) -> dict:
  """One streamed completion: its send, first-token and end times and tokens received."""
  body = json.dumps({"model": "bench", "prompt": request["prompt"], "max_tokens": request["max_tokens"],
                     "temperature": 0, "stream": True})
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  start = time.perf_counter()
  connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
  response = connection.getresponse()
  if response.status != 200:
    raise RuntimeError(f"server answered {response.status}: {response.read()[:500]!r}")
  first, tokens = None, 0
  for line in response:
    if line.startswith(b"data: {"):
      tokens += 1
      first = first or time.perf_counter()
  connection.close()
  return {"start": start, "first": first, "end": time.perf_counter(), "tokens": tokens}


def drive(port: int, requests: list[dict], users: int) -> dict:
  """Send the requests at their arrival times, at most `users` in flight; the run's statistics."""
  slots = threading.Semaphore(users)
  origin = time.perf_counter()

  def send(request):
    time.sleep(max(0.0, origin + request["arrival"] - time.perf_counter()))
    with slots:
      return stream_one(port, request)

  with concurrent.futures.ThreadPoolExecutor(max(1, min(len(requests), users * 2))) as pool:
    done = list(pool.map(send, requests))
  tokens = sum(d["tokens"] for d in done)
  wall = max(d["end"] for d in done) - min(d["start"] for d in done)
  ttft = [(d["first"] - d["start"]) * 1e3 for d in done if d["first"]]
  tpot = [(d["end"] - d["first"]) * 1e3 / (d["tokens"] - 1) for d in done if d["first"] and d["tokens"] > 1]
  return {"output_tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "ttft_ms": percentiles(ttft),
          "tpot_ms": percentiles(tpot)}


def score_load(port: int, requests: list[dict], in_flight: int = 8) -> float:
  """lm-eval's MMLU request shape (4 prompts, echo, logprobs=1, max_tokens=1): requests per second."""
  def one(request):
    prompts = [request["prompt"] + [17 + k] for k in range(4)]
    body = json.dumps({"model": "bench", "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True,
                       "temperature": 0, "seed": 1234})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
      raise RuntimeError(f"scoring answered {response.status}: {response.read()[:500]!r}")
    response.read()
    connection.close()

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
    list(pool.map(one, requests))
  return len(requests) / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------- server


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serving(engine, tokenizer, users: int, chunk: int, cache_bytes: int):
  """The real app (uvicorn in a thread) over a fresh Scheduler of `users` rows; yields (port, batcher)."""
  import uvicorn
  from maxtext.inference.sampling import SamplingParams
  from maxtext.inference.scheduler import Scheduler
  from maxtext.serving.app import build_app
  from maxtext.serving.continuous_batcher import ContinuousBatcher
  from maxtext.serving.served_model import ServedModel

  scheduler = Scheduler(engine, rows=users, chunk=chunk, prefix_cache_bytes=cache_bytes)
  batcher = ContinuousBatcher(engine, scheduler, window_s=0.002, max_batch=max(8, users))
  model = ServedModel(batcher, tokenizer, "bench", engine.max_context, engine.spec.vocab_size, SamplingParams,
                      max_prompts_per_request=4096)
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(build_app(model, max_body_bytes=1 << 30), host="127.0.0.1", port=port,
                                         log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  try:
    yield port, batcher
  finally:
    server.should_exit = True
    thread.join(timeout=30)


def hit_rate(batcher) -> float:
  stats = batcher.prefix_cache_stats()
  return stats["hits"] / stats["lookups"] if stats.get("lookups") else 0.0


def ours(args, requests: list[dict]) -> dict:
  import jax
  from maxtext.assets.tokenizers import ensure_qwen3_tokenizer
  from maxtext.configs import load_config
  from maxtext.inference.engine import Engine
  from transformers import AutoTokenizer

  values = dict(QUICK if args.quick else BENCH_MODEL)
  longest = max(len(r["prompt"]) + r["max_tokens"] for r in requests)
  values.update(dtype="bfloat16", weight_dtype="bfloat16", scan_layers=args.scan_layers, max_target_length=longest + 1)
  engine = Engine(load_config(overrides=values), devices=jax.devices()[:1])
  return measure(args, requests, engine, AutoTokenizer.from_pretrained(ensure_qwen3_tokenizer()))


def measure(args, requests: list[dict], engine, tokenizer) -> dict:
  """Every (prefix cache, users) run and the scoring load on this engine."""
  import jax
  from decode import step_bytes  # noqa: PLC0415 - the decode benchmark's count of a step's bytes

  result = {"device": jax.devices()[0].device_kind, "step_bytes": step_bytes(engine), "runs": []}
  warm = [dict(r, arrival=0.0, max_tokens=2) for r in requests]
  # Users outermost: each row count compiles once, and a call that runs out of time still has both cache settings
  # of the counts it reached.
  for users in args.users:
    for cache in (False, True):
      with serving(engine, tokenizer, users, args.chunk, args.cache_bytes if cache else 0) as (port, batcher):
        # Compiles the prefill-chunk and decode steps of this shape, and (a prefix seen twice) the cache's copies.
        start = time.perf_counter()
        drive(port, warm[: max(users, args.prefixes + 1)], users)
        warm_s = time.perf_counter() - start
        run = drive(port, requests[: requests_for(users, len(requests))], users)
        run.update(users=users, prefix_cache=cache, prefix_hit_rate=hit_rate(batcher), warm_s=warm_s)
        if users == 1:
          run["decode_tok_s"] = 1e3 / run["tpot_ms"]["p50"]
          run["bandwidth_fraction"] = result["step_bytes"] * run["decode_tok_s"] / HBM_BANDWIDTH
        print(json.dumps(run), flush=True)
        result["runs"].append(run)
        if cache and users == max(args.users):  # lm-eval's load on the largest server, prefix cache on
          scoring = requests[: args.scoring_requests]
          score_load(port, scoring[:8])
          result["mmlu_requests_s"] = score_load(port, scoring)
          print(json.dumps({"mmlu_requests_s": result["mmlu_requests_s"]}), flush=True)
  return result


# ----------------------------------------------------------------------------------------------- HF peer


def quick_hf_config():
  from transformers import Qwen3NextConfig  # noqa: PLC0415
  from maxtext.configs.hf_config import hf_config_from_config  # noqa: PLC0415
  from maxtext.configs import load_config  # noqa: PLC0415

  return Qwen3NextConfig(**hf_config_from_config(load_config(overrides=QUICK)))


def peer_main(args) -> None:
  """Subprocess: HF generate over the same requests in static batches of `users`; one JSON line."""
  import torch
  try:
    import fla.ops.common.chunk_o as chunk_o  # noqa: F401 - HF uses fla's kernels when importable
    chunk_o.TRITON_ABOVE_3_7_1 = True  # forward only; the guard is about fla's backward on Hopper
    fla_ok = True
  except ImportError:
    fla_ok = False
  from transformers import Qwen3NextForCausalLM

  config = quick_hf_config() if args.quick else hf_bench_config()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  with torch.device(device):
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM._from_config(config, dtype=torch.bfloat16)
  model.eval()
  requests = workload(args)

  def batch_run(batch):
    longest = max(len(r["prompt"]) for r in batch)
    ids = torch.zeros((len(batch), longest), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(batch):
      ids[row, longest - len(r["prompt"]):] = torch.as_tensor(r["prompt"])
      mask[row, longest - len(r["prompt"]):] = 1
    new = max(r["max_tokens"] for r in batch)
    model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

  result = {"fla": fla_ok}
  with torch.no_grad():
    batch_run(requests[:2])
    for users in args.users:
      if device == "cuda":
        torch.cuda.synchronize()
      start = time.perf_counter()
      # HF at batch 1 is ~18 tok/s on the bench model: a quarter of our batch-1 requests keeps it to ~1 minute.
      chosen = requests[: requests_for(users, len(requests)) // (4 if users == 1 else 1)]
      for i in range(0, len(chosen), users):
        batch_run(chosen[i : i + users])
      if device == "cuda":
        torch.cuda.synchronize()
      result[f"tok_s_{users}"] = sum(r["max_tokens"] for r in chosen) / (time.perf_counter() - start)
  print("PEER " + json.dumps(result), flush=True)


def run_peer(argv: list[str]) -> dict:
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peer-worker", *argv], capture_output=True,
                       text=True, check=False)
  line = next((l for l in out.stdout.splitlines() if l.startswith("PEER ")), None)
  if out.returncode or line is None:
    return {"error": out.stderr[-2000:]}
  return json.loads(line.removeprefix("PEER "))


# ----------------------------------------------------------------------------------------------- main


def table(result: dict, peer: dict) -> str:
  lines = ["| users | prefix cache | out tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | hit rate | HF tok/s |",
           "|---|---|---|---|---|---|---|"]
  for run in result["runs"]:
    fmt = lambda p: "/".join(f"{p[k]:.1f}" for k in ("p50", "p90", "p99")) if p else "-"
    hf = peer.get("tok_s_%d" % run["users"], float("nan"))
    lines.append(f"| {run['users']} | {'on' if run['prefix_cache'] else 'off'} | {run['output_tok_s']:.1f} |"
                 f" {fmt(run['ttft_ms'])} | {fmt(run['tpot_ms'])} | {run['prefix_hit_rate']:.2f} | {hf:.1f} |")
  one = [r for r in result["runs"] if r["users"] == 1]
  for run in one:
    lines.append(f"batch-1 decode (cache {'on' if run['prefix_cache'] else 'off'}): {run['decode_tok_s']:.1f} tok/s ="
                 f" {100 * run['bandwidth_fraction']:.1f}% of the {HBM_BANDWIDTH / 1e12:.1f} TB/s bound")
  lines.append(f"lm-eval MMLU load: {result['mmlu_requests_s']:.2f} requests/s (4 prompts each)")
  return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
  pair = lambda text: tuple(int(x) for x in text.split(","))
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--users", type=lambda t: [int(x) for x in t.split(",")], default=[1, 16, 64])
  parser.add_argument("--requests", type=int, default=128, help="workload size (a run sends requests_for(users))")
  parser.add_argument("--rate", type=float, default=32.0, help="Poisson arrivals per second (0: all at once)")
  parser.add_argument("--prefix-length", type=int, default=512)
  parser.add_argument("--prefixes", type=int, default=4)
  parser.add_argument("--suffix", type=pair, default=(32, 256))
  parser.add_argument("--new-tokens", type=pair, default=(32, 256))
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--cache-bytes", type=int, default=4 << 30)
  parser.add_argument("--scoring-requests", type=int, default=64)
  parser.add_argument("--no-peer", action="store_true")
  parser.add_argument("--scan-layers", action="store_true",
                      help="scanned layers: one compile of the layer body (minutes less per shape on a GPU)")
  parser.add_argument("--json", default=None)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
  if "--quick" in argv:  # a small workload unless the flags say otherwise
    parser.set_defaults(requests=8, prefix_length=16, suffix=(2, 8), new_tokens=(2, 6), chunk=8, scoring_requests=4,
                        users=[1, 4])
  args = parser.parse_args(argv)
  args.vocab = QUICK["vocab_size"] if args.quick else BENCH_MODEL["vocab_size"]  # prompts' token ids below this
  return args


def main(argv: list[str]) -> None:
  args = parse(argv)
  xla_flags = prefer_fast_gpu_compiles()
  if args.peer_worker:
    peer_main(args)
    return
  requests = workload(args)
  peer = {} if args.no_peer else run_peer([a for a in argv if a != "--json"] if "--json" not in argv else
                                          argv[: argv.index("--json")] + argv[argv.index("--json") + 2:])
  print(json.dumps({"peer": peer}), flush=True)  # kept even if our side fails later in the call
  result = ours(args, requests)
  result["peer"], result["xla_flags"] = peer, xla_flags
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  print(table(result, peer))


if __name__ == "__main__":
  main(sys.argv[1:])
