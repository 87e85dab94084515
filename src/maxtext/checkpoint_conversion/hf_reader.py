"""The language model's tensors of an HF checkpoint directory, as the converter reads them.

Over SafetensorsCheckpoint it: skips a multimodal checkpoint's vision tower (`model.visual.*`); dequantises block
FP8 weights (`X.weight` in float8 with a per-block `X.weight_scale_inv`) to bfloat16; refuses other quantisation
formats in one line; and keeps the last tensor read, so the gate and up halves of a fused `experts.gate_up_proj`
cost one read.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

from maxtext.checkpoint_conversion.param_mapping import VISION_PREFIX
from maxtext.checkpoint_conversion.safetensors_io import CheckpointFormatError, SafetensorsCheckpoint

SCALE_SUFFIX = "_scale_inv"
_FLOAT8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
# Tensor name endings of quantisation formats we do not undo (GPTQ / AWQ, bitsandbytes, per-tensor scales).
_UNSUPPORTED_QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".absmax", ".quant_map", ".weight_scale",
                               ".input_scale", ".SCB")
DEFAULT_BLOCK = (128, 128)


def _block_size(directory: str) -> tuple[int, int]:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    return DEFAULT_BLOCK
  with open(path, encoding="utf-8") as f:
    hf = json.load(f)
  quant = hf.get("quantization_config") or (hf.get("text_config") or {}).get("quantization_config") or {}
  block = quant.get("weight_block_size") or DEFAULT_BLOCK
  return int(block[0]), int(block[1])


def dequantize_blocks(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """weight [..., R, C] (float8) times its per-block scale [..., ceil(R/b0), ceil(C/b1)] -> float32."""
  rows, cols = weight.shape[-2:]
  expanded = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=-2), block[1], axis=-1)
  return weight.astype(np.float32) * expanded[..., :rows, :cols]


class HfTensorReader:
  """The language-model tensors of `directory` (names without the vision tower and FP8 scales)."""

  def __init__(self, directory: str, log=print):
    self.checkpoint = SafetensorsCheckpoint(directory)
    all_names = self.checkpoint.names()
    vision = [n for n in all_names if n.startswith(VISION_PREFIX)]
    self._names = [n for n in all_names if not n.startswith(VISION_PREFIX) and not n.endswith(SCALE_SUFFIX)]
    if not self._names:
      raise CheckpointFormatError(f"'{directory}' holds no language-model tensors (only {len(vision)} vision-tower"
                                  " tensors model.visual.*): nothing to convert")
    if vision:
      log(f"note: skipping the vision tower ({len(vision)} model.visual.* tensors); only the text model converts")
    for name in self._names:
      if name.endswith(_UNSUPPORTED_QUANT_SUFFIXES):
        raise CheckpointFormatError(f"tensor '{name}' belongs to a quantisation format we cannot undo (only block FP8"
                                    " with weight_scale_inv is supported); convert an unquantised checkpoint")
    self._scaled = {n for n in self._names if n + SCALE_SUFFIX in self.checkpoint}
    for name in self._names:
      if self.checkpoint.dtype(name) in _FLOAT8 and name not in self._scaled:
        raise CheckpointFormatError(f"tensor '{name}' is float8 without '{name}{SCALE_SUFFIX}': only block FP8 with"
                                    " per-block scales is supported")
    self._block = _block_size(directory) if self._scaled else DEFAULT_BLOCK
    self._last: tuple[str, np.ndarray] | None = None

  def names(self) -> list[str]:
    return list(self._names)

  def __contains__(self, name: str) -> bool:
    return name in self._names

  def shape(self, name: str) -> tuple[int, ...]:
    return self.checkpoint.shape(name)

  def dtype(self, name: str) -> np.dtype:
    """The dtype `read` returns: bfloat16 for dequantised FP8, else the stored one."""
    return np.dtype(ml_dtypes.bfloat16) if name in self._scaled else self.checkpoint.dtype(name)

  def read(self, name: str) -> np.ndarray:
    if self._last is not None and self._last[0] == name:
      return self._last[1]
    array = self.checkpoint.read(name)
    if name in self._scaled:
      scale = self.checkpoint.read(name + SCALE_SUFFIX)
      want = tuple(math.ceil(d / b) for d, b in zip(array.shape[-2:], self._block))
      if tuple(scale.shape[-2:]) != want or scale.shape[:-2] != array.shape[:-2]:
        raise CheckpointFormatError(f"tensor '{name}{SCALE_SUFFIX}' has shape {scale.shape}, expected"
                                    f" {(*array.shape[:-2], *want)} for {self._block} blocks of {array.shape}")
      array = dequantize_blocks(array, scale, self._block).astype(ml_dtypes.bfloat16)
    self._last = (name, array)
    return array
