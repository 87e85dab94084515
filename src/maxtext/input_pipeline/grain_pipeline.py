"""The grain pipeline over local files: read -> take one data shard -> shuffle (reshuffled every epoch) -> tokenise ->
pack into rows of max_target_length -> batch. Its iterator state (a few integers) is checkpointed with the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from maxtext.configs import Config
from maxtext.input_pipeline.sources import open_source
from maxtext.input_pipeline.tokenization import PretrainEncoder, SftEncoder, to_example

_FEATURES = ("inputs", "targets", "loss_mask")


def _pad_row(example: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
  """One document per row (packing=false): truncated or zero-padded; padding has segment id 0 and no loss."""
  n = min(len(example["inputs"]), length)
  row = {key: np.zeros(length, np.float32 if key == "loss_mask" else np.int32) for key in _FEATURES}
  for key in _FEATURES:
    row[key][:n] = example[key][:n]
  row["segment_ids"] = (np.arange(length) < n).astype(np.int32)
  row["positions"] = np.where(np.arange(length) < n, np.arange(length), 0).astype(np.int32)
  return row


def _from_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packed features (inputs_segment_ids, inputs_positions, ...) -> our batch keys."""
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "loss_mask": row["loss_mask"].astype(np.float32),
      "segment_ids": row["inputs_segment_ids"].astype(np.int32),
      "positions": row["inputs_positions"].astype(np.int32),
  }


def _truncate(example: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
  return {key: value[:length] for key, value in example.items()}


def build_dataset(
    config: Config,
    files: Sequence[str],
    file_type: str,
    tokenizer,
    rows: int,
    shard: int = 0,
    num_shards: int = 1,
) -> grain.IterDataset:
  """Batches of data shard `shard` of `num_shards` (records shard, shard + num_shards, ...): dicts of
  [rows, max_target_length] numpy arrays."""
  columns = [c.strip() for c in config.train_data_columns.split(",") if c.strip()]
  if config.use_sft:
    encode = SftEncoder(tokenizer, columns[0], config.sft_train_on_completion_only, config.vocab_size)
  else:
    encode = PretrainEncoder(tokenizer, columns, config.add_eos, config.vocab_size)
  length = config.max_target_length

  records = grain.MapDataset.source(open_source(files, file_type, columns))
  records = records[shard::num_shards]
  if config.enable_data_shuffling:
    records = records.shuffle(seed=config.data_shuffle_seed)
  examples = records.repeat().map(lambda record: to_example(*encode(record)))
  examples = examples.filter(lambda example: len(example["inputs"]) > 0).to_iter_dataset()

  lengths = {key: length for key in _FEATURES}
  if not config.packing:
    packed = examples.map(lambda example: _pad_row(example, length))
  elif config.use_sft:
    # Conversations are never split across rows (a reply without its prompt teaches nothing); longer ones are cut.
    packed = FirstFitPackIterDataset(
        examples.map(lambda example: _truncate(example, length)),
        length_struct=lengths,
        num_packing_bins=rows,
        seed=config.data_shuffle_seed,
        shuffle_bins=config.enable_data_shuffling,
    ).map(_from_packed)
  else:
    # Pretraining text is concatenated and cut at row boundaries: no padding; a cut document continues as a new
    # segment in the next row.
    packed = ConcatThenSplitIterDataset(examples, length_struct=lengths).map(_from_packed)
  return packed.batch(rows, drop_remainder=True)


class GrainIterator:
  """Iterates a grain dataset; get_state/set_state are grain's (JSON-serialisable)."""

  def __init__(self, dataset: grain.IterDataset):
    self._iterator = iter(dataset)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return self._iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state)
