"""Long-prompt prefill: time to first token and peak device memory for a 128K-token prompt through our engine
(chunked prefill) and our HTTP server, against HF transformers (+ fla) on the same GPU in the same run.

  python3 benchmarks/long_prefill.py [--lengths 32768,131072] [--chunk 8192] [--server-chunk 4096]
      [--parts engine,server,hf] [--json out.json] [--quick]

Model: the 2.5B bench config (benchmarks/bench_model.py), random weights, bf16, batch 1, one new token (greedy).
Each part runs in its own subprocess (HF first), so peak memory is that part's alone (parameters included):
  engine  Engine.generate, prompts longer than --chunk prefilled in chunks against the cache (long_prefill_chunk_size);
          first a device check: at 4096 tokens the greedy first token's log-prob from the chunked prefill (chunks
          of 1024) and from the one-shot one differ by less than 0.05 (bf16);
  server  the real HTTP app (continuous batching, one row, prefix cache off, prompt chunks of --server-chunk), one
          streamed /v1/completions request of token ids: TTFT measured by the client;
  hf      Qwen3NextForCausalLM.generate(max_new_tokens=1) (sdpa attention; fla's GDN kernels when importable); an
          out-of-memory error at a length is reported as such and the next length still runs.
TTFT is the best of 2 timed calls after a compile/warm-up call at the same length. Prints a markdown table
(ours, peer, ratio) last; --json writes every number. --quick: a tiny model and short prompts on any backend (a
smoke test of this script; its numbers mean nothing).
Device: fla from `pip install -q --no-index --no-deps --target /tmp/site .fla/*.whl`, the server's dependencies from
`pip install -q --no-index --no-deps --target /tmp/site .serving_wheels/*.whl`, then PYTHONPATH=/tmp/site.
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

from bench_model import BENCH_MODEL, hf_bench_config, prefer_fast_gpu_compiles  # noqa: E402
from timing import run_worker  # noqa: E402

QUICK = dict(model_name="qwen3-next-tiny", vocab_size=2048, mtp_num_layers=0)
PARTS = ("hf", "engine", "server")


def prompt_of(length: int, vocab: int) -> list[int]:
  import numpy as np

  return np.random.default_rng(length).integers(0, vocab, length).tolist()


def our_config(args, length: int, **more):
  from maxtext.configs import load_config

  values = dict(QUICK if args.quick else BENCH_MODEL)
  values.update(dtype="bfloat16", weight_dtype="bfloat16", scan_layers=True, max_target_length=length + 8,
                long_prefill_chunk_size=args.chunk, max_prefill_predict_length=16)
  values.update(more)
  return load_config(overrides=values)


def peak_gb_jax() -> float:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 1e9


class Partial(dict):
  """A worker's results, written to its JSON file after every measurement (a run cut short keeps them)."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def __setitem__(self, key, value):
    super().__setitem__(key, value)
    with open(self.path, "w", encoding="utf-8") as f:
      json.dump(dict(self), f)


def best_of(calls: int, run) -> float:
  run()  # compile / warm up at this shape
  return min(run() for _ in range(calls))


# ------------------------------------------------------------------------------------------------------- ours


