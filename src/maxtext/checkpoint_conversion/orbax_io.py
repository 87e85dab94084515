"""Orbax checkpoints of our parameters: a streaming writer, the stored model config, and restoring.

Layout (MaxText's): `<step_dir>/items` is an orbax PyTree checkpoint of {'params': ...}; `<step_dir>/maxtext_model.json`
holds the model keys and the layer layout, so tools given `load_parameters_path=<step_dir>/items` need no model_name.

The writer never holds a whole model: orbax lays out the tree (its metadata files) from rank-matching placeholders,
then every array is written with tensorstore into orbax's zarr3 layout, one slab at a time (a layer of a stacked,
scanned array). The step directory is built under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from maxtext.checkpoint_conversion import fingerprint, model_record
from maxtext.checkpoint_conversion.param_reader import ParamReader
from maxtext.checkpoint_conversion.safetensors_io import CheckpointFormatError
from maxtext.configs.types import MODEL_KEYS, Config

ITEMS = model_record.ITEMS
MODEL_CONFIG_FILE = model_record.MODEL_CONFIG_FILE
step_dir_of = model_record.step_dir_of
items_dir = model_record.items_dir


def _handler() -> ocp.PyTreeCheckpointHandler:
  return ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)


class StreamingCheckpointWriter:
  """Create with every leaf's final (shape, dtype, stacked); `write` whole arrays or slabs; then `publish`."""

  def __init__(self, step_dir: str, leaves: Mapping[str, tuple[tuple[int, ...], np.dtype, bool]]):
    """`leaves`: '/'-path under 'params' -> (shape, dtype, stacked); a stacked leaf is written one slab (index along
    axis 0) at a time and stored in chunks of one slab. Fails early if `step_dir` exists or is unwritable."""
    self.step_dir = os.path.abspath(step_dir)
    if os.path.exists(self.step_dir):
      raise FileExistsError(f"output '{self.step_dir}' already exists; remove it or choose another base_output_directory")
    parent = os.path.dirname(self.step_dir)
    try:
      os.makedirs(parent, exist_ok=True)
    except OSError as e:
      raise PermissionError(f"cannot create output directory '{parent}': {e.strerror}") from None
    if not os.access(parent, os.W_OK):
      raise PermissionError(f"output directory '{parent}' is not writable")
    self.staging = os.path.join(parent, f".{os.path.basename(self.step_dir)}.partial-{os.getpid()}")
    shutil.rmtree(self.staging, ignore_errors=True)
    os.makedirs(self.staging)
    self._items = os.path.join(self.staging, ITEMS)
    self._leaves = dict(leaves)
    self._stores: dict[str, Any] = {}
    self._fingerprints: dict[str, fingerprint.Fingerprint] = {}
    self._written: dict[str, set[int | None]] = {path: set() for path in self._leaves}
    # One context (thread pools) for all arrays; no fsync per chunk, since the directory only becomes visible
    # (renamed into place) after every write has finished.
    self._context = ts.Context({"file_io_sync": False})
    placeholders = {path: jnp.zeros((1,) * len(shape), dtype) for path, (shape, dtype, _) in self._leaves.items()}
    tree = {"params": _unflatten(placeholders)}
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax narrates its (placeholder) save at WARNING level
    try:
      ocp.Checkpointer(_handler()).save(self._items, args=ocp.args.PyTreeSave(tree))
    finally:
      absl_logger.setLevel(level)
    for path in self._leaves:
      self._stores[path] = self._create_array(path)
    self._fix_write_shapes()

  def _array_dir(self, path: str) -> str:
    return os.path.join(self._items, "params." + path.replace("/", "."))

  def _chunk_shape(self, path: str) -> list[int]:
    shape, _, stacked = self._leaves[path]
    return [1, *shape[1:]] if stacked else list(shape)

  def _create_array(self, path: str):
    """Re-create orbax's placeholder zarr3 array at full shape; a stacked array's chunks hold one slab."""
    directory = self._array_dir(path)
    with open(os.path.join(directory, "zarr.json"), encoding="utf-8") as f:
      placeholder = json.load(f)
    shape, chunk = self._leaves[path][0], self._chunk_shape(path)
    codecs = placeholder["codecs"]
    codecs[0]["configuration"]["chunk_shape"] = chunk
    metadata = {
        "shape": list(shape),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
        "data_type": placeholder["data_type"],
        "codecs": codecs,
        "fill_value": placeholder["fill_value"],
    }
    # Orbax reads every chunk, so all-zero chunks (zero-centred norms) must be stored too.
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": directory},
        "metadata": metadata,
        "store_data_equal_to_fill_value": True,
    }
    return ts.open(spec, create=True, delete_existing=True, context=self._context).result()

  def _fix_write_shapes(self) -> None:
    """Orbax records the placeholder's write shape; make its metadata describe the real chunks."""
    meta_path = os.path.join(self._items, "_METADATA")
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    for key, entry in meta["tree_metadata"].items():
      path = "/".join(k["key"] for k in entry["key_metadata"][1:])
      entry["value_metadata"]["write_shape"] = self._chunk_shape(path)
    with open(meta_path, "w", encoding="utf-8") as f:
      json.dump(meta, f)
    array_meta_dir = os.path.join(self._items, "array_metadatas")
    for name in os.listdir(array_meta_dir) if os.path.isdir(array_meta_dir) else ():
      file = os.path.join(array_meta_dir, name)
      with open(file, encoding="utf-8") as f:
        arrays = json.load(f)
      for item in arrays["array_metadatas"]:
        path = item["array_metadata"]["param_name"].removeprefix("params.").replace(".", "/")
        chunk = self._chunk_shape(path)
        item["array_metadata"]["write_shape"] = chunk
        item["array_metadata"]["chunk_shape"] = chunk
      with open(file, "w", encoding="utf-8") as f:
        json.dump(arrays, f)

  def write(self, path: str, array: np.ndarray, index: int | None = None) -> None:
    """Write the whole leaf `path`, or its slab `index` along axis 0."""
    shape, dtype, _ = self._leaves[path]
    want = shape if index is None else shape[1:]
    if tuple(array.shape) != tuple(want):
      raise ValueError(f"parameter '{path}' slab has shape {tuple(array.shape)}, expected {tuple(want)}")
    store = self._stores[path] if index is None else self._stores[path][index]
    array = np.asarray(array, dtype)
    store.write(array).result()
    if index not in self._written[path]:
      self._written[path].add(index)
      self._fingerprints[path] = fingerprint.add(self._fingerprints.get(path, (0, 0)), fingerprint.host_fingerprint(array))

  def publish(self, model_config: Mapping[str, Any]) -> str:
    """Write the model record (model keys, layout, every array's checksum) beside the items and move the finished
    step directory into place: the step becomes visible complete, or not at all."""
    arrays = {}
    for path, (shape, dtype, stacked) in self._leaves.items():
      expected = set(range(shape[0])) if stacked and self._written[path] != {None} else {None}
      if self._written[path] != expected:
        raise ValueError(f"parameter '{path}' was not written completely; the step is not published")
      arrays[f"params/{path}"] = model_record.array_entry(shape, dtype, self._fingerprints[path])
    model_record.write_record(self.staging, model_record.record_json(
        model_config["model"], model_config["scan_layers"], arrays))
    os.rename(self.staging, self.step_dir)
    return os.path.join(self.step_dir, ITEMS)

  def abort(self) -> None:
    shutil.rmtree(self.staging, ignore_errors=True)


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def model_config_record(config: Config) -> dict[str, Any]:
  """What a checkpoint stores about its model: the architecture keys and the layer layout."""
  return {"model": {key: getattr(config, key) for key in MODEL_KEYS}, "scan_layers": config.scan_layers}


