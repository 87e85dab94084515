"""Training on one rollout: pack its responses, take the old (and reference) log-probs with the training forward
before any update, then one optimizer step per rl_global_batch_size responses (micro-batches add their gradients)."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from maxtext.configs import Config
from maxtext.trainers.post_train.rl.losses import importance_weights
from maxtext.trainers.post_train.rl.packing import pack
from maxtext.trainers.post_train.rl.rollout import Rollout
from maxtext.trainers.post_train.rl.step import RLStep, on_mesh
from maxtext.trainers.train_step import Training


def _chunks(rollout: Rollout, config: Config) -> list[np.ndarray]:
  """Response indices of each optimizer step: whole groups, rl_global_batch_size responses (0: all)."""
  per_step = config.rl_global_batch_size or rollout.num_responses
  indices = np.arange(rollout.num_responses)
  return [indices[start : start + per_step] for start in range(0, len(indices), per_step)]


def prepare(config: Config, training: Training, rl_step: RLStep, params: Any, rollout: Rollout,
            ref_params: Any = None) -> tuple[list[tuple[list[dict], dict]], dict[str, float]]:
  """Per optimizer step: (device micro-batches with old_logp, is_weights [, ref_logp], totals); and the
  train/rollout mismatch over all response tokens. Every log-prob here comes from `params` before any update."""
  advantages = rollout.advantages(config.rl_advantage_std_normalization)
  steps, mismatch, tokens, trained = [], {"abs_sum": 0.0, "abs_max": 0.0, "k3_sum": 0.0}, 0, 0
  for chunk in _chunks(rollout, config):
    host_batches = pack([rollout.prompts[i] for i in chunk], [rollout.responses[i] for i in chunk],
                        [rollout.rollout_logprobs[i] for i in chunk], advantages[chunk],
                        training.global_batch_size, config.max_target_length)
    micro = []
    for host in host_batches:
      trained += int(np.sum(host["segment_ids"] > 0))
      batch = on_mesh(host, training.mesh)
      old_logp, plain_logp = rl_step.logprobs(params, batch)
      batch["old_logp"] = old_logp
      batch["is_weights"] = _weights(config, plain_logp, batch)
      if ref_params is not None:
        batch["ref_logp"] = rl_step.logprobs(ref_params, batch)[0]
      sums = rl_step.mismatch(plain_logp, batch["rollout_logp"], batch["loss_mask"])
      mismatch = {k: (max if k == "abs_max" else (lambda a, b: a + b))(mismatch[k], sums[k]) for k in mismatch}
      micro.append(batch)
    num_tokens = int(sum(len(rollout.responses[i]) for i in chunk))
    tokens += num_tokens
    totals = {"num_tokens": np.float32(num_tokens), "num_sequences": np.float32(len(chunk)),
              "num_micro_batches": np.float32(len(micro))}
    steps.append((micro, totals))
  mismatch = jax.device_get(mismatch)
  stats = {
      "mismatch_mean": float(mismatch["abs_sum"]) / tokens, "mismatch_max": float(mismatch["abs_max"]),
      "mismatch_k3": float(mismatch["k3_sum"]) / tokens, "train_tokens": trained,
  }
  return steps, stats


def _weights(config: Config, plain_logp, batch):
  # Both sides at temperature 1: the engine reports the untempered model's log-probs, so the weight measures the
  # numerical mismatch between the engine and the trainer, which is what it corrects.
  return _jitted_weights(config.importance_sampling_cap, config.rl_algorithm)(
      plain_logp, batch["rollout_logp"], batch["loss_mask"], batch["seq_ids"])


_WEIGHT_FNS: dict = {}


def _jitted_weights(cap: float, algorithm: str):
  key = (cap, algorithm)
  if key not in _WEIGHT_FNS:
    _WEIGHT_FNS[key] = jax.jit(lambda old, rollout, mask, ids: importance_weights(old, rollout, mask, ids, cap,
                                                                                  algorithm))
  return _WEIGHT_FNS[key]


def train_on_rollout(config: Config, training: Training, rl_step: RLStep, state: Any, rollout: Rollout,
                     ref_params: Any = None) -> tuple[Any, dict[str, float]]:
  """Optimizer steps on `rollout` -> (new state, metrics averaged over the steps)."""
  began = time.perf_counter()
  steps, stats = prepare(config, training, rl_step, state["params"], rollout, ref_params)
  sums: dict[str, float] = {}
  for micro, totals in steps:
    gradient = None
    for batch in micro:
      grads, step_sums = rl_step.grads(state["params"], batch, totals)
      gradient = grads if gradient is None else rl_step.add(gradient, grads)
      step_sums = dict(step_sums)
      # Per-step means: clip and ratio per token (grpo) or response (gspo), KL per token.
      unit = totals["num_tokens"] if config.rl_algorithm == "grpo" else totals["num_sequences"]
      step_sums["clip_fraction"] = step_sums.pop("clipped") / unit
      step_sums["ratio_mean"] = step_sums.pop("ratio") / unit
      if "kl" in step_sums:
        step_sums["kl"] = step_sums["kl"] / totals["num_tokens"]
      for key, value in step_sums.items():
        if key.endswith("_max"):
          sums[key] = value if key not in sums else jax.numpy.maximum(sums[key], value)
        else:
          sums[key] = sums.get(key, 0.0) + value / len(steps)
      if "first_ratio_deviation_max" not in sums:  # the step's first update: on-policy, the ratio must be 1
        sums["first_ratio_deviation_max"] = step_sums["ratio_deviation_max"]
    state, update_metrics = rl_step.update(state, gradient)
    for key, value in update_metrics.items():
      sums[key] = sums.get(key, 0.0) + value / len(steps)
  metrics = {key: float(value) for key, value in jax.device_get(sums).items()}  # waits for the last update
  seconds = time.perf_counter() - began
  metrics.update(stats, train_s=seconds, train_tokens_per_s=stats["train_tokens"] / seconds, optimizer_steps=len(steps))
  return state, metrics
