"""Reading and writing HF safetensors checkpoints one tensor at a time.

The format is small enough to handle directly (an 8-byte header size, a JSON header of name -> dtype, shape, byte
range, then the raw bytes), which lets us read bfloat16 into numpy through ml_dtypes, hold only the tensor being
converted in memory, and name the file at fault when a shard is truncated or corrupt.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER_BYTES = 100 << 20


class CheckpointFormatError(ValueError):
  """A checkpoint file or directory that cannot be read as HF safetensors; the message names the file."""


def _read_header(path: str) -> tuple[dict, int]:
  """(header without __metadata__, byte offset where tensor data starts)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointFormatError(f"'{path}' is not a safetensors file (shorter than its 8-byte header size)")
    (header_size,) = struct.unpack("<Q", raw)
    if header_size > min(_MAX_HEADER_BYTES, size - 8):
      raise CheckpointFormatError(f"'{path}' is truncated or not a safetensors file (bad header size)")
    try:
      header = json.loads(f.read(header_size))
    except (UnicodeDecodeError, json.JSONDecodeError):
      raise CheckpointFormatError(f"'{path}' has a corrupt safetensors header") from None
  header.pop("__metadata__", None)
  data_start = 8 + header_size
  for name, entry in header.items():
    end = entry["data_offsets"][1]
    if data_start + end > size:
      raise CheckpointFormatError(
          f"'{path}' is truncated: tensor '{name}' ends at byte {data_start + end} but the file has {size} bytes"
      )
    if entry["dtype"] not in _DTYPES:
      raise CheckpointFormatError(f"'{path}': tensor '{name}' has unsupported dtype {entry['dtype']}")
  return header, data_start


class SafetensorsCheckpoint:
  """A directory of HF safetensors shards (index json or one model.safetensors), read tensor by tensor."""

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise CheckpointFormatError(f"HF checkpoint directory '{directory}' does not exist")
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
      try:
        with open(index_path, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointFormatError(f"'{index_path}' is not a valid safetensors index (no weight_map)") from None
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise CheckpointFormatError(f"'{directory}' has neither {INDEX_FILE} nor {SINGLE_FILE}")
    self._entries: dict[str, tuple[str, dict, int]] = {}
    for file in files:
      path = os.path.join(directory, file)
      if not os.path.isfile(path):
        raise CheckpointFormatError(f"shard '{path}' named in {INDEX_FILE} does not exist")
      header, data_start = _read_header(path)
      for name, entry in header.items():
        self._entries[name] = (path, entry, data_start)

  def names(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name][1]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _DTYPES[self._entries[name][1]["dtype"]]

  def read(self, name: str) -> np.ndarray:
    """The tensor `name` as a fresh numpy array (only its bytes are read)."""
    path, entry, data_start = self._entries[name]
    begin, end = entry["data_offsets"]
    dtype = _DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    if (end - begin) != int(np.prod(shape)) * dtype.itemsize:
      raise CheckpointFormatError(f"'{path}': tensor '{name}' has {end - begin} bytes, not {shape} x {dtype}")
    out = np.empty(shape, dtype)
    with open(path, "rb") as f:
      f.seek(data_start + begin)
      if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
        raise CheckpointFormatError(f"'{path}' is truncated inside tensor '{name}'")
    return out


class ShardedSafetensorsWriter:
  """Writes tensors into shards of about `shard_bytes` and an index, holding one shard's tensors at a time."""

  def __init__(self, directory: str, shard_bytes: int = 5 << 30):
    self.directory = directory
    self.shard_bytes = shard_bytes
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[list[str]] = []
    os.makedirs(directory, exist_ok=True)

  def add(self, name: str, tensor: np.ndarray) -> None:
    if self._pending and self._pending_bytes + tensor.nbytes > self.shard_bytes:
      self._flush()
    self._pending[name] = np.ascontiguousarray(tensor)
    self._pending_bytes += tensor.nbytes

  def add_all(self, tensors: Mapping[str, np.ndarray]) -> None:
    for name, tensor in tensors.items():
      self.add(name, tensor)

  def _flush(self) -> None:
    index = len(self._shards)
    write_safetensors(os.path.join(self.directory, f".shard-{index:05d}.tmp"), self._pending)
    self._shards.append(list(self._pending))
    self._pending, self._pending_bytes = {}, 0

  def close(self) -> list[str]:
    """Finish the last shard, name the shards 'model-0000i-of-0000n.safetensors', write the index."""
    if self._pending or not self._shards:
      self._flush()
    total = len(self._shards)
    weight_map, files = {}, []
    for index, names in enumerate(self._shards):
      file = SINGLE_FILE if total == 1 else f"model-{index + 1:05d}-of-{total:05d}.safetensors"
      os.replace(os.path.join(self.directory, f".shard-{index:05d}.tmp"), os.path.join(self.directory, file))
      weight_map.update({name: file for name in names})
      files.append(file)
    if total > 1:
      index_path = os.path.join(self.directory, INDEX_FILE)
      with open(index_path, "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return files


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """One safetensors file holding `tensors` in the given order."""
  header, offset = {}, 0
  for name, tensor in tensors.items():
    if tensor.dtype not in _NAMES:
      raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store")
    header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
    offset += tensor.nbytes
  encoded = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
  encoded += b" " * ((-len(encoded)) % 8)  # keeps the tensor data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for tensor in tensors.values():
      f.write(memoryview(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)))
