"""Training checkpoints with orbax's CheckpointManager: state (params, optimizer, step), the data iterator and the
model record.

Layout: <base_output_directory>/<run_name>/checkpoints/<step>/{items, data_iterator, maxtext_model.json}. `items` is
an orbax PyTree of {'step', 'params', 'opt_state'}, one array per directory, so `load_parameters_path=.../<step>/items`
finetunes or decodes from it reading the parameters alone. orbax writes each step under a temporary name and renames
it when every item is written; the model record (the model, and every array's shape, dtype and fingerprint) is one
of those items, so a visible step is complete. Resuming checks the restored state against the record; a damaged
newest step is reported, moved aside and the previous one used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from maxtext.checkpoint_conversion import fingerprint, model_record, orbax_io
from maxtext.checkpoint_conversion.param_reader import one_line
from maxtext.checkpoint_conversion.safetensors_io import CheckpointFormatError
from maxtext.configs import Config
from maxtext.input_pipeline.iterators import ShardedIterator, ShardMismatchError

_logger = logging.getLogger("maxtext.trainers")
STATE_ITEM = "items"
DATA_ITEM = "data_iterator"
RECORD_ITEM = "model_record"


class CheckpointDamagedError(CheckpointFormatError):
  """A step that cannot be read back as it was written (missing, truncated or corrupt files)."""


class CheckpointWriteError(OSError):
  """A save that failed (disk full, file too large, permissions); the previous steps are untouched."""


class _SmallItemHandler(ocp.CheckpointHandler):
  """An orbax item of one small file written synchronously: nothing to describe, finalize or release."""

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


def _read_json(file: epath.Path) -> Any:
  try:
    return json.loads(file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise CheckpointDamagedError(f"'{file}' is damaged (not JSON)") from None


class DataIteratorHandler(_SmallItemHandler):
  """Stores each process's iterator state (`get_state()`, JSON) in its own file. A sharded training iterator
  (input_pipeline.ShardedIterator) resumes from the union of every file's shard positions, so the process count
  may change between save and restore; other iterators read their own process's file."""

  @staticmethod
  def _file(directory: epath.Path, index: int, count: int) -> epath.Path:
    return epath.Path(directory) / f"process_{index}-of-{count}.json"

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    self._file(directory, jax.process_index(), jax.process_count()).write_text(json.dumps(args.iterator.get_state()))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> Any:
    if isinstance(args.iterator, ShardedIterator):
      state = self._shard_positions(epath.Path(directory))
      try:
        args.iterator.set_state(state)
      except ShardMismatchError as e:
        raise CheckpointFormatError(f"cannot resume the data of '{epath.Path(directory).parent}': {e}") from None
      return args.iterator
    file = self._file(directory, jax.process_index(), jax.process_count())
    if not file.exists():
      raise CheckpointFormatError(f"'{file}' is missing: the checkpoint was written by a different number of hosts")
    args.iterator.set_state(_read_json(file))
    return args.iterator

  def _shard_positions(self, directory: epath.Path) -> dict[str, Any]:
    """{'data_shards': n, 'shards': {k: position}} merged from every process's file."""
    merged: dict[str, Any] = {"data_shards": None, "shards": {}}
    files = sorted(directory.glob("process_*-of-*.json"))
    if not files:
      raise CheckpointDamagedError(f"'{directory}' holds no data iterator state")
    for file in files:
      state = _read_json(file)
      if "shards" not in state:  # written before data shards: process i of n read shard i of n
        index, count = (int(x) for x in file.stem[len("process_"):].split("-of-"))
        state = {"data_shards": count, "shards": {str(index): state}}
      if merged["data_shards"] not in (None, state["data_shards"]):
        raise CheckpointDamagedError(f"'{directory}' mixes iterator states of different data shards")
      merged["data_shards"] = state["data_shards"]
      merged["shards"].update(state["shards"])
    return merged


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


class ModelRecordHandler(_SmallItemHandler):
  """Writes maxtext_model.json into the step's directory while orbax still holds it under its temporary name (the
  item directory's parent), so the rename that publishes the arrays publishes the record with them."""

  def save(self, directory: epath.Path, args: "ModelRecordSave") -> None:
    if jax.process_index() == 0:
      model_record.write_record(os.fspath(epath.Path(directory).parent), args.text)

  def restore(self, directory: epath.Path, args: Any = None) -> None:
    return None


@ocp.args.register_with_handler(ModelRecordHandler, for_save=True)
@dataclasses.dataclass
class ModelRecordSave(ocp.args.CheckpointArgs):
  text: str


@ocp.args.register_with_handler(ModelRecordHandler, for_restore=True)
@dataclasses.dataclass
class ModelRecordRestore(ocp.args.CheckpointArgs):
  pass


