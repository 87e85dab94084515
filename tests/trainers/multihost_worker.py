"""Run the training CLI as given and record what this process read and measured (a test tool, never used by the
product).

  python3 -m tests.trainers.multihost_worker OUT.json src/maxtext/configs/base.yml key=value ...

It runs `maxtext.trainers.pre_train.train`'s main through `cli.run`, exactly as `python3 -m ...pre_train.train`
does, with three recorders around functions the trainer looks up at call time: the data source's reads (the record
indices this process read), the sharded iterator's batches (the token rows it handed to the step) and `train`
(each step's metrics). At exit it writes OUT.json: {"process", "records", "inputs", "losses", "steps"}.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from maxtext.input_pipeline import grain_pipeline, iterators
from maxtext.trainers import trainer
from maxtext.trainers.pre_train import train as train_cli
from maxtext.utils import cli

RECORDED: dict = {"records": [], "inputs": [], "losses": [], "steps": []}


class _RecordingSource:
  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    RECORDED["records"].append(int(index))
    return self._source[index]


def install() -> None:
  open_source = grain_pipeline.open_source
  grain_pipeline.open_source = lambda *args, **kwargs: _RecordingSource(open_source(*args, **kwargs))

  next_batch = iterators.ShardedIterator.__next__

  def recording_next(self):
    batch = next_batch(self)
    RECORDED["inputs"].append(np.asarray(batch["inputs"]).tolist())
    return batch

  iterators.ShardedIterator.__next__ = recording_next
  train = trainer.train

  def recording_train(*args, **kwargs):
    history = train(*args, **kwargs)
    RECORDED["losses"] = [m["loss"] for m in history]
    RECORDED["steps"] = [m["step"] for m in history]
    return history

  trainer.train = recording_train


def main() -> None:
  out, argv = sys.argv[1], sys.argv[2:]
  install()
  try:
    cli.run(train_cli.main, argv)
  finally:
    RECORDED["process"] = jax.process_index() if jax.distributed.is_initialized() else 0
    with open(out, "w", encoding="utf-8") as f:
      json.dump(RECORDED, f)


if __name__ == "__main__":
  main()
