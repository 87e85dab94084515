"""The training loss: next-token cross-entropy on the loss mask, MoE load balancing, optional MTP."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxtext.layers.mtp import shift_left
from maxtext.models.qwen3_next import ModelOutput
from maxtext.trainers.cross_entropy import token_cross_entropy


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """sum over tokens of weight * -log p(target); logits [B, T, V] in any dtype, the softmax in float32."""
  # The backward writes d_logits once in the logits' dtype (cross_entropy.py): no float32 [B, T, V] cotangent.
  return jnp.sum(token_cross_entropy(logits, targets) * weights)


def mtp_weights(batch: dict[str, jax.Array], step: int) -> jax.Array:
  """Where MTP step `step` (0-based) has a target: token t + step + 2 exists, is trained on, and lies in the same
  packed document as position t."""
  offset = step + 1
  same_document = shift_left(batch["segment_ids"], offset) == batch["segment_ids"]
  return shift_left(batch["loss_mask"], offset) * same_document


def training_loss(
    output: ModelOutput,
    batch: dict[str, jax.Array],
    load_balance_loss_weight: float,
    mtp_loss_scaling_factor: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total loss, parts): mean CE over masked tokens + weighted aux loss (+ weighted mean MTP CE)."""
  weights = batch["loss_mask"].astype(jnp.float32)
  num_tokens = jnp.sum(weights)
  lm_loss = cross_entropy_sum(output.logits, batch["targets"], weights) / jnp.maximum(num_tokens, 1.0)
  total = lm_loss + load_balance_loss_weight * output.aux_loss
  parts = {"lm_loss": lm_loss, "aux_loss": output.aux_loss, "num_tokens": num_tokens}
  if output.mtp_logits and mtp_loss_scaling_factor > 0:
    step_losses = []
    for step, logits in enumerate(output.mtp_logits):
      w = mtp_weights(batch, step).astype(jnp.float32)
      targets = shift_left(batch["targets"], step + 1)
      step_losses.append(cross_entropy_sum(logits, targets, w) / jnp.maximum(jnp.sum(w), 1.0))
    mtp_loss = sum(step_losses) / len(step_losses)
    total = total + mtp_loss_scaling_factor * mtp_loss + load_balance_loss_weight * output.mtp_aux_loss
    parts["mtp_loss"] = mtp_loss
  return total, parts
