"""Pick the pipeline for `dataset_type` and size it to this host's share of the global batch."""

from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np

from maxtext.configs import Config, ConfigError


class BatchIterator(Protocol):
  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


def make_train_iterator(config: Config, global_batch_size: int) -> BatchIterator:
  """This host's rows of every global batch. dataset_type=synthetic imports neither grain nor a tokenizer."""
  process_count, process_index = jax.process_count(), jax.process_index()
  if global_batch_size % process_count:
    raise ConfigError(f"the global batch ({global_batch_size}) does not split over the {process_count} hosts")
  host_batch = global_batch_size // process_count
  if config.dataset_type == "synthetic":
    from maxtext.input_pipeline.synthetic import SyntheticIterator  # noqa: PLC0415

    seed = config.data_shuffle_seed * 1009 + process_index
    return SyntheticIterator(host_batch, config.max_target_length, config.vocab_size, seed)
  from maxtext.input_pipeline import files as data_files  # noqa: PLC0415
  from maxtext.input_pipeline.grain_pipeline import GrainIterator, build_dataset  # noqa: PLC0415
  from maxtext.input_pipeline.tokenization import load_tokenizer  # noqa: PLC0415

  if config.dataset_type == "grain":
    files, file_type = data_files.grain_files(config)
  else:
    files, file_type = data_files.hf_files(config)
  tokenizer = load_tokenizer(config)
  dataset = build_dataset(config, files, file_type, tokenizer, host_batch, process_index, process_count)
  return GrainIterator(dataset)
