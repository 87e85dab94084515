"""The one table from our parameter paths to HF checkpoint names, with the layout rule between them.

Our paths are those of the unscanned model ('decoder/layers_{i}/...'); scan_layout.py maps them to the scanned
form. HF names are the hub's (what `save_pretrained` writes: one tensor per expert). Import, export and the
golden-logit tools all walk this table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import numpy as np

from maxtext.layers.decoder_layer import FULL_ATTENTION, LINEAR_ATTENTION
from maxtext.models.spec import ModelSpec

IDENTITY = "identity"  # same array
LINEAR = "linear"  # torch Linear [out, in] <-> our kernel [*in_dims, *out_dims]
CONV = "conv"  # torch depthwise Conv1d [C, 1, K] <-> our [K, C]


@dataclasses.dataclass(frozen=True)
class ParamMapping:
  ours: str  # our parameter path, '/'-separated
  hf: tuple[str, ...]  # HF tensor name; one per expert when our array stacks experts on axis 0
  rule: str
  in_dims: int = 1  # LINEAR: how many leading dims of our kernel are input dims

  @property
  def stacks_experts(self) -> bool:
    return len(self.hf) > 1 or "experts." in self.hf[0]


_GDN = (
    ("linear_attn/in_proj_qkvz/kernel", "linear_attn.in_proj_qkvz.weight", LINEAR, 1),
    ("linear_attn/in_proj_ba/kernel", "linear_attn.in_proj_ba.weight", LINEAR, 1),
    ("linear_attn/conv1d/kernel", "linear_attn.conv1d.weight", CONV, 1),
    ("linear_attn/A_log", "linear_attn.A_log", IDENTITY, 1),
    ("linear_attn/dt_bias", "linear_attn.dt_bias", IDENTITY, 1),
    ("linear_attn/norm/scale", "linear_attn.norm.weight", IDENTITY, 1),
    ("linear_attn/out_proj/kernel", "linear_attn.out_proj.weight", LINEAR, 2),
)
_ATTENTION = (
    ("self_attn/q_proj/kernel", "self_attn.q_proj.weight", LINEAR, 1),
    ("self_attn/k_proj/kernel", "self_attn.k_proj.weight", LINEAR, 1),
    ("self_attn/v_proj/kernel", "self_attn.v_proj.weight", LINEAR, 1),
    ("self_attn/o_proj/kernel", "self_attn.o_proj.weight", LINEAR, 2),
    ("self_attn/q_norm/scale", "self_attn.q_norm.weight", IDENTITY, 1),
    ("self_attn/k_norm/scale", "self_attn.k_norm.weight", IDENTITY, 1),
)
_COMMON = (
    ("input_layernorm/scale", "input_layernorm.weight", IDENTITY, 1),
    ("post_attention_layernorm/scale", "post_attention_layernorm.weight", IDENTITY, 1),
    ("mlp/gate/kernel", "mlp.gate.weight", LINEAR, 1),
    ("mlp/shared_expert/gate_proj/kernel", "mlp.shared_expert.gate_proj.weight", LINEAR, 1),
    ("mlp/shared_expert/up_proj/kernel", "mlp.shared_expert.up_proj.weight", LINEAR, 1),
    ("mlp/shared_expert/down_proj/kernel", "mlp.shared_expert.down_proj.weight", LINEAR, 1),
    ("mlp/shared_expert_gate/kernel", "mlp.shared_expert_gate.weight", LINEAR, 1),
)
_EXPERTS = (
    ("mlp/experts/gate_proj", "mlp.experts.{e}.gate_proj.weight"),
    ("mlp/experts/up_proj", "mlp.experts.{e}.up_proj.weight"),
    ("mlp/experts/down_proj", "mlp.experts.{e}.down_proj.weight"),
)


def _layer_mappings(ours_prefix: str, hf_prefix: str, layer_type: str, num_experts: int) -> list[ParamMapping]:
  mixer = _GDN if layer_type == LINEAR_ATTENTION else _ATTENTION
  out = [ParamMapping(f"{ours_prefix}/{o}", (f"{hf_prefix}.{h}",), r, d) for o, h, r, d in mixer + _COMMON]
  for ours, hf in _EXPERTS:
    names = tuple(f"{hf_prefix}.{hf.format(e=e)}" for e in range(num_experts))
    out.append(ParamMapping(f"{ours_prefix}/{ours}", names, LINEAR))
  return out


def parameter_mappings(spec: ModelSpec, include_mtp: bool = True) -> list[ParamMapping]:
  """Every parameter of the (unscanned) model with its HF name(s), in checkpoint order."""
  experts = spec.moe.num_experts
  table = [ParamMapping("token_embedder/embedding", ("model.embed_tokens.weight",), IDENTITY)]
  for i, layer_type in enumerate(spec.layer_types):
    table += _layer_mappings(f"decoder/layers_{i}", f"model.layers.{i}", layer_type, experts)
  table.append(ParamMapping("norm/scale", ("model.norm.weight",), IDENTITY))
  if not spec.tie_embeddings:
    table.append(ParamMapping("lm_head/kernel", ("lm_head.weight",), LINEAR))
  if include_mtp and spec.mtp_num_layers:
    table += [
        ParamMapping("mtp/fc/kernel", ("mtp.fc.weight",), LINEAR),
        ParamMapping("mtp/pre_fc_norm_embedding/scale", ("mtp.pre_fc_norm_embedding.weight",), IDENTITY),
        ParamMapping("mtp/pre_fc_norm_hidden/scale", ("mtp.pre_fc_norm_hidden.weight",), IDENTITY),
        ParamMapping("mtp/norm/scale", ("mtp.norm.weight",), IDENTITY),
    ]
    for step in range(spec.mtp_num_layers):
      table += _layer_mappings(f"mtp/layers_{step}", f"mtp.layers.{step}", FULL_ATTENTION, experts)
  return table


def hf_shape(mapping: ParamMapping, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of one HF tensor of `mapping` given our array's shape."""
  shape = ours_shape[1:] if mapping.stacks_experts else ours_shape
  if mapping.rule == IDENTITY:
    return tuple(shape)
  if mapping.rule == CONV:
    return (shape[1], 1, shape[0])
  return (math.prod(shape[mapping.in_dims :]), math.prod(shape[: mapping.in_dims]))


