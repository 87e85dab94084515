"""The RL loop: rollout with the engine on the live parameters -> rewards and group advantages -> old log-probs by
the training forward -> clipped-objective updates -> metrics, evaluation and checkpoints."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from maxtext.configs import Config
from maxtext.inference.engine import Engine
from maxtext.inference.tokenizer import load_tokenizer, stop_token_ids
from maxtext.trainers import mesh as train_mesh
from maxtext.trainers.checkpointing import TrainCheckpointer
from maxtext.trainers.metrics import MetricsWriter
from maxtext.trainers.post_train.rl.data import PromptIterator, load_prompts
from maxtext.trainers.post_train.rl.metrics import format_rl_line
from maxtext.trainers.post_train.rl.rewards import load_reward
from maxtext.trainers.post_train.rl.rollout import Roller, Rollout, use_live_params
from maxtext.trainers.post_train.rl.run_config import check_rl_config
from maxtext.trainers.post_train.rl.step import build_rl_step
from maxtext.trainers.post_train.rl.update import train_on_rollout
from maxtext.trainers.train_step import Training, build_training, place_params
from maxtext.trainers.trainer import output_directory

_logger = logging.getLogger("maxtext.rl")


def starting_params(config: Config, training: Training) -> Any:
  """The policy a fresh run starts from: load_parameters_path (e.g. a converted HF checkpoint), else random."""
  if config.load_parameters_path:
    from maxtext.checkpoint_conversion import orbax_io  # noqa: PLC0415 - orbax only when loading

    _logger.info("loading parameters from %s", config.load_parameters_path)
    return place_params(orbax_io.load_params(config.load_parameters_path, training.spec), training)
  return training.init_state(jax.random.key(config.init_weights_seed))["params"]


def stop_ids(config: Config, tokenizer) -> tuple[int, ...]:
  if config.decode_stop_token_ids == "auto":
    return stop_token_ids(tokenizer)
  if config.decode_stop_token_ids == "none":
    return ()
  return tuple(int(t) for t in config.decode_stop_token_ids.split(","))


def collect(config: Config, roller: Roller, iterator: PromptIterator, seed: int) -> tuple[Rollout, dict[str, float]]:
  """One step's rollout; with rl_dynamic_sampling, groups without signal are dropped and refilled from new prompts
  (up to rl_dynamic_sampling_max_rounds extra rounds). Metrics describe everything sampled in the first round."""
  first = roller.sample(iterator.take(config.rollout_batch_size), config.num_generations, seed)
  signal = first.groups_with_signal()
  lengths = [len(r) for r in first.responses]
  stats = {
      "reward_mean": float(first.rewards.mean()), "reward_std": float(first.rewards.std()),
      "signal_fraction": float(signal.mean()), "response_length": float(np.mean(lengths)),
  }
  generated, seconds, drafted, accepted = sum(lengths), first.seconds, first.drafted, first.accepted
  if not config.rl_dynamic_sampling:
    kept = first
  else:
    parts, count = [first.select_groups(signal)], int(signal.sum())
    for extra in range(config.rl_dynamic_sampling_max_rounds):
      if count >= config.rollout_batch_size:
        break
      more = roller.sample(iterator.take(config.rollout_batch_size), config.num_generations, seed + 7919 * (extra + 1))
      generated, seconds = generated + sum(len(r) for r in more.responses), seconds + more.seconds
      drafted, accepted = drafted + more.drafted, accepted + more.accepted
      more_signal = more.groups_with_signal()
      parts.append(more.select_groups(more_signal))
      count += int(more_signal.sum())
    kept = Rollout.concatenate(parts)
    kept = kept.select_groups(np.arange(kept.num_responses // config.num_generations) < config.rollout_batch_size)
  stats.update(rollout_tokens=generated, rollout_s=seconds, rollout_tokens_per_s=generated / max(seconds, 1e-9))
  if drafted:  # mtp_speculative_decoding: the fraction of MTP drafts the policy accepted
    stats["draft_acceptance"] = accepted / drafted
  return kept, stats


def evaluate(config: Config, roller: Roller, prompts: list, seed: int) -> float:
  """pass@1 averaged over rl_eval_num_samples samples per prompt (the mean reward). Each call holds as many requests
  as a training rollout (a short last call is padded with repeats, whose rewards are dropped), so evaluation reuses
  the rollout's compiled shapes."""
  rewards = []
  per_call = max(1, config.rollout_batch_size * config.num_generations // config.rl_eval_num_samples)
  for start in range(0, len(prompts), per_call):
    chunk = prompts[start : start + per_call]
    padded = (chunk * per_call)[:per_call] if len(prompts) > per_call or per_call <= 4 * len(chunk) else chunk
    rollout = roller.sample(padded, config.rl_eval_num_samples, seed + start)
    rewards.append(rollout.rewards[: len(chunk) * config.rl_eval_num_samples])
  return float(np.concatenate(rewards).mean())


def rl_train(config: Config, *, devices: Sequence[jax.Device] | None = None,
             stop_after: int | None = None) -> list[dict[str, float]]:
  """Run RL steps up to `config.steps` (resuming the run's latest checkpoint); returns each step's metrics.
  `stop_after` ends the loop after that step without the final save, as a killed run would (for tests)."""
  check_rl_config(config)
  logging.getLogger("absl").setLevel(logging.WARNING)
  run_dir = output_directory(config)
  mesh = train_mesh.make_training_mesh(config, devices)
  training = build_training(config, mesh)
  rl_step = build_rl_step(config, training)
  tokenizer = load_tokenizer(config)
  reward_fn = load_reward(config.rl_reward)
  train_prompts = load_prompts(config, tokenizer, config.rl_train_files, "rl_train_files")
  eval_prompts = load_prompts(config, tokenizer, config.rl_eval_files, "rl_eval_files") if config.rl_eval_files else []
  iterator = PromptIterator(train_prompts, config.data_shuffle_seed, config.enable_data_shuffling)
  checkpointer = None
  if config.enable_checkpointing:
    checkpointer = TrainCheckpointer(os.path.join(run_dir, "checkpoints"), config)
  writer = MetricsWriter(os.path.join(run_dir, "tensorboard") if config.enable_tensorboard else "", config.log_period)
  history: list[dict[str, float]] = []
  try:
    resumed = checkpointer.restore_latest(training.abstract_state, iterator) if checkpointer else None
    if resumed is not None:  # the newest readable step; damaged ones are reported and moved aside
      state, start = resumed
      _logger.info("resumed from step %d of %s", start, checkpointer.directory)
    else:
      state, start = training.state_from_params(starting_params(config, training)), 0
    ref_params = starting_params(config, training) if config.kl_coef > 0 else None
    engine = Engine(config, params=state["params"], devices=list(mesh.devices.flat))
    roller = Roller(config, engine, tokenizer, reward_fn, stop_ids(config, tokenizer))
    _logger.info(
        "RL (%s) on %s: %d train prompts, %d eval prompts; %d prompts x %d responses per step, responses up to %d"
        " tokens", config.rl_algorithm, config.model_name, len(train_prompts), len(eval_prompts),
        config.rollout_batch_size, config.num_generations, config.max_response_length,
    )
    for step in range(start + 1, config.steps + 1):
      began = time.perf_counter()
      use_live_params(engine, state["params"])
      rollout, metrics = collect(config, roller, iterator, config.decode_sampling_seed * 100_003 + step)
      if rollout.num_responses:
        state, train_metrics = train_on_rollout(config, training, rl_step, state, rollout, ref_params, engine)
        metrics.update(train_metrics)
      metrics["step"] = step
      if eval_prompts and (step == config.steps or (config.rl_eval_period and step % config.rl_eval_period == 0)):
        use_live_params(engine, state["params"])
        metrics["eval_pass_at_1"] = evaluate(config, roller, eval_prompts, -step)
      metrics["step_time_s"] = time.perf_counter() - began
      history.append(metrics)
      if jax.process_index() == 0 and (step % config.log_period == 0 or step == config.steps):
        print(format_rl_line(step, config.steps, metrics), file=sys.stdout, flush=True)
      writer.write(step, config.steps, metrics, print_line=False)
      if checkpointer:
        checkpointer.maybe_save(step, state, iterator, force=step == config.steps)
      if stop_after is not None and step == stop_after:
        return history
    return history
  finally:
    if checkpointer:
      checkpointer.close()
    writer.close()
