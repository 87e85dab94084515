"""The one pure map between the unscanned ('decoder/layers_{i}') and scanned ('decoder/blocks/layer_{j}',
stacked over blocks on axis 0) parameter layouts. With blocks of `block_length` layers (ModelSpec.block_length, the
repeating unit of the layer pattern), layer i sits at block i // block_length, position i % block_length."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from maxtext.models.qwen3_next import SCANNED_BLOCKS, block_layer_name, unscanned_layer_name


def scan_layers(params: Mapping[str, Any], num_layers: int, block_length: int, stack=np.stack) -> dict[str, Any]:
  """Unscanned params (nested dict with 'decoder') -> scanned params. Other top-level entries pass through."""
  decoder = params["decoder"]
  num_blocks = num_layers // block_length
  blocks = {}
  for position in range(block_length):
    layers = [decoder[unscanned_layer_name(b * block_length + position)] for b in range(num_blocks)]
    blocks[block_layer_name(position)] = _tree_stack(layers, stack)
  return {**params, "decoder": {SCANNED_BLOCKS: blocks}}


def unscan_layers(params: Mapping[str, Any], num_layers: int, block_length: int) -> dict[str, Any]:
  """Scanned params -> unscanned params; the inverse of scan_layers."""
  blocks = params["decoder"][SCANNED_BLOCKS]
  decoder = {}
  for index in range(num_layers):
    block, position = divmod(index, block_length)
    decoder[unscanned_layer_name(index)] = _tree_index(blocks[block_layer_name(position)], block)
  return {**params, "decoder": decoder}


def _tree_stack(trees: list[Any], stack) -> Any:
  if isinstance(trees[0], Mapping):
    return {key: _tree_stack([t[key] for t in trees], stack) for key in trees[0]}
  return stack(trees)


def _tree_index(tree: Any, index: int) -> Any:
  if isinstance(tree, Mapping):
    return {key: _tree_index(value, index) for key, value in tree.items()}
  return tree[index]


def scanned_slot(path: str, block_length: int) -> tuple[str, int | None]:
  """Where the unscanned parameter `path` lives in the scanned layout: (path, index along axis 0) for a decoder
  layer's parameter, (path, None) for everything else."""
  parts = path.split("/")
  prefix = unscanned_layer_name(0).rsplit("_", 1)[0] + "_"
  if len(parts) > 2 and parts[0] == "decoder" and parts[1].startswith(prefix):
    block, position = divmod(int(parts[1][len(prefix) :]), block_length)
    return "/".join(["decoder", SCANNED_BLOCKS, block_layer_name(position), *parts[2:]]), block
  return path, None