def read_model_config(load_parameters_path: str) -> dict[str, Any] | None:
  """The stored model record of a checkpoint, or None when it has none (e.g. not written by us)."""
  return model_record.read_record(load_parameters_path)


def restore_flat(load_parameters_path: str) -> dict[str, np.ndarray]:
  """'/'-path -> numpy array of every stored parameter (never optimizer state), in the stored layout and dtype,
  each checked against the step's model record."""
  reader = ParamReader(items_dir(load_parameters_path), read_model_config(load_parameters_path))
  return dict(reader.read_all())


def load_params(load_parameters_path: str, spec, cast: bool = True) -> dict[str, Any]:
  """Parameters for `spec` (a ModelSpec): checked against the model's shapes, converted to its layer layout
  (a scanned checkpoint loads unscanned and vice versa) and, with `cast`, to its weight dtype. Numpy arrays."""
  from maxtext.checkpoint_conversion.scan_layout import scan_layers, unscan_layers  # noqa: PLC0415
  from maxtext.models import params as model_params  # noqa: PLC0415

  record = read_model_config(load_parameters_path)
  flat = restore_flat(load_parameters_path)
  stored_scanned = record["scan_layers"] if record else any(p.startswith("decoder/blocks/") for p in flat)
  expected = model_params.flat_shapes(dataclasses.replace(spec, scan_layers=stored_scanned))
  where = items_dir(load_parameters_path)
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise CheckpointFormatError(f"checkpoint '{where}' lacks parameter '{missing[0]}' ({len(missing)} missing in all)")
  extra = sorted(set(flat) - set(expected))
  if extra:
    raise CheckpointFormatError(f"checkpoint '{where}' has unexpected parameter '{extra[0]}' ({len(extra)} in all)")
  for path, shape in expected.items():
    if tuple(flat[path].shape) != tuple(shape):
      raise CheckpointFormatError(
          f"checkpoint '{where}': parameter '{path}' has shape {flat[path].shape}, expected {shape}")
  if cast:
    dtype = np.dtype(spec.numerics.weight_dtype)
    flat = {path: array.astype(dtype, copy=False) for path, array in flat.items()}
  tree = model_params.unflatten(flat)
  if stored_scanned and not spec.scan_layers:
    tree = unscan_layers(tree, spec.num_layers, spec.block_length)
  elif spec.scan_layers and not stored_scanned:
    tree = scan_layers(tree, spec.num_layers, spec.block_length)
  return tree