def check_chunked(args, result: Partial) -> None:
  """On the device: the chunked prefill's first token and log-prob against the one-shot prefill's."""
  import jax

  from maxtext.inference.engine import Engine
  from maxtext.inference.sampling import SamplingParams

  length = 512 if args.quick else 4096
  one_shot = Engine(our_config(args, length, long_prefill_chunk_size=length), devices=jax.devices()[:1])
  chunked = Engine(our_config(args, length, long_prefill_chunk_size=length // 4), one_shot.params,
                   devices=jax.devices()[:1])
  prompt, request = prompt_of(length, one_shot.spec.vocab_size), [SamplingParams(max_tokens=1)]
  (a,), (b,) = (list(e.generate([prompt], request)) for e in (one_shot, chunked))
  result["check"] = {"length": length, "same_token": a.token_id == b.token_id,
                     "logprob_diff": abs(a.logprob - b.logprob)}
  # Greedy: each log-prob is its distribution's maximum, so it compares even where a random model's top two tie.
  if abs(a.logprob - b.logprob) >= 0.05:
    raise SystemExit(f"device check failed: chunked prefill differs from one-shot: {result['check']}")
  del one_shot, chunked


def engine_main(args, result: Partial) -> None:
  import jax

  from maxtext.inference.engine import Engine
  from maxtext.inference.sampling import SamplingParams

  check_chunked(args, result)
  longest = max(args.lengths)
  engine = Engine(our_config(args, longest), devices=jax.devices()[:1])
  for length in args.lengths:
    prompt = prompt_of(length, engine.spec.vocab_size)

    def run():
      start = time.perf_counter()
      list(engine.generate([prompt], [SamplingParams(max_tokens=1)]))
      return time.perf_counter() - start

    result[f"ttft_s_{length}"] = best_of(2, run)
    print(f"engine {length}: {result[f'ttft_s_{length}']:.3f}s", flush=True)
  result["peak_gb"] = peak_gb_jax()


def server_main(args, result: Partial) -> None:
  import jax

  from maxtext.assets.tokenizers import ensure_qwen3_tokenizer
  from maxtext.inference.engine import Engine
  from serving import serving, stream_one  # the serving benchmark's app runner and streaming client
  from transformers import AutoTokenizer

  longest = max(args.lengths)
  engine = Engine(our_config(args, longest), devices=jax.devices()[:1])
  tokenizer = AutoTokenizer.from_pretrained(ensure_qwen3_tokenizer())
  with serving(engine, tokenizer, users=1, chunk=args.server_chunk, cache_bytes=0) as (port, _):
    for length in args.lengths:
      request = {"prompt": prompt_of(length, engine.spec.vocab_size), "max_tokens": 1}

      def run():
        done = stream_one(port, request)
        return done["first"] - done["start"]

      result[f"ttft_s_{length}"] = best_of(2, run)
      print(f"server {length}: {result[f'ttft_s_{length}']:.3f}s", flush=True)
  result["peak_gb"] = peak_gb_jax()


# ------------------------------------------------------------------------------------------------------- peer


def hf_main(args, result: Partial) -> None:
  import torch

  try:
    import fla.ops.common.chunk_o as chunk_o

    chunk_o.TRITON_ABOVE_3_7_1 = True  # fla 0.6.0's Hopper guard (issue #640) is about its backward: forward only
    result["fla"] = True
  except ImportError:
    result["fla"] = False
  from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

  from maxtext.configs.hf_config import hf_config_from_config

  device = "cuda" if torch.cuda.is_available() else "cpu"
  config = (Qwen3NextConfig(**hf_config_from_config(our_config(args, max(args.lengths)))) if args.quick else
            hf_bench_config())
  torch.manual_seed(0)
  with torch.device(device):
    model = Qwen3NextForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  for length in args.lengths:
    ids = torch.tensor([prompt_of(length, config.vocab_size)], device=device)

    def run():
      sync()
      start = time.perf_counter()
      with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
      sync()
      return time.perf_counter() - start

    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    try:
      result[f"ttft_s_{length}"] = best_of(2, run)
    except torch.cuda.OutOfMemoryError as e:
      result[f"ttft_s_{length}"] = "OOM"
      result[f"error_{length}"] = str(e).splitlines()[0][:300]
      torch.cuda.empty_cache()
    if device == "cuda":
      result[f"peak_gb_{length}"] = torch.cuda.max_memory_allocated() / 1e9
    print(f"hf {length}: {result[f'ttft_s_{length}']}", flush=True)


# ------------------------------------------------------------------------------------------------------- main


def _seconds(value) -> str:
  if isinstance(value, str):
    return value
  return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def table(results: dict, args) -> str:
  engine, server, hf = (results.get(p, {}) for p in ("engine", "server", "hf"))
  lines = ["| prompt tokens | engine TTFT s | server TTFT s | HF (+fla) TTFT s | HF / engine | HF peak GB |",
           "|---|---|---|---|---|---|"]
  for length in args.lengths:
    key = f"ttft_s_{length}"
    ours, theirs = engine.get(key), hf.get(key)
    ratio = f"{theirs / ours:.2f}x" if isinstance(ours, float) and isinstance(theirs, float) else "-"
    lines.append(f"| {length} | {_seconds(ours)} | {_seconds(server.get(key))} | {_seconds(theirs)} | {ratio} |"
                 f" {_seconds(hf.get(f'peak_gb_{length}'))} |")
  lines.append(f"peak device memory (GB, parameters included): engine {_seconds(engine.get('peak_gb'))}, server"
               f" {_seconds(server.get('peak_gb'))}; chunks: engine {args.chunk}, server {args.server_chunk}")
  check = engine.get("check")
  if check:
    lines.append(f"device check at {check['length']} tokens: chunked == one-shot first token {check['same_token']},"
                 f" |d logprob| {check['logprob_diff']:.2e}")
  return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
  ints = lambda text: [int(x) for x in text.split(",")]
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=ints, default=[32768, 131072], help="prompt lengths in tokens")
  parser.add_argument("--chunk", type=int, default=8192, help="the engine's long_prefill_chunk_size")
  parser.add_argument("--server-chunk", type=int, default=4096, help="the server's prefill_chunk_size")
  parser.add_argument("--parts", type=lambda t: t.split(","), default=list(PARTS))
  parser.add_argument("--json", default=None)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
  if "--quick" in argv:
    parser.set_defaults(lengths=[256, 1024], chunk=256, server_chunk=128)
  args = parser.parse_args(argv)
  bad = [p for p in args.parts if p not in PARTS]
  if bad:
    parser.error(f"unknown part '{bad[0]}' (choose from {', '.join(PARTS)})")
  return args


def main(argv: list[str]) -> int:
  args = parse(argv)
  prefer_fast_gpu_compiles()  # the workers inherit it
  if args.worker:
    result = Partial(args.json)
    {"engine": engine_main, "server": server_main, "hf": hf_main}[args.worker](args, result)
    return 0
  forwarded, skip = [], False  # the workers take every flag but --json and --parts (either spelling)
  for arg in argv:
    if not skip and not arg.startswith(("--json", "--parts")):
      forwarded.append(arg)
    skip = arg in ("--json", "--parts")
  scratch = os.environ.get("OUT") or tempfile.mkdtemp()
  results = {part: run_worker(__file__, part, forwarded, scratch) for part in PARTS if part in args.parts}
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  print(table(results, args))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
