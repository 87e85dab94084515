"""Pick the pipeline for `dataset_type` and build this process's data shards of the global batch."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from maxtext.configs import Config, ConfigError


class BatchIterator(Protocol):
  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class DataShare:
  """A process's part of the data: blocks `shards` (in row order) of the `num_shards` equal blocks of rows of every
  global batch; block k is always filled from data shard k (trainers/host_data.py decides who reads what)."""

  global_batch: int
  num_shards: int
  shards: tuple[int, ...]

  @property
  def rows_per_shard(self) -> int:
    return self.global_batch // self.num_shards

  @classmethod
  def whole(cls, global_batch: int, num_shards: int = 1) -> "DataShare":
    """Every shard: one process reading the whole global batch."""
    return cls(global_batch, num_shards, tuple(range(num_shards)))


class ShardMismatchError(ValueError):
  """A saved data position of other shards than this run reads (data_shards changed); the message says which."""


class ShardedIterator:
  """Data shards read side by side: shard k yields its block of rows of every global batch; a batch is this
  process's blocks stacked in row order. The state holds one position per shard, so any process holding a shard
  can resume it."""

  def __init__(self, shards: dict[int, BatchIterator], num_shards: int):
    self.num_shards = num_shards
    self._shards = dict(sorted(shards.items()))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    blocks = [next(iterator) for iterator in self._shards.values()]
    if len(blocks) == 1:
      return blocks[0]
    return {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}

  def get_state(self) -> dict[str, Any]:
    return {"data_shards": self.num_shards, "shards": {str(k): it.get_state() for k, it in self._shards.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    """`state` may hold more shards than this process reads (the union of every process's states)."""
    if state["data_shards"] != self.num_shards:
      raise ShardMismatchError(f"the data position was saved for data_shards={state['data_shards']}, this run reads"
                               f" {self.num_shards} shard(s): set data_shards={state['data_shards']} to resume it")
    missing = [k for k in self._shards if str(k) not in state["shards"]]
    if missing:
      raise ShardMismatchError(f"the data position of shard {missing[0]} of {self.num_shards} was not saved")
    for k, iterator in self._shards.items():
      iterator.set_state(state["shards"][str(k)])


def make_train_iterator(config: Config, global_batch_size: int, share: DataShare | None = None) -> ShardedIterator:
  """The rows of every global batch that `share` names; by default the whole batch (config.data_shards shards, or
  one). dataset_type=synthetic imports neither grain nor a tokenizer."""
  if share is None:
    share = DataShare.whole(global_batch_size, config.data_shards or 1)
  if share.global_batch != global_batch_size or global_batch_size % share.num_shards:
    raise ConfigError(f"the global batch ({global_batch_size}) does not split into {share.num_shards} data shards")
  rows = share.rows_per_shard
  if config.dataset_type == "synthetic":
    from maxtext.input_pipeline.synthetic import SyntheticIterator  # noqa: PLC0415

    shards = {k: SyntheticIterator(rows, config.max_target_length, config.vocab_size,
                                   config.data_shuffle_seed * 1009 + k) for k in share.shards}
    return ShardedIterator(shards, share.num_shards)
  from maxtext.input_pipeline import files as data_files  # noqa: PLC0415
  from maxtext.input_pipeline.grain_pipeline import GrainIterator, build_dataset  # noqa: PLC0415
  from maxtext.input_pipeline.tokenization import load_tokenizer  # noqa: PLC0415

  if config.dataset_type == "grain":
    files, file_type = data_files.grain_files(config)
  else:
    files, file_type = data_files.hf_files(config)
  tokenizer = load_tokenizer(config)
  shards = {k: GrainIterator(build_dataset(config, files, file_type, tokenizer, rows, k, share.num_shards))
            for k in share.shards}
  return ShardedIterator(shards, share.num_shards)
