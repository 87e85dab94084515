"""rl_replay_logprobs: the trainer's log-probs of rollout tokens recomputed in the engine's own arithmetic.

The engine scores a sampled token through a prefill padded to its call's (rows, prompt length) bucket, then one
decoding call per token (recurrent Gated DeltaNet, attention over the KV cache); the packed training forward runs
the chunked delta rule over packed rows. Same function, different float32 sums: XLA:CPU's results even depend on an
op's shape (a row's RMS norm differs between a [256, 16] and an [8, 32] batch of rows). Replaying each response
through Engine.replay at its generate call's shapes gives the rollout's log-probs bit for bit under the same
parameters (docs/rl.md).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxtext.inference.engine import Engine
from maxtext.trainers.post_train.rl.rollout import Rollout


def replay_logprobs(engine: Engine, rollout: Rollout, indices: Sequence[int], params: Any) -> dict[int, np.ndarray]:
  """Response index -> the temperature-1 log-probs of its tokens under `params` ([len(response)] float32), as the
  engine computes them. Responses of one shape replay together, at most that shape's rows a call."""
  groups: dict[tuple, list[int]] = collections.defaultdict(list)
  for index in indices:
    groups[(tuple(rollout.shapes[index]), rollout.rounds[index] is None)].append(index)
  replayed = {}
  for (shape, plain), members in groups.items():
    for start in range(0, len(members), shape[0]):
      part = members[start : start + shape[0]]
      values = engine.replay([rollout.prompts[i] for i in part], [rollout.responses[i] for i in part], shape=shape,
                             rounds=None if plain else [rollout.rounds[i] for i in part], params=params)
      replayed.update(zip(part, values))
  return replayed


def straight_through(replayed: jax.Array, logp: jax.Array) -> jax.Array:
  """The value of `replayed`, the gradient of `logp`: replayed + (logp - logp), where logp - logp is exactly 0.

  The loss sees the engine's log-probs while its gradient flows through the packed forward, which computes the
  same function up to float32 rounding (its distance is reported as the packed-replay gap)."""
  return jax.lax.stop_gradient(replayed) + (logp - jax.lax.stop_gradient(logp))


def gap_sums(packed: jax.Array, replayed: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Sum and max over response tokens of |packed forward's log-prob - replayed one|, and that max relative to
  max(1, |replayed|) (losses.mismatch_sums says why)."""
  delta = jnp.abs(packed - replayed) * mask.astype(jnp.float32)
  return {"replay_gap_abs_sum": jnp.sum(delta), "replay_gap_abs_max": jnp.max(delta),
          "replay_gap_rel_max": jnp.max(delta / jnp.maximum(1.0, jnp.abs(replayed)))}
