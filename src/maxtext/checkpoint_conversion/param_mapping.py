"""The one table from our parameter paths to HF checkpoint names, with the layout rule between them.

Our paths are those of the unscanned model ('decoder/layers_{i}/...'); scan_layout.py maps them to the scanned
form. HF names are the hub's (what `save_pretrained` writes: one tensor per expert), per family:

- qwen3_next: 'model.layers.{i}.*'; GDN projections grouped per key head (`in_proj_qkvz`, `in_proj_ba`), as ours.
- qwen3_5_moe: 'model.language_model.layers.{i}.*'; GDN projections split and flat (`in_proj_qkv` rows [all q | all
  k | all v], `in_proj_z`, `in_proj_b`, `in_proj_a`), a pure row permutation of our grouped layout.

Both put `lm_head.weight` and the MTP module (`mtp.*`) at top level. On import a layer's experts may also come
fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]): `resolve_expert_layout`
rewrites the table for the names a checkpoint holds. Import, export and the golden-logit tools walk this table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping

import numpy as np

from maxtext.layers.decoder_layer import FULL_ATTENTION, LINEAR_ATTENTION
from maxtext.models.spec import ModelSpec

IDENTITY = "identity"  # same array
LINEAR = "linear"  # torch Linear [out, in] <-> our kernel [*in_dims, *out_dims]
CONV = "conv"  # torch depthwise Conv1d [C, 1, K] <-> our [K, C]
EXPERTS = "experts"  # one torch Linear per expert <-> our kernel stacked over experts on axis 0
GDN_QKVZ = "gdn_qkvz"  # split (in_proj_qkv, in_proj_z) <-> our grouped in_proj_qkvz [E, Hk, 2dk + 2g dv]
GDN_BA = "gdn_ba"  # split (in_proj_b, in_proj_a) <-> our grouped in_proj_ba [E, Hk, 2g]
FUSED_GATE = "fused_gate"  # rows 0..I-1 of experts.gate_up_proj [E, 2I, H] <-> our gate_proj [E, H, I]
FUSED_UP = "fused_up"  # rows I..2I-1 of experts.gate_up_proj <-> our up_proj [E, H, I]
FUSED_DOWN = "fused_down"  # experts.down_proj [E, H, I] <-> our down_proj [E, I, H]
_FUSED = (FUSED_GATE, FUSED_UP, FUSED_DOWN)


@dataclasses.dataclass(frozen=True)
class ParamMapping:
  ours: str  # our parameter path, '/'-separated
  hf: tuple[str, ...]  # HF tensor names (one per expert for EXPERTS; the split pair for GDN_*)
  rule: str
  in_dims: int = 1  # LINEAR: how many leading dims of our kernel are input dims

  @property
  def stacks_experts(self) -> bool:
    return self.rule == EXPERTS


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where a family keeps the language model, and how it stores the GDN input projections."""

  prefix: str
  gdn_in_proj: tuple[tuple[str, tuple[str, ...], str], ...]


_GROUPED_GDN = (
    ("linear_attn/in_proj_qkvz/kernel", ("linear_attn.in_proj_qkvz.weight",), LINEAR),
    ("linear_attn/in_proj_ba/kernel", ("linear_attn.in_proj_ba.weight",), LINEAR),
)
_SPLIT_GDN = (
    ("linear_attn/in_proj_qkvz/kernel", ("linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight"), GDN_QKVZ),
    ("linear_attn/in_proj_ba/kernel", ("linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"), GDN_BA),
)
LAYOUTS = {
    "qwen3_next": _Layout("model.", _GROUPED_GDN),
    "qwen3_5_moe": _Layout("model.language_model.", _SPLIT_GDN),
}
# What a qwen3_5_moe checkpoint may hold beside the language model, skipped on import.
VISION_PREFIX = "model.visual."

