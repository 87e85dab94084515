"""Run the training CLI and SIGKILL it at a chosen moment of one save (a test tool, never used by the product).

  python3 -m tests.trainers.kill_during_save POINT STEP config.yml key=value ...

POINT is where the process dies while saving step STEP:
  before_save     the step is due, nothing written yet
  mid_arrays      after the first few arrays of the state are on disk, the rest not
  before_record   every item but the model record written
  before_publish  every item written, the step directory not yet renamed into place
  after_publish   right after the rename that makes the step visible
  never           nowhere: the run ends as the CLI ends it (for tests that want the same one-device run)
The hooks wrap orbax 0.12's per-array write and its rename (module attributes looked up at call time).

The run trains on the first device only, like the test process's in-process runs (`devices=jax.devices()[:1]`):
started with the test session's XLA_FLAGS (4 host devices), its programs are then the ones the test process
compiled, and the persistent compilation cache serves them instead of compiling them again in every child.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
from orbax.checkpoint._src.path import async_path
from orbax.checkpoint._src.serialization import serialization

from maxtext.trainers import checkpointing, trainer
from maxtext.trainers.pre_train import train as train_cli
from maxtext.utils import cli

POINTS = ("before_save", "mid_arrays", "before_record", "before_publish", "after_publish")
NEVER = "never"


def die() -> None:
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def first_device_only() -> None:
  train = trainer.train  # the CLI's main imports it from the module at call time
  trainer.train = lambda config, **kwargs: train(config, **{"devices": jax.devices()[:1], **kwargs})


def install(point: str, step: int) -> None:
  armed = {"on": False, "arrays": 0}
  save = checkpointing.TrainCheckpointer.maybe_save

  def maybe_save(self, at_step, *args, **kwargs):
    if at_step == step:
      self.wait()  # the save before this one is complete: the run has a step to fall back to
      armed["on"] = True
      if point == "before_save":
        die()
    return save(self, at_step, *args, **kwargs)

  write_array = serialization.async_serialize_from_host

  async def async_serialize_from_host(*args, **kwargs):
    result = await write_array(*args, **kwargs)
    if armed["on"] and point == "mid_arrays":
      armed["arrays"] += 1
      if armed["arrays"] == 3:
        die()
    return result

  write_record = checkpointing.ModelRecordHandler.save

  def record_save(self, *args, **kwargs):
    if armed["on"] and point == "before_record":
      die()
    return write_record(self, *args, **kwargs)

  rename = async_path.rename

  async def rename_then_maybe_die(src, dst):
    publishing = armed["on"] and os.path.basename(str(dst)) == str(step)
    if publishing and point == "before_publish":
      die()
    result = await rename(src, dst)
    if publishing and point == "after_publish":
      die()
    return result

  checkpointing.TrainCheckpointer.maybe_save = maybe_save
  serialization.async_serialize_from_host = async_serialize_from_host
  checkpointing.ModelRecordHandler.save = record_save
  async_path.rename = rename_then_maybe_die


if __name__ == "__main__":
  kill_point, kill_step, *argv = sys.argv[1:]
  if kill_point not in (*POINTS, NEVER):
    raise SystemExit(f"unknown kill point {kill_point!r}: one of {', '.join(POINTS)}, {NEVER}")
  first_device_only()
  if kill_point != NEVER:
    install(kill_point, int(kill_step))
  cli.run(train_cli.main, argv)
