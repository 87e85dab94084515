"""Rollouts with the inference engine, reading the policy's live parameters (the training state's device arrays:
no host copy, no checkpoint round trip), and the rewards and group advantages of what it sampled."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from maxtext.configs import Config
from maxtext.inference.engine import Engine
from maxtext.inference.sampling import SamplingParams
from maxtext.trainers.post_train.rl.data import Prompt
from maxtext.trainers.post_train.rl.losses import group_advantages
from maxtext.trainers.post_train.rl.rewards import RewardFn, score


@dataclasses.dataclass
class Rollout:
  """num_prompts x group_size responses, a group's responses adjacent."""

  group_size: int
  prompts: list[tuple[int, ...]]  # per response, its prompt's tokens
  responses: list[list[int]]  # sampled tokens (a stop token included as the last)
  rollout_logprobs: list[list[float]]  # the engine's log-prob of each sampled token (temperature 1)
  rewards: np.ndarray  # [N]
  seconds: float  # generation time
  drafted: int = 0  # MTP drafts proposed while generating (mtp_speculative_decoding), and how many were accepted
  accepted: int = 0
  # Per response, what Engine.replay needs to recompute its log-probs as the engine did: the (rows, prompt length)
  # its generate call was padded to, and the tokens each decoding call emitted (None: one a call).
  shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  rounds: list[list[int] | None] = dataclasses.field(default_factory=list)

  @property
  def num_responses(self) -> int:
    return len(self.responses)

  def advantages(self, normalize_std: bool) -> np.ndarray:
    return group_advantages(self.rewards, self.group_size, normalize_std)

  def groups_with_signal(self) -> np.ndarray:
    """[num groups] bool: the group's rewards are not all equal (its advantages are not all zero)."""
    grouped = self.rewards.reshape(-1, self.group_size)
    return grouped.max(axis=1) > grouped.min(axis=1)

  def select_groups(self, keep: np.ndarray) -> "Rollout":
    rows = np.repeat(np.asarray(keep, bool), self.group_size)
    pick = lambda items: [item for item, kept in zip(items, rows) if kept]
    return Rollout(self.group_size, pick(self.prompts), pick(self.responses), pick(self.rollout_logprobs),
                   self.rewards[rows], self.seconds, self.drafted, self.accepted, pick(self.shapes),
                   pick(self.rounds))

  @staticmethod
  def concatenate(parts: list["Rollout"]) -> "Rollout":
    first = parts[0]
    joined = lambda name: sum((getattr(p, name) for p in parts), [])
    return Rollout(first.group_size, joined("prompts"), joined("responses"), joined("rollout_logprobs"),
                   np.concatenate([p.rewards for p in parts]), sum(p.seconds for p in parts),
                   sum(p.drafted for p in parts), sum(p.accepted for p in parts), joined("shapes"), joined("rounds"))


def use_live_params(engine: Engine, params: Any) -> None:
  """Point the engine at the training state's parameters. They are already device arrays in the engine's layout
  (same model, dtype and mesh), so this is a reference swap; the train step donates the old state, so this must
  run after every update, before the next generation."""
  engine.params = params


class Roller:
  """Samples groups of responses for prompts and scores them."""

  def __init__(self, config: Config, engine: Engine, tokenizer, reward_fn: RewardFn, stop_ids: tuple[int, ...]):
    self._config, self._engine, self._tokenizer = config, engine, tokenizer
    self._reward_fn, self._stop_ids = reward_fn, stop_ids

  def sample(self, prompts: list[Prompt], group_size: int, seed: int) -> Rollout:
    """group_size responses per prompt at rl_temperature; seeds (seed, response index) make a step reproducible."""
    c = self._config
    prompt_tokens = [p.tokens for p in prompts for _ in range(group_size)]
    sampling = [
        SamplingParams(max_tokens=c.max_response_length, temperature=c.rl_temperature,
                       stop_token_ids=self._stop_ids, seed=(seed * 1_000_003 + index) % (1 << 32))
        for index in range(len(prompt_tokens))
    ]
    responses: list[list[int]] = [[] for _ in prompt_tokens]
    logprobs: list[list[float]] = [[] for _ in prompt_tokens]
    began = time.perf_counter()
    for event in self._engine.generate([list(t) for t in prompt_tokens], sampling):
      responses[event.request].append(event.token_id)
      logprobs[event.request].append(event.logprob)
    seconds = time.perf_counter() - began
    texts = [self._tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    labels = [p.label for p in prompts for _ in range(group_size)]
    rewards = np.asarray(score(self._reward_fn, texts, labels), np.float32)
    engine = self._engine
    stats, rounds = engine.last_stats, engine.last_rounds or [None] * len(responses)
    return Rollout(group_size, prompt_tokens, responses, logprobs, rewards, seconds, stats.get("drafted", 0),
                   stats.get("accepted", 0), [engine.last_shape] * len(responses), list(rounds))