class _OrbaxFailureFilter(logging.Filter):
  """Drops orbax's tracebacks of failed background writes: the checkpointer reports each failure as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "Skipping merge of OCDBT" in str(record.msg):  # we write without OCDBT on purpose
      return False
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname.replace("\\", "/"))


def _quiet_orbax_failures() -> None:
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxFailureFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxFailureFilter())
  # A failed save leaves the coroutines of its other items unawaited; Python would warn about each at exit.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _leaf_name(path: tuple) -> str:
  """'params/decoder/...'-style name of a state leaf (dict keys, sequence indices, attribute names)."""
  parts = []
  for key in path:
    for attribute in ("key", "idx", "name"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
  return "/".join(parts)


def _flat_state(state: Any) -> dict[str, Any]:
  return {_leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


class TrainCheckpointer:
  """Saves every `checkpoint_period` steps (and the last), keeps `max_num_checkpoints_to_keep`, resumes the latest
  readable step."""

  def __init__(self, directory: str, config: Config):
    self.directory = os.path.abspath(directory)
    self._model = orbax_io.model_config_record(config)
    self._period = config.checkpoint_period
    self._failed = False
    _quiet_orbax_failures()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.max_num_checkpoints_to_keep,
        enable_async_checkpointing=config.async_checkpointing,
        cleanup_tmp_directories=True,
        create=True,
    )
    try:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=options,
          item_names=(STATE_ITEM, DATA_ITEM, RECORD_ITEM),
          # One directory per array (no OCDBT database): inference reads the parameters without the optimizer state.
          item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(use_ocdbt=False)},
      )
    except OSError as e:
      raise CheckpointWriteError(f"cannot create the checkpoint directory '{self.directory}': {e}") from None

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _check_structure(self, step: int, record: dict | None, abstract_state: Any) -> None:
    """A step of another model or optimizer is the user's mistake, not damage: say so, and touch nothing."""
    where = self._step_dir(step)
    if record is None:
      return
    for key, value in self._model["model"].items():
      if key in record["model"] and record["model"][key] != value:
        raise CheckpointFormatError(f"cannot resume from '{where}': a checkpoint of another model ('{key}' is"
                                    f" {record['model'][key]!r} there, {value!r} here)")
    stored = record.get("arrays")
    if not stored:
      return
    expected = {name: list(leaf.shape) for name, leaf in _flat_state(abstract_state).items()}
    for name in sorted(set(expected) | set(stored)):
      if name not in stored or name not in expected or stored[name]["shape"] != expected[name]:
        raise CheckpointFormatError(f"cannot resume from '{where}': a checkpoint of another model or optimizer"
                                    f" (state entry '{name}' differs)")

  def restore(self, step: int, abstract_state: Any, iterator: Any) -> Any:
    """The state saved at `step`, laid out like `abstract_state`, checked against the step's record; `iterator` is
    moved to where it was. CheckpointDamagedError when the step cannot be read back as written."""
    where = self._step_dir(step)
    try:
      record = model_record.read_record(where)
    except CheckpointFormatError as e:
      raise CheckpointDamagedError(str(e)) from None
    self._check_structure(step, record, abstract_state)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              **{STATE_ITEM: ocp.args.StandardRestore(abstract_state), DATA_ITEM: DataIteratorRestore(iterator)}
          ),
      )
    except CheckpointFormatError:
      raise
    except Exception as e:  # orbax raises many types for missing or unreadable files
      if record is None:  # no record to tell damage from a mismatch
        raise CheckpointFormatError(f"cannot resume from '{where}' (a checkpoint of another model or optimizer, or"
                                    f" damaged): {type(e).__name__}: {one_line(e)}") from None
      raise CheckpointDamagedError(f"'{where}' is damaged: {type(e).__name__}: {one_line(e)}") from None
    state = restored[STATE_ITEM]
    if record is not None and record.get("arrays"):
      sums = fingerprint.device_fingerprints(_flat_state(state))
      bad = sorted(name for name, pair in sums.items() if list(pair) != record["arrays"][name]["fingerprint"])
      if bad:
        raise CheckpointDamagedError(f"'{where}' is damaged: '{bad[0]}' does not match its checksum"
                                     f" ({len(bad)} array(s) in all)")
    return state

  def restore_latest(self, abstract_state: Any, iterator: Any) -> tuple[Any, int] | None:
    """(state, step) of the newest readable step, or None when there is none. Damaged steps are reported and moved
    aside (renamed `<step>.damaged-<time>`, which orbax ignores), so the run continues from the one before."""
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      try:
        return self.restore(step, abstract_state, iterator), step
      except CheckpointDamagedError as e:
        aside = f"{self._step_dir(step)}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:  # every process found the damage; one moves the step
          os.rename(self._step_dir(step), aside)
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices(f"maxtext: step {step} moved aside")
        self._manager.reload()
        _logger.warning("checkpoint step %d is damaged (%s); moved it to '%s' and trying the step before", step, e,
                        aside)
    if steps:
      raise CheckpointFormatError(f"every checkpoint step in '{self.directory}' is damaged (moved aside as"
                                  " '<step>.damaged-*'); run again to start afresh")
    return None

  def _record_text(self, state: Any) -> str:
    flat = _flat_state(state)
    sums = fingerprint.device_fingerprints(flat)
    arrays = {name: model_record.array_entry(leaf.shape, leaf.dtype, sums[name]) for name, leaf in flat.items()}
    return model_record.record_json(self._model["model"], self._model["scan_layers"], arrays)

  def maybe_save(self, step: int, state: Any, iterator: Any, force: bool = False) -> bool:
    """Save if `step` is due (or `force`); the write continues in the background when async."""
    if not (force or step % self._period == 0):
      return False
    items = {
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: DataIteratorSave(iterator),
        RECORD_ITEM: ModelRecordSave(self._record_text(state)),
    }
    try:
      # force: the period is decided above; orbax would also save the first step of every run
      return self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # a background write of an earlier step may surface here too
      self._failed = True
      raise CheckpointWriteError(f"saving checkpoint step {step} under '{self.directory}' failed:"
                                 f" {type(e).__name__}: {one_line(e)}") from None

  def wait(self) -> None:
    """Block until background saves are on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._failed = True
      raise CheckpointWriteError(f"saving a checkpoint under '{self.directory}' failed: {type(e).__name__}:"
                                 f" {one_line(e)}") from None

  def close(self) -> None:
    if self._failed:  # the failure is already being reported; the manager's threads hold nothing worth waiting for
      return
    try:
      self.wait()
    finally:
      self._manager.close()
