"""Read the parameters of a checkpoint step, and nothing else, with tensorstore.

Inference tools (decode, the server, the logit checker, export, RL's reference policy) need the parameters only:
reading through orbax would open every array of a training checkpoint, optimizer state included, so damage there
would block them and they would read several times the bytes they use. This reader opens the `params` arrays one
at a time, checks each against the step's model record (shape, dtype, fingerprint) and reports any failure as one
line naming the file and what is wrong.

Layouts read: one zarr3 array per directory (`items/params.<path>/`, what our writers produce) and orbax's OCDBT
layout (`items/manifest.ocdbt`, older training checkpoints).
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorstore as ts

from maxtext.checkpoint_conversion import fingerprint
from maxtext.checkpoint_conversion.safetensors_io import CheckpointFormatError

PARAMS = "params"
_OCDBT_MANIFEST = "manifest.ocdbt"
_ORBAX_METADATA = "_METADATA"


def one_line(error: BaseException) -> str:
  """An exception's message on one line, without tensorstore's spec dump."""
  return " ".join(str(error).split("[tensorstore_spec=")[0].split())[:300]


def stored_array_paths(items: str, record: Mapping[str, Any] | None) -> tuple[list[str], bool]:
  """('/'-paths of the parameter arrays, whether they sit under a `params` key): from the model record, else from
  orbax's tree metadata."""
  if record and record.get("arrays"):
    return sorted(p.removeprefix(PARAMS + "/") for p in record["arrays"] if p.startswith(PARAMS + "/")), True
  file = os.path.join(items, _ORBAX_METADATA)
  try:
    with open(file, encoding="utf-8") as f:
      tree = json.load(f)["tree_metadata"]
    keys = [tuple(ast.literal_eval(k)) for k in tree]
  except FileNotFoundError:
    raise CheckpointFormatError(f"'{items}' is not an orbax checkpoint: '{_ORBAX_METADATA}' is missing") from None
  except (OSError, ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError):
    raise CheckpointFormatError(f"'{file}' is damaged (not orbax tree metadata)") from None
  if any(key[:1] == (PARAMS,) for key in keys):
    return sorted("/".join(map(str, key[1:])) for key in keys if key[:1] == (PARAMS,)), True
  return sorted("/".join(map(str, key)) for key in keys), False  # a bare parameter tree


class ParamReader:
  """Opens the parameter arrays of one `items` directory; `read(path)` returns a checked numpy array."""

  def __init__(self, items: str, record: Mapping[str, Any] | None):
    self.items = items
    self._entries = (record or {}).get("arrays", {})
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    self._ocdbt = os.path.exists(os.path.join(items, _OCDBT_MANIFEST))
    if not self._ocdbt and any(name.startswith("ocdbt.process_") for name in os.listdir(items)):
      raise CheckpointFormatError(f"'{os.path.join(items, _OCDBT_MANIFEST)}' is missing: the checkpoint is damaged")
    self.paths, self._prefixed = stored_array_paths(items, record)
    if not self.paths:
      raise CheckpointFormatError(f"'{items}' holds no parameters")

  def _name(self, path: str) -> str:
    """orbax's name of an array: its tree keys joined by dots."""
    return ".".join(([PARAMS] if self._prefixed else []) + path.split("/"))

  def _where(self, path: str) -> str:
    return os.path.join(self.items, self._name(path))

  def _open(self, path: str):
    name = self._name(path)
    if self._ocdbt:
      kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": self.items + "/"}, "path": name + "/"}
      drivers = ("zarr3", "zarr")
    else:
      directory = os.path.join(self.items, name)
      if not os.path.isdir(directory):
        raise CheckpointFormatError(f"'{directory}' is missing: the checkpoint lacks parameter '{path}'")
      kvstore = {"driver": "file", "path": directory + "/"}
      drivers = ("zarr3",) if os.path.exists(os.path.join(directory, "zarr.json")) else ("zarr",)
    error: BaseException | None = None
    for driver in drivers:
      try:
        return ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True, context=self._context).result()
      except ValueError as e:
        error = error or e
    raise CheckpointFormatError(f"cannot open '{self._where(path)}' (missing or damaged metadata): {one_line(error)}")

  def read(self, path: str) -> np.ndarray:
    store = self._open(path)
    entry = self._entries.get(f"{PARAMS}/{path}")
    where = self._where(path)
    if entry is not None:
      if list(store.shape) != list(entry["shape"]):
        raise CheckpointFormatError(f"'{where}' has shape {tuple(store.shape)} but the model record says "
                                    f"{tuple(entry['shape'])}: the checkpoint is damaged")
      if store.dtype.numpy_dtype.name != entry["dtype"]:
        raise CheckpointFormatError(f"'{where}' has dtype {store.dtype.numpy_dtype.name} but the model record says "
                                    f"{entry['dtype']}: the checkpoint is damaged")
    try:
      array = np.asarray(store.read().result())
    except ValueError as e:
      raise CheckpointFormatError(f"cannot read '{where}' (truncated or corrupt file?): {one_line(e)}") from None
    if entry is not None and list(fingerprint.host_fingerprint(array)) != list(entry["fingerprint"]):
      raise CheckpointFormatError(f"'{where}' does not match its checksum in the model record: the file is corrupt")
    return array

  def read_all(self) -> Iterator[tuple[str, np.ndarray]]:
    for path in self.paths:
      yield path, self.read(path)
