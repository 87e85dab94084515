"""The jitted device functions of an RL step, around the trainer's state, optimizer and layouts (build_training):
old / reference log-probs (forward only), the gradient of one packed micro-batch, and the optimizer update."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from maxtext import sharding
from maxtext.configs import Config
from maxtext.layers.mtp import shift_left
from maxtext.models.qwen3_next import Qwen3NextForCausalLM
from maxtext.trainers import mesh as train_mesh
from maxtext.trainers.loss import cross_entropy_sum, mtp_weights
from maxtext.trainers.optimizer import learning_rate_schedule
from maxtext.trainers.post_train.rl.losses import (
    PolicyLossOptions, importance_weights, mismatch_sums, policy_loss, token_logprobs,
)
from maxtext.trainers.post_train.rl.replay import gap_sums, straight_through
from maxtext.trainers.train_step import Training


def loss_options(config: Config) -> PolicyLossOptions:
  return PolicyLossOptions(
      algorithm=config.rl_algorithm, eps_low=config.eps_clip, eps_high=config.eps_clip_high,
      aggregation=config.rl_loss_aggregation, kl_coef=config.kl_coef, kl_type=config.kl_type,
  )


def _mtp_loss(output, batch) -> jax.Array:
  """Mean over MTP steps of the CE on response tokens (the pretraining MTP loss with the response mask)."""
  losses = []
  for step, logits in enumerate(output.mtp_logits):
    weights = mtp_weights(batch, step).astype(jnp.float32)
    targets = shift_left(batch["targets"], step + 1)
    losses.append(cross_entropy_sum(logits, targets, weights) / jnp.maximum(jnp.sum(weights), 1.0))
  return sum(losses) / len(losses)


def _on_mesh(jitted: Callable, mesh) -> Callable:
  """`jitted`, traced with the mesh and logical axis rules active (as the trainer's own step)."""

  def call(*args):
    with sharding.activate(mesh):
      return jitted(*args)

  return call


@dataclasses.dataclass(frozen=True)
class RLStep:
  logprobs: Callable  # (params, micro-batch) -> (logp at rl_temperature [R, T], logp at temperature 1 [R, T])
  # (params, micro-batch, totals) -> (gradient, metric sums) of the step's loss share of one micro-batch. On-policy
  # (a step's first update): pi_old is the forward itself; off-policy: the batch carries old_logp and is_weights.
  grads_on_policy: Callable
  grads_off_policy: Callable
  weights: Callable  # (old logp, rollout logp, mask, seq_ids) -> truncated importance weights
  add: Callable  # (gradient, gradient) -> sum (first argument donated)
  update: Callable  # (state, gradient) -> (state, {grad_norm, learning_rate}); state donated
  mismatch: Callable  # (train logp, rollout logp, mask) -> mismatch sums


def build_rl_step(config: Config, training: Training) -> RLStep:
  model = Qwen3NextForCausalLM(training.spec)
  options = loss_options(config)
  temperature = config.rl_temperature
  with_mtp = config.mtp_num_layers > 0 and config.mtp_loss_scaling_factor > 0
  schedule = learning_rate_schedule(config)
  mesh = training.mesh
  rows = train_mesh.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  param_shardings = training.param_shardings

  def forward(params, batch, mtp: bool):
    return model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], with_mtp=mtp)

  def logprobs(params, batch):
    logits = forward(params, batch, False).logits
    tempered = token_logprobs(logits, batch["targets"], temperature)
    plain = tempered if temperature == 1.0 else token_logprobs(logits, batch["targets"])
    return tempered, plain

  def loss_fn(params, batch, totals, on_policy: bool):
    output = forward(params, batch, with_mtp)
    logp = token_logprobs(output.logits, batch["targets"], temperature)
    sums = {}
    replayed = batch.get("replay_logp")  # rl_replay_logprobs: the engine's temperature-1 log-probs, these params
    if replayed is not None:
      packed = logp if temperature == 1.0 else token_logprobs(output.logits, batch["targets"])
      sums.update(gap_sums(jax.lax.stop_gradient(packed), replayed, batch["loss_mask"]))
      if temperature == 1.0:  # the engine reports untempered log-probs only: tempered ones stay the forward's
        logp = straight_through(replayed, logp)
    if on_policy:
      # The step's first update: pi_old is this very forward (the same parameters), so its detached log-probs
      # are the old ones and the ratio is exactly 1. The engine's log-probs are compared with them here too.
      old_logp = jax.lax.stop_gradient(logp)
      if replayed is not None:
        plain = replayed
      elif temperature == 1.0:
        plain = old_logp
      else:
        plain = jax.lax.stop_gradient(token_logprobs(output.logits, batch["targets"]))
      is_weights = importance_weights(plain, batch["rollout_logp"], batch["loss_mask"], batch["seq_ids"],
                                      config.importance_sampling_cap, config.rl_algorithm)
      sums.update({f"mismatch_{k}": v for k, v in mismatch_sums(plain, batch["rollout_logp"],
                                                                 batch["loss_mask"]).items()})
    else:
      old_logp, is_weights = batch["old_logp"], batch["is_weights"]
    loss, policy_sums = policy_loss(
        logp, old_logp, batch["advantages"], batch["loss_mask"], batch["seq_ids"], is_weights,
        totals["num_tokens"], totals["num_sequences"], options, ref_logp=batch.get("ref_logp"),
    )
    per_micro = 1.0 / totals["num_micro_batches"]
    sums.update(policy_sums, policy_loss=loss, aux_loss=output.aux_loss * per_micro)
    total = loss + config.load_balance_loss_weight * output.aux_loss * per_micro
    if with_mtp:
      mtp = _mtp_loss(output, batch) * per_micro
      mtp_aux = config.load_balance_loss_weight * output.mtp_aux_loss * per_micro
      total = total + config.mtp_loss_scaling_factor * mtp + mtp_aux
      sums["mtp_loss"] = mtp
    return total, sums

  def grads(params, batch, totals, on_policy: bool):
    (_, sums), gradient = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, totals, on_policy)
    return gradient, sums

  def update(state, gradient):
    updates, opt_state = training.optimizer.update(gradient, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"grad_norm": optax.tree.norm(gradient), "learning_rate": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  state_shardings = training.state_shardings
  return RLStep(
      logprobs=_on_mesh(jax.jit(logprobs, in_shardings=(param_shardings, rows), out_shardings=(rows, rows)), mesh),
      grads_on_policy=_on_mesh(jax.jit(functools.partial(grads, on_policy=True),
                                       in_shardings=(param_shardings, rows, replicated),
                                       out_shardings=(param_shardings, replicated)), mesh),
      grads_off_policy=_on_mesh(jax.jit(functools.partial(grads, on_policy=False),
                                        in_shardings=(param_shardings, rows, replicated),
                                        out_shardings=(param_shardings, replicated)), mesh),
      weights=jax.jit(functools.partial(importance_weights, cap=config.importance_sampling_cap,
                                        algorithm=config.rl_algorithm)),
      add=jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=(0,)),
      update=_on_mesh(jax.jit(update, in_shardings=(state_shardings, param_shardings),
                             out_shardings=(state_shardings, replicated), donate_argnums=(0,)), mesh),
      mismatch=jax.jit(mismatch_sums),
  )


def on_mesh(batch: dict, mesh) -> dict[str, jax.Array]:
  """Host micro-batch [R, T] arrays -> global arrays laid out like the training batch."""
  return train_mesh.host_batch_to_global(batch, mesh)

