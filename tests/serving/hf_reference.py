"""What the served model should answer, computed with the HF torch model the checkpoint was converted from."""

from __future__ import annotations

import dataclasses

import numpy as np

# Steps whose two best HF tokens are closer than this may legitimately pick either (float32 noise).
NEAR_TIE = 1e-3


def log_softmax(model, ids: list[int]) -> np.ndarray:
  """[T, V] float64: the distribution of the token after each prefix of `ids`."""
  import torch

  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].double()
  return torch.log_softmax(logits, -1).numpy()


def prompt_logprobs(model, ids: list[int]) -> np.ndarray:
  """[T] log-prob of each token given the ones before it; [0] is nan, as the server's null."""
  table = log_softmax(model, ids)
  return np.concatenate([[np.nan], table[np.arange(len(ids) - 1), ids[1:]]])


@dataclasses.dataclass(frozen=True)
class GreedyStep:
  token: int
  logprob: float
  runner_up_gap: float  # best minus second-best log-prob


def greedy(model, ids: list[int], steps: int) -> list[GreedyStep]:
  ids, out = list(ids), []
  for _ in range(steps):
    last = log_softmax(model, ids)[-1]
    second, first = np.argsort(last)[-2:]
    out.append(GreedyStep(int(first), float(last[first]), float(last[first] - last[second])))
    ids.append(int(first))
  return out


def comparable_prefix(steps: list[GreedyStep]) -> int:
  """How many leading steps have a clear winner (after a near-tie the continuations may differ)."""
  for i, step in enumerate(steps):
    if step.runner_up_gap < NEAR_TIE:
      return i
  return len(steps)