def to_ours(mapping: ParamMapping, tensors: list[np.ndarray], ours_shape: tuple[int, ...]) -> np.ndarray:
  """HF tensor(s) of `mapping` -> our array of `ours_shape`. Shapes must already be checked."""
  shape = ours_shape[1:] if mapping.stacks_experts else ours_shape
  convert: Callable[[np.ndarray], np.ndarray]
  if mapping.rule == IDENTITY:
    convert = lambda t: t
  elif mapping.rule == CONV:
    convert = lambda t: t[:, 0, :].T
  else:
    convert = lambda t: t.T.reshape(shape)
  arrays = [np.ascontiguousarray(convert(t)) for t in tensors]
  return np.stack(arrays) if mapping.stacks_experts else arrays[0]


def to_hf(mapping: ParamMapping, array: np.ndarray) -> dict[str, np.ndarray]:
  """Our array -> {HF name: tensor} for `mapping`."""
  parts = list(array) if mapping.stacks_experts else [array]
  shape = hf_shape(mapping, array.shape)
  out = {}
  for name, part in zip(mapping.hf, parts):
    if mapping.rule == IDENTITY:
      tensor = part
    elif mapping.rule == CONV:
      tensor = part.T[:, None, :]
    else:
      tensor = part.reshape(shape[::-1]).T
    out[name] = np.ascontiguousarray(tensor)
  return out


def params_from_hf(
    spec: ModelSpec, hf_tensors: Mapping[str, np.ndarray], ours_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
  """All our (unscanned, flat '/'-path) arrays from an in-memory HF state dict in hub layout.

  Raises KeyError/ValueError naming the first missing, unexpected or mis-shaped tensor.
  """
  include_mtp = any(name.startswith("mtp.") for name in hf_tensors)
  table = parameter_mappings(spec, include_mtp=include_mtp)
  expected = {name for m in table for name in m.hf}
  missing = [name for m in table for name in m.hf if name not in hf_tensors]
  if missing:
    raise KeyError(f"checkpoint is missing tensor '{missing[0]}' ({len(missing)} missing in all)")
  extra = sorted(set(hf_tensors) - expected)
  if extra:
    raise ValueError(f"checkpoint has unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
  out = {}
  for m in table:
    shape = tuple(ours_shapes[m.ours])
    want = hf_shape(m, shape)
    for name in m.hf:
      got = tuple(hf_tensors[name].shape)
      if got != want:
        raise ValueError(f"tensor '{name}' has shape {got}, expected {want}")
    out[m.ours] = to_ours(m, [np.asarray(hf_tensors[n]) for n in m.hf], shape)
  return out
