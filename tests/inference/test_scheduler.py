"""Continuous batching and the prefix cache (float32), through the engine and through HTTP (the real app, uvicorn, a
tiny Engine shared by every test here so its steps compile once): generated log-probs against an independent full
forward pass (Engine.score), a prefix-cache hit against a cold run for prefixes on and off chunk boundaries, a
request that joins a busy batch mid-flight against the same request alone; and the serving benchmark's machinery
at a tiny shape."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import sys
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest

from maxtext.inference.engine import Engine
from maxtext.inference.sampling import SamplingParams
from maxtext.inference.scheduler import Scheduler
from tests.serving.live_server import REPO, serve_in_thread
from tests.serving.test_api import post

CHUNK = 8
ROWS = 4
NEW = 6


@pytest.fixture(scope="module")
def engine():
  from maxtext.configs import load_config

  config = load_config(overrides=dict(dtype="float32", weight_dtype="float32", scan_layers=True,
                                      max_target_length=64, base_num_decoder_layers=4))
  return Engine(config, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def tokenizer():
  from transformers import AutoTokenizer

  from maxtext.assets.tokenizers import ensure_qwen3_tokenizer

  return AutoTokenizer.from_pretrained(ensure_qwen3_tokenizer())


def scheduler(engine, cache_bytes: int = 0) -> Scheduler:
  return Scheduler(engine, rows=ROWS, chunk=CHUNK, prefix_cache_bytes=cache_bytes)


def run(sched: Scheduler, prompts, params) -> tuple[list[list[int]], list[list[float]]]:
  tokens, logprobs = [[] for _ in prompts], [[] for _ in prompts]
  for event in sched.generate(prompts, params):
    tokens[event.request].append(event.token_id)
    logprobs[event.request].append(event.logprob)
  return tokens, logprobs


def random_prompt(engine, n: int, seed: int) -> list[int]:
  return np.random.default_rng(seed).integers(0, engine.spec.vocab_size, n).tolist()


def test_generation_matches_the_full_forward_pass_and_the_static_engine(engine):
  # Lengths around the chunk: a prompt of one token, one a chunk and a bit, one of several chunks plus one.
  prompts = [random_prompt(engine, n, seed) for seed, n in enumerate((1, CHUNK + 3, 3 * CHUNK + 1, 5))]
  params = [SamplingParams(max_tokens=NEW, logprobs=1)] * len(prompts)
  tokens, logprobs = run(scheduler(engine), prompts, params)
  static = [[] for _ in prompts]
  for event in engine.generate(prompts, params):
    static[event.request].append(event.token_id)
  assert tokens == static
  scores = engine.score([p + t for p, t in zip(prompts, tokens)])
  for prompt, got, score in zip(prompts, logprobs, scores):
    np.testing.assert_allclose(got, score.token_logprobs[len(prompt):], rtol=0, atol=2e-5)


@pytest.mark.parametrize("prefix", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 2])
def test_a_prefix_cache_hit_equals_a_cold_run(engine, prefix):
  shared = random_prompt(engine, prefix, 100 + prefix)
  first = shared + random_prompt(engine, 5, 1)
  second = shared + random_prompt(engine, 4, 2)
  params = [SamplingParams(max_tokens=NEW, logprobs=2)]
  cold_tokens, cold_logprobs = run(scheduler(engine), [second], params)
  warm = scheduler(engine, cache_bytes=64 << 20)
  run(warm, [first], params)
  before = dict(warm.cache.stats)
  tokens, logprobs = run(warm, [second], params)
  hit_tokens = warm.cache.stats["hit_tokens"] - before["hit_tokens"]
  assert hit_tokens == (prefix // CHUNK) * CHUNK  # every whole block of the shared prefix, nothing after it
  assert tokens == cold_tokens
  np.testing.assert_allclose(logprobs, cold_logprobs, rtol=0, atol=1e-5)


def test_a_request_joining_mid_flight_gives_the_same_tokens_as_alone(engine):
  busy = [random_prompt(engine, n, 10 + n) for n in (3 * CHUNK, 2, CHUNK + 5)]
  newcomer = random_prompt(engine, 2 * CHUNK + 3, 7)
  sampled = SamplingParams(max_tokens=NEW, temperature=0.9, seed=11, logprobs=1)
  alone_tokens, alone_logprobs = run(scheduler(engine), [newcomer], [sampled])
  sched = scheduler(engine)
  # One busy row filters with top-k: the batch then samples through the sorting path, the newcomer alone did not,
  # and its tokens must still be the same.
  busy_params = [SamplingParams(max_tokens=3 * NEW, logprobs=1)] * 2 + [
      SamplingParams(max_tokens=3 * NEW, temperature=1.0, top_k=5, seed=3, logprobs=1)]
  for prompt, params in zip(busy, busy_params):
    sched.submit(prompt, params)
  for _ in range(4):  # the busy rows are mid-prompt and mid-generation when the newcomer arrives
    sched.step()
  new_id = sched.submit(newcomer, sampled)
  tokens, logprobs = [], []
  while sched.busy:
    for event in sched.step():
      if event.request == new_id:
        tokens.append(event.token_id)
        logprobs.append(event.logprob)
  assert tokens == alone_tokens[0]
  np.testing.assert_allclose(logprobs, alone_logprobs[0], rtol=0, atol=1e-5)


def test_a_stop_token_ends_a_request_though_calls_ran_ahead(engine):
  # Calls run two ahead of the read-back: the request must still end at its stop token, exactly, and its row serve
  # the next request as a fresh one.
  prompt, other = random_prompt(engine, CHUNK + 2, 21), random_prompt(engine, 5, 22)
  free_run, _ = run(scheduler(engine), [prompt], [SamplingParams(max_tokens=NEW, logprobs=1)])
  stop = free_run[0][2]
  expected = free_run[0][: free_run[0].index(stop) + 1]
  alone, _ = run(scheduler(engine), [other], [SamplingParams(max_tokens=NEW, logprobs=1)])
  sched = scheduler(engine)
  # Three fillers keep the other rows busy longer: `other` waits for the stopped request's row.
  fillers = [random_prompt(engine, 3, 30 + i) for i in range(ROWS - 1)]
  params = ([SamplingParams(max_tokens=NEW, stop_token_ids=(stop,), logprobs=1)]
            + [SamplingParams(max_tokens=3 * NEW, logprobs=1)] * len(fillers)
            + [SamplingParams(max_tokens=NEW, logprobs=1)])
  events = list(sched.generate([prompt, *fillers, other], params))
  first = [e for e in events if e.request == 0]
  assert [e.token_id for e in first] == expected and first[-1].finish_reason == "stop"
  assert [e.token_id for e in events if e.request == ROWS] == alone[0]
  assert not sched.busy


def test_the_cache_keeps_to_its_budget_least_recently_used_first(engine):
  sched = scheduler(engine, cache_bytes=1)
  run(sched, [random_prompt(engine, 2 * CHUNK + 1, 3)], [SamplingParams(max_tokens=1, logprobs=1)])
  assert len(sched.cache) == 0  # one block is larger than the budget: nothing kept
  block_bytes = None
  sched = scheduler(engine, cache_bytes=64 << 20)
  run(sched, [random_prompt(engine, CHUNK + 1, 4)], [SamplingParams(max_tokens=1, logprobs=1)])
  block_bytes = sched.cache.nbytes
  sched = scheduler(engine, cache_bytes=3 * block_bytes)
  a, b = random_prompt(engine, 2 * CHUNK + 1, 5), random_prompt(engine, 2 * CHUNK + 1, 6)
  run(sched, [a], [SamplingParams(max_tokens=1, logprobs=1)])
  run(sched, [b], [SamplingParams(max_tokens=1, logprobs=1)])  # 4 blocks > budget of 3: a's leaf block goes first
  assert len(sched.cache) == 3 and sched.cache.nbytes <= 3 * block_bytes
  before = sched.cache.stats["hit_tokens"]
  run(sched, [a], [SamplingParams(max_tokens=1, logprobs=1)])
  assert sched.cache.stats["hit_tokens"] - before == CHUNK  # a's first block survived, its second did not


# ---- through HTTP ----


@contextlib.contextmanager
def served(engine, tokenizer, cache_bytes: int):
  from maxtext.inference.sampling import SamplingParams
  from maxtext.inference.scheduler import Scheduler
  from maxtext.serving.app import build_app
  from maxtext.serving.continuous_batcher import ContinuousBatcher
  from maxtext.serving.served_model import ServedModel

  scheduler = Scheduler(engine, rows=4, chunk=CHUNK, prefix_cache_bytes=cache_bytes)
  batcher = ContinuousBatcher(engine, scheduler, window_s=0.05, max_batch=4)
  model = ServedModel(batcher, tokenizer, "tiny", engine.max_context, engine.spec.vocab_size, SamplingParams)
  with serve_in_thread(build_app(model)) as base_url:
    yield base_url


@pytest.fixture(scope="module")
def servers(engine, tokenizer):
  with served(engine, tokenizer, 0) as cold, served(engine, tokenizer, 64 << 20) as cached:
    yield cold, cached


def complete(base_url: str, prompt: list[int], max_tokens: int = 4, **extra) -> dict:
  status, answer = post(base_url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0, "logprobs": 1, **extra})
  assert status == 200, answer
  return answer["choices"][0]


def metrics(base_url: str) -> dict[str, float]:
  with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as response:
    text = response.read().decode()
  return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
          if line and not line.startswith("#")}


@pytest.mark.parametrize("prefix", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 2])
def test_prefix_cache_hit_over_http_equals_a_cold_run(engine, servers, prefix):
  cold, cached = servers
  rng = np.random.default_rng(prefix)
  vocab = engine.spec.vocab_size
  shared = rng.integers(0, vocab, prefix).tolist()
  first, second = shared + rng.integers(0, vocab, 5).tolist(), shared + rng.integers(0, vocab, 3).tolist()
  expected = complete(cold, second)
  complete(cached, first)
  before = metrics(cached)["maxtext_prefix_cache_hit_tokens_total"]
  got = complete(cached, second)
  assert metrics(cached)["maxtext_prefix_cache_hit_tokens_total"] - before == (prefix // CHUNK) * CHUNK
  assert got["text"] == expected["text"] and got["logprobs"]["tokens"] == expected["logprobs"]["tokens"]
  np.testing.assert_allclose(got["logprobs"]["token_logprobs"], expected["logprobs"]["token_logprobs"],
                             rtol=0, atol=1e-5)


def test_a_request_joining_mid_generation_answers_as_alone(servers):
  cold, _ = servers
  long_prompt = list(range(100, 100 + 2 * CHUNK + 3))
  newcomer = list(range(300, 300 + CHUNK + 2))
  sampled = dict(temperature=0.8, seed=5)
  alone = complete(cold, newcomer, 6, **sampled)

  first_token = threading.Event()

  def stream_long() -> list[float]:
    body = json.dumps({"model": "tiny", "prompt": long_prompt, "max_tokens": 40, "temperature": 0, "logprobs": 1,
                       "stream": True}).encode()
    request = urllib.request.Request(f"{cold}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    arrivals = []
    with urllib.request.urlopen(request, timeout=120) as response:
      for line in response:
        if line.startswith(b"data: {"):
          arrivals.append(time.monotonic())
          first_token.set()
    return arrivals

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    long_run = pool.submit(stream_long)
    assert first_token.wait(120)  # the long request is generating now
    start = time.monotonic()
    joined = complete(cold, newcomer, 6, **sampled)
    end = time.monotonic()
    arrivals = long_run.result()
  assert any(t > end for t in arrivals) and any(t < start for t in arrivals)  # it really ran beside the long one
  assert joined["text"] == alone["text"] and joined["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
  np.testing.assert_allclose(joined["logprobs"]["token_logprobs"], alone["logprobs"]["token_logprobs"],
                             rtol=0, atol=1e-5)


def test_serving_benchmark_measures_a_tiny_workload(engine, tokenizer):
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import serving as bench  # noqa: PLC0415 - benchmarks/serving.py

  # Four users only: the rows of the tests above, so nothing compiles again (users=1 runs the same code).
  args = bench.parse(["--quick", "--users", "4", "--requests", "6", "--chunk", str(CHUNK), "--prefix-length",
                      str(2 * CHUNK), "--suffix", "2,5", "--new-tokens", "2,4", "--scoring-requests", "3"])
  args.vocab = engine.spec.vocab_size
  requests = bench.workload(args)
  result = bench.measure(args, requests, engine, tokenizer)
  assert [(r["users"], r["prefix_cache"]) for r in result["runs"]] == [(4, False), (4, True)]
  for run in result["runs"]:
    # Streamed chunks counted by the client: every requested token came back (no end token in a 512-token vocab).
    assert run["tokens"] == sum(r["max_tokens"] for r in requests) and run["output_tok_s"] > 0
    assert run["ttft_ms"]["p50"] > 0 and run["tpot_ms"]["p99"] >= run["tpot_ms"]["p50"]
    # Six requests over four 16-token prefixes: the later two reuse a prefix's first block.
    assert (run["prefix_hit_rate"] > 0) == run["prefix_cache"]
  assert result["mmlu_requests_s"] > 0
  assert "| 4 | on |" in bench.table(result, {})
