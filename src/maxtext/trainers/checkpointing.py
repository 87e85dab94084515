"""Training checkpoints with orbax's CheckpointManager: state (params, optimizer, step) and the data iterator.

Layout: <base_output_directory>/<run_name>/checkpoints/<step>/{items, data_iterator, maxtext_model.json}. `items` is
an orbax PyTree of {'step', 'params', 'opt_state'}, so `load_parameters_path=.../<step>/items` finetunes from it;
`maxtext_model.json` tells tools which model it holds. orbax writes each step under a temporary name and renames it
when complete, so an interrupted save never leaves a readable half-checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from maxtext.checkpoint_conversion import orbax_io
from maxtext.checkpoint_conversion.safetensors_io import CheckpointFormatError
from maxtext.configs import Config

_logger = logging.getLogger("maxtext.trainers")
STATE_ITEM = "items"
DATA_ITEM = "data_iterator"


class DataIteratorHandler(ocp.CheckpointHandler):
  """Stores each host's iterator state (`get_state()`, JSON) in its own file: hosts read different data."""

  @staticmethod
  def _file(directory: epath.Path) -> epath.Path:
    return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    self._file(directory).write_text(json.dumps(args.iterator.get_state()))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> Any:
    file = self._file(directory)
    if not file.exists():
      raise CheckpointFormatError(f"'{file}' is missing: the checkpoint was written by a different number of hosts")
    args.iterator.set_state(json.loads(file.read_text()))
    return args.iterator

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


class TrainCheckpointer:
  """Saves every `checkpoint_period` steps (and the last), keeps `max_num_checkpoints_to_keep`, resumes the latest."""

  def __init__(self, directory: str, config: Config):
    self.directory = os.path.abspath(directory)
    self._model_record = orbax_io.model_config_record(config)
    self._period = config.checkpoint_period
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.max_num_checkpoints_to_keep,
        enable_async_checkpointing=config.async_checkpointing,
        cleanup_tmp_directories=True,
        create=True,
    )
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM))
    except OSError as e:
      raise PermissionError(f"cannot create the checkpoint directory '{self.directory}': {e}") from None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, abstract_state: Any, iterator: Any) -> Any:
    """The state saved at `step`, laid out like `abstract_state`; `iterator` is moved to where it was."""
    where = os.path.join(self.directory, str(step))
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              **{STATE_ITEM: ocp.args.StandardRestore(abstract_state), DATA_ITEM: DataIteratorRestore(iterator)}
          ),
      )
    except CheckpointFormatError:
      raise
    except Exception as e:  # orbax raises many types for a checkpoint of another shape or model
      message = " ".join(str(e).split())[:300]
      raise CheckpointFormatError(
          f"cannot resume from '{where}' (a checkpoint of another model or optimizer?): {type(e).__name__}: {message}"
      ) from None
    return restored[STATE_ITEM]

  def maybe_save(self, step: int, state: Any, iterator: Any, force: bool = False) -> bool:
    """Save if `step` is due (or `force`); the write continues in the background when async."""
    if not (force or step % self._period == 0):
      return False
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: DataIteratorSave(iterator)}),
        force=True,  # the period is decided above; orbax would also save the first step of every run
    )
    self._describe_finished_steps()
    return saved

  def _describe_finished_steps(self) -> None:
    """Write maxtext_model.json beside every finished step (orbax lists only complete ones)."""
    if jax.process_index() != 0:
      return
    for step in self._manager.all_steps():
      file = os.path.join(self.directory, str(step), orbax_io.MODEL_CONFIG_FILE)
      if os.path.isdir(os.path.dirname(file)) and not os.path.exists(file):
        with open(file, "w", encoding="utf-8") as f:
          json.dump({"format_version": 1, **self._model_record}, f, indent=2, sort_keys=True)

  def wait(self) -> None:
    """Block until background saves are on disk."""
    self._manager.wait_until_finished()
    self._describe_finished_steps()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._describe_finished_steps()
    self._manager.close()