_GDN = (
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
# (ours, per-expert HF name, fused HF name, fused rule)
_EXPERTS = (
    ("mlp/experts/gate_proj", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.gate_up_proj", FUSED_GATE),
    ("mlp/experts/up_proj", "mlp.experts.{e}.up_proj.weight", "mlp.experts.gate_up_proj", FUSED_UP),
    ("mlp/experts/down_proj", "mlp.experts.{e}.down_proj.weight", "mlp.experts.down_proj", FUSED_DOWN),
)


def _layer_mappings(ours_prefix: str, hf_prefix: str, layer_type: str, num_experts: int, layout: _Layout):
  out = []
  if layer_type == LINEAR_ATTENTION:
    out += [ParamMapping(f"{ours_prefix}/{o}", tuple(f"{hf_prefix}.{h}" for h in hs), r) for o, hs, r in
            layout.gdn_in_proj]
  mixer = _GDN if layer_type == LINEAR_ATTENTION else _ATTENTION
  out += [ParamMapping(f"{ours_prefix}/{o}", (f"{hf_prefix}.{h}",), r, d) for o, h, r, d in mixer + _COMMON]
  for ours, hf, _, _ in _EXPERTS:
    names = tuple(f"{hf_prefix}.{hf.format(e=e)}" for e in range(num_experts))
    out.append(ParamMapping(f"{ours_prefix}/{ours}", names, EXPERTS))
  return out


def parameter_mappings(spec: ModelSpec, include_mtp: bool = True) -> list[ParamMapping]:
  """Every parameter of the (unscanned) model with its HF name(s), in checkpoint order (experts per expert)."""
  layout = LAYOUTS[spec.family]
  experts = spec.moe.num_experts
  table = [ParamMapping("token_embedder/embedding", (f"{layout.prefix}embed_tokens.weight",), IDENTITY)]
  for i, layer_type in enumerate(spec.layer_types):
    table += _layer_mappings(f"decoder/layers_{i}", f"{layout.prefix}layers.{i}", layer_type, experts, layout)
  table.append(ParamMapping("norm/scale", (f"{layout.prefix}norm.weight",), IDENTITY))
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
      table += _layer_mappings(f"mtp/layers_{step}", f"mtp.layers.{step}", FULL_ATTENTION, experts, layout)
  return table


def resolve_expert_layout(table: list[ParamMapping], names: Collection[str]) -> list[ParamMapping]:
  """The table for a checkpoint holding `names`: each layer's experts read from the fused 3-D tensors where the
  checkpoint has those and not the per-expert ones (layers may differ, e.g. the MTP layer)."""
  fused_of = {ours.rsplit("/", 1)[-1]: (fused, rule) for ours, _, fused, rule in _EXPERTS}
  out = []
  for m in table:
    if m.rule == EXPERTS and m.hf[0] not in names:
      layer_prefix = m.hf[0].split(".mlp.experts.", 1)[0]
      fused, rule = fused_of[m.ours.rsplit("/", 1)[-1]]
      if f"{layer_prefix}.{fused}" in names:
        m = ParamMapping(m.ours, (f"{layer_prefix}.{fused}",), rule)
    out.append(m)
  return out


def hf_shapes(mapping: ParamMapping, ours_shape: tuple[int, ...], key_head_dim: int | None = None
              ) -> tuple[tuple[int, ...], ...]:
  """Shape of each HF tensor of `mapping` given our array's shape. GDN_QKVZ needs the GDN key_head_dim."""
  rule = mapping.rule
  if rule in (EXPERTS, *_FUSED):
    experts, rest = ours_shape[0], ours_shape[1:]
    out_in = (rest[1], rest[0])
    if rule == EXPERTS:
      return (out_in,) * len(mapping.hf)
    return ((experts, 2 * out_in[0], out_in[1]),) if rule in (FUSED_GATE, FUSED_UP) else ((experts, *out_in),)
  if rule == GDN_BA:
    embed, heads, width = ours_shape
    return ((heads * width // 2, embed),) * 2
  if rule == GDN_QKVZ:
    embed, heads, width = ours_shape
    dk = key_head_dim
    group_dv = (width - 2 * dk) // 2
    return ((heads * (2 * dk + group_dv), embed), (heads * group_dv, embed))
  if rule == IDENTITY:
    return (tuple(ours_shape),)
  if rule == CONV:
    return ((ours_shape[1], 1, ours_shape[0]),)
  return ((math.prod(ours_shape[mapping.in_dims :]), math.prod(ours_shape[: mapping.in_dims])),)


def hf_shape(mapping: ParamMapping, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the HF tensor(s) of a mapping whose tensors all share one shape (all but GDN_QKVZ)."""
  return hf_shapes(mapping, ours_shape)[0]


def _split_qkvz(ours: np.ndarray, dk: int) -> tuple[np.ndarray, np.ndarray]:
  """Our grouped kernel [E, Hk, 2dk + 2 g dv] -> (in_proj_qkv [2 Hk dk + Hk g dv, E], in_proj_z [Hk g dv, E])."""
  embed, heads, width = ours.shape
  group_dv = (width - 2 * dk) // 2
  q, k, v, z = np.split(ours, [dk, 2 * dk, 2 * dk + group_dv], axis=-1)
  flat = lambda t: t.reshape(embed, -1)  # key head major, as HF orders heads
  return np.concatenate([flat(q), flat(k), flat(v)], axis=-1).T, flat(z).T


def _join_qkvz(qkv: np.ndarray, z: np.ndarray, ours_shape: tuple[int, ...], dk: int) -> np.ndarray:
  embed, heads, width = ours_shape
  group_dv = (width - 2 * dk) // 2
  q, k, v = np.split(qkv.T, [heads * dk, 2 * heads * dk], axis=-1)
  per_head = lambda t, d: t.reshape(embed, heads, d)
  return np.concatenate([per_head(q, dk), per_head(k, dk), per_head(v, group_dv), per_head(z.T, group_dv)], axis=-1)


def to_ours(mapping: ParamMapping, tensors: list[np.ndarray], ours_shape: tuple[int, ...],
            key_head_dim: int | None = None) -> np.ndarray:
  """HF tensor(s) of `mapping` -> our array of `ours_shape`. Shapes must already be checked.
  GDN_QKVZ needs the GDN key_head_dim."""
  rule = mapping.rule
  if rule == GDN_QKVZ:
    return np.ascontiguousarray(_join_qkvz(tensors[0], tensors[1], ours_shape, key_head_dim))
  if rule == GDN_BA:
    embed, heads, width = ours_shape
    b, a = (t.T.reshape(embed, heads, width // 2) for t in tensors)
    return np.ascontiguousarray(np.concatenate([b, a], axis=-1))
  if rule in _FUSED:
    fused = tensors[0]
    if rule != FUSED_DOWN:
      inter = fused.shape[1] // 2
      fused = fused[:, :inter] if rule == FUSED_GATE else fused[:, inter:]
    return np.ascontiguousarray(fused.transpose(0, 2, 1))
  shape = ours_shape[1:] if rule == EXPERTS else ours_shape
  convert: Callable[[np.ndarray], np.ndarray]
  if rule == IDENTITY:
    convert = lambda t: t
  elif rule == CONV:
    convert = lambda t: t[:, 0, :].T
  else:
    convert = lambda t: t.T.reshape(shape)
  arrays = [np.ascontiguousarray(convert(t)) for t in tensors]
  return np.stack(arrays) if rule == EXPERTS else arrays[0]


def to_hf(mapping: ParamMapping, array: np.ndarray, key_head_dim: int | None = None) -> dict[str, np.ndarray]:
  """Our array -> {HF name: tensor} for `mapping` (GDN_QKVZ needs the GDN key_head_dim)."""
  rule = mapping.rule
  if rule == GDN_QKVZ:
    return dict(zip(mapping.hf, map(np.ascontiguousarray, _split_qkvz(array, key_head_dim))))
  if rule == GDN_BA:
    embed, heads, width = array.shape
    b, a = array[..., : width // 2], array[..., width // 2 :]
    return {name: np.ascontiguousarray(t.reshape(embed, -1).T) for name, t in zip(mapping.hf, (b, a))}
  if rule in _FUSED:
    raise ValueError(f"'{mapping.ours}': export writes experts one by one, not fused")
  parts = list(array) if rule == EXPERTS else [array]
  shape = hf_shape(mapping, array.shape)
  out = {}
  for name, part in zip(mapping.hf, parts):
    if rule == IDENTITY:
      tensor = part
    elif rule == CONV:
      tensor = part.T[:, None, :]
    else:
      tensor = part.reshape(shape[::-1]).T
    out[name] = np.ascontiguousarray(tensor)
  return out


def language_model_names(names: Collection[str]) -> list[str]:
  """The checkpoint's names without the vision tower (`model.visual.*`), which we skip."""
  return [n for n in names if not n.startswith(VISION_PREFIX)]


def params_from_hf(
    spec: ModelSpec, hf_tensors: Mapping[str, np.ndarray], ours_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
  """All our (unscanned, flat '/'-path) arrays from an in-memory HF state dict in hub layout (experts per expert
  or fused; a vision tower is skipped).

  Raises KeyError/ValueError naming the first missing, unexpected or mis-shaped tensor.
  """
  names = language_model_names(hf_tensors)
  include_mtp = any(name.startswith("mtp.") for name in names)
  table = resolve_expert_layout(parameter_mappings(spec, include_mtp=include_mtp), set(names))
  expected = {name for m in table for name in m.hf}
  missing = [name for m in table for name in m.hf if name not in hf_tensors]
  if missing:
    raise KeyError(f"checkpoint is missing tensor '{missing[0]}' ({len(missing)} missing in all)")
  extra = sorted(set(names) - expected)
  if extra:
    raise ValueError(f"checkpoint has unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
  gdn = spec.gated_delta_net
  out = {}
  for m in table:
    shape = tuple(ours_shapes[m.ours])
    for name, want in zip(m.hf, hf_shapes(m, shape, gdn.key_head_dim)):
      got = tuple(hf_tensors[name].shape)
      if got != want:
        raise ValueError(f"tensor '{name}' has shape {got}, expected {want}")
    out[m.ours] = to_ours(m, [np.asarray(hf_tensors[n]) for n in m.hf], shape, gdn.key_head_dim)
  return out
