"""Batching of concurrent requests into Engine calls (scripted engine; the HTTP path is in test_api.py)."""

from __future__ import annotations

import asyncio

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
  assert engine.calls[0][1] == [[1], [2, 2], [3]]


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

  batcher = Batcher(Broken(SCRIPT), window_s=0.0)

  async def main():
    try:
      await batcher.score([[1]])
    except ValueError as e:
      return str(e)

  assert asyncio.run(main()) == "boom"
  batcher.close()
