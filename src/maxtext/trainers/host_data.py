"""Which rows of every global batch this process reads, and how they become global arrays.

The global batch [B, T] is laid out by the batch sharding; each process reads only the rows its own devices hold.
The rows are cut into `data_shards` equal blocks: block k is always filled from data shard k (records k, k+n, ...),
whatever the number of processes, so a run reads the same global batches on one host or on several, and the data
position of a checkpoint (one state per shard) resumes under another process count. By default there is one shard
per group of processes holding distinct rows (one per host in data parallelism; one in all when the hosts split the
sequence or the tensors of the same rows, which then all read the same shard).
"""

from __future__ import annotations

import jax
import numpy as np

from maxtext.configs import ConfigError
from maxtext.input_pipeline.iterators import DataShare
from maxtext.trainers import mesh as train_mesh


def _row_ranges(mesh, shape: tuple[int, int]) -> dict[int, list[tuple[int, int]]]:
  """process index -> the row ranges [start, stop) its devices hold of a batch of `shape`, adjacent ones merged."""
  spans: dict[int, set[tuple[int, int]]] = {}
  for device, index in train_mesh.batch_sharding(mesh).devices_indices_map(shape).items():
    start, stop, _ = index[0].indices(shape[0])
    spans.setdefault(device.process_index, set()).add((start, stop))
  ranges = {}
  for process, held in spans.items():
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(held):
      if merged and start <= merged[-1][1]:
        merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
      else:
        merged.append((start, stop))
    ranges[process] = merged
  return ranges


def process_share(mesh, global_batch: int, length: int, data_shards: int = 0,
                  process_index: int | None = None) -> DataShare:
  """The DataShare of `process_index` (default: this process) for global batches [global_batch, length] on `mesh`;
  `data_shards` 0 takes the fewest blocks that give each process whole blocks."""
  process_index = jax.process_index() if process_index is None else process_index
  ranges = _row_ranges(mesh, (global_batch, length))
  bounds = sorted({edge for spans in ranges.values() for span in spans for edge in span})
  block = np.gcd.reduce(np.diff(bounds)) if len(bounds) > 1 else global_batch
  natural = global_batch // int(block)
  num_shards = data_shards or natural
  if num_shards % natural or global_batch % num_shards:
    raise ConfigError(
        f"config key 'data_shards' ({data_shards}) must divide the global batch ({global_batch} rows) and be a"
        f" multiple of {natural}: the {len(ranges)} process(es) read {natural} distinct block(s) of rows"
    )
  rows = global_batch // num_shards
  mine = tuple(sorted(k for k in range(num_shards)
                      if any(start <= k * rows < stop for start, stop in ranges[process_index])))
  return DataShare(global_batch, num_shards, mine)


def to_global(batch: dict[str, np.ndarray], mesh, share: DataShare) -> dict[str, jax.Array]:
  """This process's rows ([len(share.shards) * rows_per_shard, T] per key) -> global [B, T] arrays on `mesh`."""
  target = train_mesh.batch_sharding(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    out[key] = jax.make_array_from_process_local_data(target, value, (share.global_batch, *value.shape[1:]))
  return out
