"""Random tokens, one document per row: for benchmarks and smoke runs. Batch n depends only on (seed, n)."""

from __future__ import annotations

from typing import Any

import numpy as np


class SyntheticIterator:
  def __init__(self, batch_size: int, length: int, vocab_size: int, seed: int):
    self._shape = (batch_size, length)
    self._vocab_size = vocab_size
    self._seed = seed
    self._next = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self._seed, self._next))
    self._next += 1
    batch, length = self._shape
    tokens = rng.integers(0, self._vocab_size, (batch, length + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), self._shape).copy(),
        "segment_ids": np.ones(self._shape, np.int32),
        "loss_mask": np.ones(self._shape, np.float32),
    }

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next}

  def set_state(self, state: dict[str, Any]) -> None:
    self._next = int(state["next_batch"])
