"""Continuous batching and the prefix cache (float32): generated log-probs against an independent full forward pass
(Engine.score), a prefix-cache hit against a cold run for prefixes on and off chunk boundaries, and a request that
joins a busy batch mid-flight against the same request alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from maxtext.inference.engine import Engine
from maxtext.inference.sampling import SamplingParams
from maxtext.inference.scheduler import Scheduler

CHUNK = 8
ROWS = 4
NEW = 6


@pytest.fixture(scope="module")
def engine():
  from maxtext.configs import load_config

  config = load_config(overrides=dict(dtype="float32", weight_dtype="float32", scan_layers=True,
                                      max_target_length=64, base_num_decoder_layers=4))
  return Engine(config, devices=jax.devices()[:1])


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
  for prompt in busy:
    sched.submit(prompt, SamplingParams(max_tokens=3 * NEW, logprobs=1))
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
