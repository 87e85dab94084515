"""Training on one rollout: pack its responses, one optimizer step per rl_global_batch_size responses (micro-batches
of packed rows add their gradients).

The first optimizer step is on-policy: its forward pass is pi_old itself. Later steps of the same rollout need
pi_old's log-probs from before any update, so those are taken first with a forward-only pass (as are the reference
policy's when kl_coef > 0). The train/rollout mismatch is measured on every response token either way.

With rl_replay_logprobs the temperature-1 log-probs come from the engine's replay of the responses (replay.py):
pi_old's and the reference's once, the current policy's again before each later optimizer step.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxtext.configs import Config
from maxtext.inference.engine import Engine
from maxtext.trainers.post_train.rl.packing import pack
from maxtext.trainers.post_train.rl.replay import replay_logprobs
from maxtext.trainers.post_train.rl.rollout import Rollout
from maxtext.trainers.post_train.rl.step import RLStep, on_mesh
from maxtext.trainers.train_step import Training

_MISMATCH = ("mismatch_abs_sum", "mismatch_abs_max", "mismatch_rel_max", "mismatch_k3_sum", "replay_gap_abs_sum",
             "replay_gap_abs_max", "replay_gap_rel_max")


def _chunks(rollout: Rollout, config: Config) -> list[np.ndarray]:
  """Response indices of each optimizer step: whole groups, rl_global_batch_size responses (0: all)."""
  per_step = config.rl_global_batch_size or rollout.num_responses
  indices = np.arange(rollout.num_responses)
  return [indices[start : start + per_step] for start in range(0, len(indices), per_step)]


def _merge(into: dict, sums: dict, scale: float) -> None:
  for key, value in sums.items():
    if key.endswith("_max"):
      into[key] = value if key not in into else jnp.maximum(into[key], value)
    else:
      into[key] = into.get(key, 0.0) + value * scale


def _pack(config: Config, training: Training, rollout: Rollout, chunk: np.ndarray, advantages: np.ndarray,
          per_token: dict[str, dict[int, np.ndarray]]) -> list[dict[str, np.ndarray]]:
  return pack([rollout.prompts[i] for i in chunk], [rollout.responses[i] for i in chunk],
              [rollout.rollout_logprobs[i] for i in chunk], advantages[chunk], training.global_batch_size,
              config.max_target_length, {name: [values[i] for i in chunk] for name, values in per_token.items()})


def prepare(config: Config, training: Training, rl_step: RLStep, params: Any, rollout: Rollout,
            ref_params: Any = None, engine: Engine | None = None
            ) -> tuple[list[tuple[np.ndarray, list[dict], dict]], dict, int]:
  """(per optimizer step: its response indices, device micro-batches and totals; mismatch sums of the off-policy
  steps; tokens trained). Every log-prob taken here comes from `params` before any update; with
  rl_replay_logprobs the engine replays them (the first step's `replay_logp`, pi_old's and the reference's)."""
  advantages = rollout.advantages(config.rl_advantage_std_normalization)
  everything = range(rollout.num_responses)
  untempered = config.rl_temperature == 1.0
  per_token = {}
  if config.rl_replay_logprobs:
    per_token["replay_logp"] = replay_logprobs(engine, rollout, everything, params)
    if ref_params is not None and untempered:
      per_token["ref_logp"] = replay_logprobs(engine, rollout, everything, ref_params)
  steps, mismatch, trained = [], {}, 0
  for index, chunk in enumerate(_chunks(rollout, config)):
    micro = []
    for host in _pack(config, training, rollout, chunk, advantages, per_token):
      trained += int(np.sum(host["segment_ids"] > 0))
      batch = on_mesh(host, training.mesh)
      if index > 0:
        if "replay_logp" in batch:  # pi_old's temperature-1 log-probs as the engine computes them
          plain_logp = batch.pop("replay_logp")  # the step's own are replayed before it runs (train_on_rollout)
          old_logp = plain_logp if untempered else rl_step.logprobs(params, batch)[0]
        else:
          old_logp, plain_logp = rl_step.logprobs(params, batch)
        batch["old_logp"] = old_logp
        # Both at temperature 1: the engine reports the untempered model's log-probs.
        batch["is_weights"] = rl_step.weights(plain_logp, batch["rollout_logp"], batch["loss_mask"], batch["seq_ids"])
        sums = rl_step.mismatch(plain_logp, batch["rollout_logp"], batch["loss_mask"])
        _merge(mismatch, {f"mismatch_{k}": v for k, v in sums.items()}, 1.0)
      if ref_params is not None and "ref_logp" not in batch:
        batch["ref_logp"] = rl_step.logprobs(ref_params, batch)[0]
      micro.append(batch)
    totals = {"num_tokens": np.float32(sum(len(rollout.responses[i]) for i in chunk)),
              "num_sequences": np.float32(len(chunk)), "num_micro_batches": np.float32(len(micro))}
    steps.append((chunk, micro, totals))
  return steps, mismatch, trained


def _replay_current(config: Config, training: Training, engine: Engine, params: Any, rollout: Rollout,
                    chunk: np.ndarray, micro: list[dict]) -> None:
  """A later optimizer step's `replay_logp`: the engine's log-probs of its responses under the current params."""
  replayed = {"replay_logp": replay_logprobs(engine, rollout, chunk, params)}
  advantages = np.zeros((rollout.num_responses,), np.float32)  # the layout is all that is taken from this packing
  for batch, host in zip(micro, _pack(config, training, rollout, chunk, advantages, replayed)):
    batch["replay_logp"] = on_mesh({"replay_logp": host["replay_logp"]}, training.mesh)["replay_logp"]


def train_on_rollout(config: Config, training: Training, rl_step: RLStep, state: Any, rollout: Rollout,
                     ref_params: Any = None, engine: Engine | None = None) -> tuple[Any, dict[str, float]]:
  """Optimizer steps on `rollout` -> (new state, metrics: means over the steps, maxima, mismatch over all tokens).
  engine: the rollout's engine, which replays log-probs when rl_replay_logprobs is set."""
  if config.rl_replay_logprobs and engine is None:
    raise ValueError("rl_replay_logprobs: train_on_rollout needs the engine that generated the rollout")
  began = time.perf_counter()
  steps, mismatch, trained = prepare(config, training, rl_step, state["params"], rollout, ref_params, engine)
  sums: dict[str, Any] = {}
  for index, (chunk, micro, totals) in enumerate(steps):
    grads_fn = rl_step.grads_on_policy if index == 0 else rl_step.grads_off_policy
    if index > 0 and config.rl_replay_logprobs:
      _replay_current(config, training, engine, state["params"], rollout, chunk, micro)
    gradient = None
    for batch in micro:
      grads, step_sums = grads_fn(state["params"], batch, totals)
      gradient = grads if gradient is None else rl_step.add(gradient, grads)
      step_sums = dict(step_sums)
      _merge(mismatch, {k: step_sums.pop(k) for k in _MISMATCH if k in step_sums}, 1.0)
      # Per-step means: clip fraction and ratio per token (grpo) or response (gspo), KL per token.
      unit = totals["num_tokens"] if config.rl_algorithm == "grpo" else totals["num_sequences"]
      step_sums["clip_fraction"] = step_sums.pop("clipped") / unit
      step_sums["ratio_mean"] = step_sums.pop("ratio") / unit
      if "kl" in step_sums:
        step_sums["kl"] = step_sums["kl"] / totals["num_tokens"]
      if index == 0:
        # The on-policy update: |ratio - 1| is exactly 0 when the trainer's log-probs are self-consistent.
        _merge(sums, {"first_ratio_deviation_max": step_sums["ratio_deviation_max"]}, 1.0)
      _merge(sums, step_sums, 1.0 / len(steps))
    state, update_metrics = rl_step.update(state, gradient)
    _merge(sums, update_metrics, 1.0 / len(steps))
  metrics = {key: float(value) for key, value in jax.device_get(sums).items()}  # waits for the last update
  mismatch = jax.device_get(mismatch)
  tokens = sum(len(r) for r in rollout.responses)
  seconds = time.perf_counter() - began
  metrics.update(
      mismatch_mean=float(mismatch["mismatch_abs_sum"]) / tokens, mismatch_max=float(mismatch["mismatch_abs_max"]),
      mismatch_rel_max=float(mismatch["mismatch_rel_max"]),
      mismatch_k3=float(mismatch["mismatch_k3_sum"]) / tokens, train_s=seconds, train_tokens=trained,
      train_tokens_per_s=trained / seconds, optimizer_steps=len(steps),
  )
  if "replay_gap_abs_sum" in mismatch:  # every response is in one optimizer step: a mean over all tokens
    metrics.update(replay_gap_mean=float(mismatch["replay_gap_abs_sum"]) / tokens,
                   replay_gap_max=float(mismatch["replay_gap_abs_max"]),
                   replay_gap_rel_max=float(mismatch["replay_gap_rel_max"]))
  return state, metrics
