"""A scripted stand-in for maxtext.inference.engine.Engine, for unit tests of the server's own logic (batching,
stop strings, streaming format, errors). The acceptance tests run the real Engine."""

from __future__ import annotations

import dataclasses
import numpy as np


@dataclasses.dataclass(frozen=True)
class FakeSamplingParams:
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  presence_penalty: float = 0.0
  stop_token_ids: tuple[int, ...] = ()
  seed: int = 0
  logprobs: int = 0


@dataclasses.dataclass(frozen=True)
class FakeTokenEvent:
  request: int
  token_id: int
  logprob: float
  top_logprobs: tuple[tuple[int, float], ...]
  finish_reason: str | None


@dataclasses.dataclass(frozen=True)
class FakePromptScores:
  token_logprobs: np.ndarray
  top_logprobs: list[tuple[tuple[int, float], ...]]


def fake_logprob(token_id: int) -> float:
  return -0.25 - (token_id % 7) / 8


def alternatives(token_id: int, n: int) -> tuple[tuple[int, float], ...]:
  return tuple((token_id + k, fake_logprob(token_id) - k) for k in range(n))


class FakeEngine:
  """Every prompt is continued with `script`; every call is recorded in `calls`."""

  def __init__(self, script: list[int], max_context: int = 64):
    self.script, self.max_context = list(script), max_context
    self.calls: list[tuple[str, list[list[int]]]] = []

  def generate(self, prompts, params):
    self.calls.append(("generate", [list(p) for p in prompts]))
    finished = [False] * len(prompts)
    for step in range(max(p.max_tokens for p in params)):
      for i, p in enumerate(params):
        if finished[i]:
          continue
        token = self.script[step % len(self.script)]
        finish = "stop" if token in p.stop_token_ids else ("length" if step + 1 == p.max_tokens else None)
        finished[i] = finish is not None
        yield FakeTokenEvent(i, token, fake_logprob(token), alternatives(token, p.logprobs), finish)

  def score(self, prompts, top_n=0):
    self.calls.append(("score", [list(p) for p in prompts]))
    out = []
    for prompt in prompts:
      logprobs = np.array([np.nan] + [fake_logprob(t) for t in prompt[1:]], np.float32)
      out.append(FakePromptScores(logprobs, [()] + [alternatives(t, top_n) for t in prompt[1:]]))
    return out
