"""Batching of concurrent requests into Engine calls (scripted engine; the HTTP path is in test_api.py)."""

from __future__ import annotations

import asyncio
import time

from maxtext.serving.batcher import Batcher
from tests.serving.fake_engine import FakeEngine, FakeSamplingParams

SCRIPT = [11, 12, 13, 14]


async def collect(batcher: Batcher, prompts, max_tokens: int) -> list[list[int]]:
  out = [[] for _ in prompts]
  async for event in batcher.generate(prompts, [FakeSamplingParams(max_tokens=max_tokens)] * len(prompts)):
    out[event.request].append(event.token_id)
  return out


def test_requests_gathered_in_the_window_run_together_up_to_max_batch():
  engine = FakeEngine(SCRIPT)
  batcher = Batcher(engine, window_s=0.2, max_batch=3)

  async def main():
    return await asyncio.gather(collect(batcher, [[1], [2, 2]], 3), collect(batcher, [[3]], 2),
                                collect(batcher, [[4], [5]], 1))

  results = asyncio.run(main())
  batcher.close()
  assert results == [[SCRIPT[:3], SCRIPT[:3]], [SCRIPT[:2]], [SCRIPT[:1], SCRIPT[:1]]]
  assert [len(prompts) for kind, prompts in engine.calls] == [3, 2]
  # Round-robin over the requests: one prompt of each in turn, so the first batch holds every request's first.
  assert engine.calls[0][1] == [[1], [3], [4]] and engine.calls[1][1] == [[2, 2], [5]]


def test_score_and_generate_requests_are_not_mixed():
  engine = FakeEngine(SCRIPT)
  batcher = Batcher(engine, window_s=0.2, max_batch=8)

  async def main():
    return await asyncio.gather(batcher.score([[1, 2]], top_n=1), collect(batcher, [[3]], 1),
                                batcher.score([[4, 5, 6]], top_n=0))

  scores_a, generated, scores_b = asyncio.run(main())
  batcher.close()
  assert [kind for kind, _ in engine.calls] == ["score", "generate"]
  assert engine.calls[0][1] == [[1, 2], [4, 5, 6]]
  assert generated == [SCRIPT[:1]]
  # One engine call at the larger top_n, trimmed back per request.
  assert len(scores_a[0].top_logprobs[1]) == 1 and scores_b[0].top_logprobs[1] == ()


def test_engine_errors_reach_the_request():
  class Broken(FakeEngine):
    def score(self, prompts, top_n=0):
      raise ValueError("boom")

    def generate(self, prompts, params):
      raise RuntimeError("device lost")

  batcher = Batcher(Broken(SCRIPT), window_s=0.0)

  async def main():
    out = []
    for call in (batcher.score([[1]]), collect(batcher, [[1]], 1)):
      try:
        await call
      except Exception as e:  # pylint: disable=broad-except
        out.append((type(e).__name__, getattr(e, "status", None), str(e)))
    return out

  # The engine's ValueError (input it refuses) is the client's 400; anything else stays a server error.
  assert asyncio.run(main()) == [("APIError", 400, "boom"), ("RuntimeError", None, "device lost")]
  batcher.close()


class Poisoned(FakeEngine):
  """Refuses any call that holds the prompt [666], as an engine would a request it cannot run."""

  def generate(self, prompts, params):
    if [666] in prompts:
      raise ValueError("prompt [666] refused")
    return super().generate(prompts, params)


def test_one_bad_prompt_fails_its_request_alone():
  engine = Poisoned(SCRIPT)
  batcher = Batcher(engine, window_s=0.3, max_batch=8)

  async def attempt(prompts):
    try:
      return await collect(batcher, prompts, 2)
    except Exception as e:  # pylint: disable=broad-except
      return (getattr(e, "status", None), str(e))

  async def main():
    return await asyncio.gather(*(attempt(p) for p in ([[1]], [[2], [3]], [[666]], [[4]], [[5]], [[6]])))

  results = asyncio.run(main())
  batcher.close()
  assert results[2] == (400, "prompt [666] refused")
  assert results[:2] + results[3:] == [[SCRIPT[:2]], [SCRIPT[:2], SCRIPT[:2]]] + [[SCRIPT[:2]]] * 3
  # Tried together once (round-robin order), then one by one; the engine ran only the good ones.
  assert [size for _, size in batcher.calls] == [7] + [1] * 7
  assert [prompts for _, prompts in engine.calls] == [[[1]], [[2]], [[4]], [[5]], [[6]], [[3]]]


def test_a_request_of_many_prompts_does_not_starve_a_later_one():
  class Slow(FakeEngine):
    def generate(self, prompts, params):
      time.sleep(0.02)
      return super().generate(prompts, params)

  engine = Slow(SCRIPT)
  batcher = Batcher(engine, window_s=0.0, max_batch=8)

  async def later():
    await asyncio.sleep(0.1)
    start = time.monotonic()
    await collect(batcher, [[9]], 1)
    return time.monotonic() - start, len(engine.calls)

  async def main():
    return await asyncio.gather(collect(batcher, [[1]] * 400, 1), later())

  big, (waited, calls_when_served) = asyncio.run(main())
  batcher.close()
  assert big == [SCRIPT[:1]] * 400
  # FIFO would run all 50 batches of the big request first; round-robin serves the newcomer in the next batch.
  assert calls_when_served <= 10 and waited < 1.0, (calls_when_served, waited)
