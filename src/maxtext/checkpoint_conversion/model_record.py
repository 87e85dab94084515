"""The model record of a checkpoint step: `<step>/maxtext_model.json`.

It says which model the step holds (the architecture keys and the layer layout), so tools need no model_name, and
lists every stored array with its shape, dtype and fingerprint, so a reader can tell a damaged file from a good one.
Writers put it inside the step before the step becomes visible (a converted step is renamed into place, a training
step is written by orbax into its temporary directory), so a visible step always has one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from maxtext.checkpoint_conversion.safetensors_io import CheckpointFormatError

MODEL_CONFIG_FILE = "maxtext_model.json"
ITEMS = "items"
FORMAT_VERSION = 2  # 2 adds "arrays"; version 1 records (model and layout only) still load, without checksums


def array_entry(shape: tuple[int, ...], dtype: Any, fingerprint: tuple[int, int]) -> dict[str, Any]:
  return {"shape": [int(d) for d in shape], "dtype": np.dtype(dtype).name, "fingerprint": [int(x) for x in fingerprint]}


def record_json(model: Mapping[str, Any], scan_layers: bool, arrays: Mapping[str, Mapping[str, Any]]) -> str:
  """The record's text: `arrays` maps each stored array's '/'-path (under the items tree) to its `array_entry`."""
  record = {"format_version": FORMAT_VERSION, "model": dict(model), "scan_layers": scan_layers, "arrays": dict(arrays)}
  return json.dumps(record, indent=1, sort_keys=True)


def write_record(step_dir: str, text: str) -> None:
  """Write the record into a step directory that is not yet visible (or atomically into one that is)."""
  file = os.path.join(step_dir, MODEL_CONFIG_FILE)
  partial = file + ".partial"
  with open(partial, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(partial, file)


def step_dir_of(load_parameters_path: str) -> str:
  """`.../<step>/items` -> `.../<step>` (a path to the step directory itself is accepted too)."""
  path = os.path.abspath(load_parameters_path.rstrip("/"))
  return os.path.dirname(path) if os.path.basename(path) == ITEMS else path


def items_dir(load_parameters_path: str) -> str:
  """The `items` directory of the step at `load_parameters_path`; one line naming the path when there is none."""
  step_dir = step_dir_of(load_parameters_path)
  if not os.path.exists(step_dir):
    raise CheckpointFormatError(f"load_parameters_path '{load_parameters_path}' does not exist")
  items = os.path.join(step_dir, ITEMS)
  if not os.path.isdir(items):
    raise CheckpointFormatError(f"load_parameters_path '{load_parameters_path}' is not a checkpoint step (no"
                                f" '{ITEMS}' directory in '{step_dir}')")
  return items


def read_record(load_parameters_path: str) -> dict[str, Any] | None:
  """The model record of the step at `load_parameters_path`, or None when the step has none."""
  file = os.path.join(step_dir_of(load_parameters_path), MODEL_CONFIG_FILE)
  if not os.path.isfile(file):
    return None
  try:
    with open(file, encoding="utf-8") as f:
      record = json.load(f)
    record["model"], record["scan_layers"]  # noqa: B018 - both keys must exist
    if not isinstance(record["model"], dict) or not isinstance(record.get("arrays", {}), dict):
      raise TypeError
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
    raise CheckpointFormatError(f"'{file}' is not a valid model record (damaged?); re-convert or re-save the checkpoint"
                                ) from None
  return record
