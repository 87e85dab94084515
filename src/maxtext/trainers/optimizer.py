"""AdamW with linear warmup and cosine decay, global-norm clipping, and no weight decay on scales and gates."""

from __future__ import annotations

from typing import Any

import jax
import optax

from maxtext.configs import Config

# Parameters that are not matmul weights: norm scales and the delta rule's per-head decay parameters. Weight decay
# would pull them towards 0, which for A_log and dt_bias changes the gating, not the capacity.
NO_DECAY_NAMES = frozenset({"scale", "bias", "dt_bias", "A_log"})


def schedule_steps(config: Config) -> int:
  return config.steps if config.learning_rate_schedule_steps == -1 else config.learning_rate_schedule_steps


def learning_rate_schedule(config: Config) -> optax.Schedule:
  """0 -> learning_rate over warmup, cosine down to learning_rate * final fraction at the schedule's end, then flat."""
  total = schedule_steps(config)
  warmup = int(round(config.warmup_steps_fraction * total))
  peak = config.learning_rate
  cosine = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=config.cosine_learning_rate_final_fraction)
  if warmup == 0:
    return cosine  # flat at the final value after `total` steps
  warmup_fn = optax.linear_schedule(0.0, peak, warmup)
  return optax.join_schedules([warmup_fn, cosine], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True for every parameter that weight decay applies to (by the parameter's own name)."""

  def decays(path, _) -> bool:
    name = getattr(path[-1], "key", getattr(path[-1], "name", ""))
    return str(name) not in NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(config: Config) -> optax.GradientTransformation:
  adamw = optax.adamw(
      learning_rate_schedule(config),
      b1=config.adam_b1,
      b2=config.adam_b2,
      eps=config.adam_eps,
      weight_decay=config.adam_weight_decay,
      mask=weight_decay_mask,
  )
  if config.gradient_clipping_threshold > 0:
    return optax.chain(optax.clip_by_global_norm(config.gradient_clipping_threshold), adamw)
  return adamw
