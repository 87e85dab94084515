"""Continuous batching and the prefix cache through HTTP (real app, uvicorn, a tiny float32 Engine): a prefix-cache
hit answers as a cold run (1e-5) for prefixes on and off the chunk boundaries, /metrics counts the hits, and a
request sent while another is mid-generation answers as it does alone."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest

from tests.serving.live_server import serve_in_thread
from tests.serving.test_api import post

CHUNK = 8


@pytest.fixture(scope="module")
def engine():
  from maxtext.configs import load_config
  from maxtext.inference.engine import Engine

  config = load_config(overrides=dict(dtype="float32", weight_dtype="float32", scan_layers=True, vocab_size=8192,
                                      max_target_length=96, base_num_decoder_layers=4))
  return Engine(config, devices=jax.devices()[:1])


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
def test_prefix_cache_hit_over_http_equals_a_cold_run(servers, prefix):
  cold, cached = servers
  rng = np.random.default_rng(prefix)
  shared = rng.integers(0, 5000, prefix).tolist()
  first, second = shared + rng.integers(0, 5000, 5).tolist(), shared + rng.integers(0, 5000, 3).tolist()
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
    body = json.dumps({"model": "tiny", "prompt": long_prompt, "max_tokens": 60, "temperature": 0, "logprobs": 1,
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
