"""An in-memory HF state dict (hub names) -> our parameter tree in the spec's layout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from maxtext.checkpoint_conversion.param_mapping import params_from_hf
from maxtext.checkpoint_conversion.scan_layout import scan_layers
from maxtext.models import params as model_params
from maxtext.models.spec import ModelSpec


def params_from_hf_state(spec: ModelSpec, hf_tensors: Mapping[str, np.ndarray], dtype=None) -> dict[str, Any]:
  """Nested params (scanned if spec.scan_layers), arrays cast to `dtype` (default: the spec's weight dtype)."""
  flat_layout = model_params.unscanned(spec)
  shapes = model_params.flat_shapes(flat_layout)
  if not spec.mtp_num_layers:
    hf_tensors = {k: v for k, v in hf_tensors.items() if not k.startswith("mtp.")}
  flat = params_from_hf(flat_layout, hf_tensors, shapes)
  missing = sorted(set(shapes) - set(flat))
  if missing:
    raise KeyError(f"checkpoint has no tensors for parameter '{missing[0]}' ({len(missing)} in all)")
  target = np.dtype(dtype or spec.numerics.weight_dtype)
  tree = model_params.unflatten({k: np.asarray(v).astype(target) for k, v in flat.items()})
  if spec.scan_layers:
    tree = scan_layers(tree, spec.num_layers, spec.block_length)
  return tree
