"""Rollout responses -> packed training rows: each prompt + response is one packed document (segment), the loss
mask covers its response tokens only, and per-token arrays carry the advantage and the engine's log-probs."""

from __future__ import annotations

import numpy as np

# Per-token arrays of an RL micro-batch [R, T], besides the pretraining batch keys.
RL_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "advantages", "rollout_logp", "seq_ids")
_FLOAT_KEYS = ("loss_mask", "advantages", "rollout_logp")


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
  """Bins of item indices, longest first into the first row with room (first-fit decreasing)."""
  rows: list[list[int]] = []
  room: list[int] = []
  for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    for row, free in enumerate(room):
      if lengths[index] <= free:
        rows[row].append(index)
        room[row] -= lengths[index]
        break
    else:
      rows.append([index])
      room.append(capacity - lengths[index])
  return rows


def _empty(rows: int, length: int, extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  floats = _FLOAT_KEYS + extra
  return {k: np.zeros((rows, length), np.float32 if k in floats else np.int32) for k in RL_KEYS + extra}


def pack(prompts: list[tuple[int, ...]], responses: list[list[int]], rollout_logprobs: list[list[float]],
         advantages: np.ndarray, rows_per_batch: int, length: int,
         per_token: dict[str, list] | None = None) -> list[dict[str, np.ndarray]]:
  """Micro-batches of `rows_per_batch` rows x `length` tokens holding every response once.

  A response of a P-token prompt and L sampled tokens takes P + L - 1 slots (inputs are its tokens but the last,
  targets the next ones); targets P-1 .. P+L-2 are the sampled tokens (loss_mask 1). seq_ids number the responses
  of each micro-batch 0, 1, ... (0 where loss_mask is 0 too). per_token: more float arrays laid out like
  rollout_logp (name -> per response, a value per sampled token).
  """
  per_token = per_token or {}
  sizes = [len(p) + len(r) - 1 for p, r in zip(prompts, responses)]
  if max(sizes) > length:
    raise ValueError(f"a prompt + response of {max(sizes) + 1} tokens does not fit a row of {length} + 1")
  rows = _first_fit(sizes, length)
  batches = []
  for start in range(0, len(rows), rows_per_batch):
    batch = _empty(rows_per_batch, length, tuple(per_token))
    next_seq = 0
    for row, members in enumerate(rows[start : start + rows_per_batch]):
      cursor = 0
      for segment, index in enumerate(members, start=1):
        tokens = np.asarray(list(prompts[index]) + list(responses[index]), np.int32)
        n, p = len(tokens) - 1, len(prompts[index])
        span = slice(cursor, cursor + n)
        batch["inputs"][row, span] = tokens[:-1]
        batch["targets"][row, span] = tokens[1:]
        batch["positions"][row, span] = np.arange(n)
        batch["segment_ids"][row, span] = segment
        response = slice(cursor + p - 1, cursor + n)
        batch["loss_mask"][row, response] = 1.0
        batch["advantages"][row, response] = advantages[index]
        batch["rollout_logp"][row, response] = rollout_logprobs[index]
        for name, values in per_token.items():
          batch[name][row, response] = values[index]
        batch["seq_ids"][row, response] = next_seq
        next_seq += 1
        cursor += n
    batches.append(batch)
  return batches
