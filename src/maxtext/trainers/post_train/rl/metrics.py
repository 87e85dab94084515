"""The RL step's console line (TensorBoard gets every scalar through the trainer's MetricsWriter)."""

from __future__ import annotations

from maxtext.trainers.metrics import progress_bar


def format_rl_line(step: int, total: int, m: dict[str, float]) -> str:
  parts = [
      progress_bar(step, total),
      f"reward {m['reward_mean']:.3f}±{m['reward_std']:.3f}",
      f"signal {m['signal_fraction']:.2f}",
      f"len {m['response_length']:.1f}",
  ]
  if "policy_loss" in m:
    # |ratio - 1| of the first update: pi_old is that update's own forward, so anything but 0 is a bug.
    parts += [f"loss {m['policy_loss']:+.4f}", f"clip {m['clip_fraction']:.3f}",
              f"r-1 {m['first_ratio_deviation_max']:.1e}"]
    parts.append(f"kl {m['kl']:.2e}" if "kl" in m else "kl off")
    if "mtp_loss" in m:
      parts.append(f"mtp {m['mtp_loss']:.3f}")
    # mean/max |difference| of the log-probs, (max relative to max(1, |log-prob|))
    parts.append(f"mismatch {m['mismatch_mean']:.2e}/{m['mismatch_max']:.2e} ({m['mismatch_rel_max']:.2e}) "
                 f"k3 {m['mismatch_k3']:.2e}")
    if "replay_gap_mean" in m:  # rl_replay_logprobs: how far the packed forward (the gradient's path) is from it
      parts.append(f"packed-replay {m['replay_gap_mean']:.2e}/{m['replay_gap_max']:.2e} ({m['replay_gap_rel_max']:.2e})")
  else:
    parts.append("no group with signal: update skipped")
  accepted = f" (mtp drafts accepted {m['draft_acceptance']:.2f})" if "draft_acceptance" in m else ""
  parts += [f"rollout {m['rollout_tokens_per_s']:,.0f} tok/s{accepted}"]
  if "train_tokens_per_s" in m:
    parts.append(f"train {m['train_tokens_per_s']:,.0f} tok/s")
  parts.append(f"{m['step_time_s']:.2f}s (rollout {m['rollout_s']:.2f}, train {m.get('train_s', 0.0):.2f})")
  if "eval_pass_at_1" in m:
    parts.append(f"eval pass@1 {m['eval_pass_at_1']:.3f}")
  return "rl step " + " | ".join(parts)
