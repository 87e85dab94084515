"""Translate between an HF `config.json` (Qwen3-Next, or Qwen3.5 / Qwen3.6 MoE) and our model config keys.

Qwen3.5 / Qwen3.6 MoE (`qwen3_5_moe`) nests the language model in `text_config` beside a `vision_config`; we take
the text model only. Its RoPE is interleaved M-RoPE (`mrope_section`): with text positions (all three position
streams equal) it is exactly the 1-D partial RoPE we run, so image/video positions are not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maxtext.configs.types import Config, ConfigError
from maxtext.configs import layer_pattern

QWEN3_NEXT = "qwen3_next"
QWEN3_5_MOE = "qwen3_5_moe"
SUPPORTED_MODEL_TYPES = (QWEN3_NEXT, QWEN3_5_MOE, "qwen3_5_moe_text")
# Quantisation we can undo at conversion (block FP8 with per-block `weight_scale_inv`).
SUPPORTED_QUANTIZATION = ("fp8",)


def _rope(hf: Mapping[str, Any]) -> tuple[float, float, str, Mapping[str, Any]]:
  """(theta, partial_rotary_factor, rope_type, the rope dict): transformers 5 nests them in rope_parameters (a
  non-empty legacy rope_scaling replaces it, as transformers does); the hub keeps theta and the factor at top level."""
  nested = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  theta = nested.get("rope_theta", hf.get("rope_theta", 10000.0))
  factor = nested.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
  rope_type = nested.get("rope_type", nested.get("type", "default"))
  return float(theta), float(factor), rope_type, nested


def _yarn(hf: Mapping[str, Any], rope: Mapping[str, Any]) -> dict[str, Any]:
  """Our YaRN keys from an HF rope dict, with transformers' fallbacks (a top-level original_max_position_embeddings
  wins, then the rope dict's, then max_position_embeddings; beta_fast / beta_slow 32 / 1 when unset or 0)."""
  if rope.get("factor") is None:
    raise ConfigError("HF config rope_type 'yarn' needs rope_parameters 'factor' (the context extension factor)")
  original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or hf.get(
      "max_position_embeddings")
  if not original:
    raise ConfigError("HF config rope_type 'yarn' needs rope_parameters 'original_max_position_embeddings' (or"
                      " max_position_embeddings)")
  return {
      "rope_type": "yarn",
      "rope_factor": float(rope["factor"]),
      "original_max_position_embeddings": int(original),
      "beta_fast": float(rope.get("beta_fast") or 32),
      "beta_slow": float(rope.get("beta_slow") or 1),
      "rope_attention_factor": float(rope.get("attention_factor") or 0),
      "mscale": float(rope.get("mscale") or 0),
      "mscale_all_dim": float(rope.get("mscale_all_dim") or 0),
      "rope_truncate": bool(rope.get("truncate", True)),
  }


def _yarn_to_hf(c: Config) -> dict[str, Any]:
  """The HF rope dict entries of our YaRN keys (the derived-by-default ones only when set)."""
  rope = {"rope_type": "yarn", "factor": c.rope_factor, "original_max_position_embeddings":
          c.original_max_position_embeddings, "beta_fast": c.beta_fast, "beta_slow": c.beta_slow,
          "truncate": c.rope_truncate}
  for ours, theirs in (("rope_attention_factor", "attention_factor"), ("mscale", "mscale"),
                       ("mscale_all_dim", "mscale_all_dim")):
    if getattr(c, ours):
      rope[theirs] = getattr(c, ours)
  return rope


def _layer_pattern(hf: Mapping[str, Any]) -> dict[str, Any]:
  """full_attention_interval for Qwen3-Next's periodic pattern, else the explicit decoder_layer_types."""
  layers = hf["num_hidden_layers"]
  layer_types = hf.get("layer_types")
  interval = int(hf.get("full_attention_interval", 4))
  if layer_types is None:
    return {"full_attention_interval": interval, "decoder_layer_types": ""}
  try:
    types = layer_pattern.parse_layer_types(",".join(layer_types))
  except ValueError as e:
    raise ConfigError(f"HF config 'layer_types': {e}") from None
  if len(types) != layers:
    raise ConfigError(f"HF config 'layer_types' lists {len(types)} layers but num_hidden_layers is {layers}")
  periodic = layer_pattern.periodic_interval(types)
  if periodic is not None and layers % periodic == 0:  # whole blocks: Qwen3-Next's form, scannable as such
    return {"full_attention_interval": periodic, "decoder_layer_types": ""}
  return {"full_attention_interval": interval, "decoder_layer_types": layer_pattern.format_layer_types(types)}


def text_config_of(hf: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
  """(our model_family, the language model's config dict) of an HF config.json dict."""
  model_type = hf.get("model_type")
  if model_type == QWEN3_NEXT:
    return QWEN3_NEXT, hf
  if model_type == "qwen3_5_moe_text":
    return QWEN3_5_MOE, hf
  if model_type == QWEN3_5_MOE:
    text = hf.get("text_config")
    if not isinstance(text, Mapping) or "num_hidden_layers" not in text:
      raise ConfigError("HF config model_type 'qwen3_5_moe' has no text_config: a vision-only folder has no"
                        " language model to convert")
    return QWEN3_5_MOE, text
  if isinstance(model_type, str) and model_type.endswith("_vision"):
    raise ConfigError(f"HF config model_type '{model_type}' is a vision encoder only; conversion needs the language"
                      " model (a qwen3_5_moe or qwen3_5_moe_text config)")
  raise ConfigError(f"HF config model_type '{model_type}' is not supported (expected one of {SUPPORTED_MODEL_TYPES})")


def _check_quantization(hf: Mapping[str, Any], text: Mapping[str, Any]) -> None:
  quant = hf.get("quantization_config") or text.get("quantization_config")
  if not quant:
    return
  method = quant.get("quant_method") if isinstance(quant, Mapping) else None
  if method not in SUPPORTED_QUANTIZATION:
    raise ConfigError(f"HF config quantization_config.quant_method '{method}' is not supported (only block FP8"
                      " 'fp8', dequantised to bfloat16 at conversion); convert an unquantised checkpoint")


def config_overrides_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Our model keys from an HF config.json dict; raises ConfigError on what we cannot represent."""
  family, text = text_config_of(hf)
  _check_quantization(hf, text)
  theta, partial, rope_type, rope = _rope(text)
  if rope_type not in ("default", "yarn"):
    raise ConfigError(f"HF config rope_type '{rope_type}' is not supported (only 'default' and 'yarn')")
  if text.get("mlp_only_layers") or text.get("decoder_sparse_step", 1) != 1:
    raise ConfigError("HF config has dense MLP layers (mlp_only_layers / decoder_sparse_step); only all-MoE is supported")
  if text.get("attention_bias", False):
    raise ConfigError("HF config 'attention_bias' true is not supported")
  if text.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"HF config hidden_act '{text.get('hidden_act')}' is not supported (only silu)")
  tied = text.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))
  return {
      "model_family": family,
      **_layer_pattern(text),
      "vocab_size": text["vocab_size"],
      "base_emb_dim": text["hidden_size"],
      "base_num_decoder_layers": text["num_hidden_layers"],
      "base_num_query_heads": text["num_attention_heads"],
      "base_num_kv_heads": text["num_key_value_heads"],
      "head_dim": text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
      "normalization_layer_epsilon": text.get("rms_norm_eps", 1e-6),
      "rope_max_timescale": theta,
      "partial_rotary_factor": partial,
      **(_yarn(text, rope) if rope_type == "yarn" else {}),
      "linear_conv_kernel_dim": text["linear_conv_kernel_dim"],
      "linear_key_head_dim": text["linear_key_head_dim"],
      "linear_value_head_dim": text["linear_value_head_dim"],
      "linear_num_key_heads": text["linear_num_key_heads"],
      "linear_num_value_heads": text["linear_num_value_heads"],
      "num_experts": text["num_experts"],
      "num_experts_per_tok": text["num_experts_per_tok"],
      # Qwen3.5 / 3.6 always renormalise the top-k weights (the key is gone from their config).
      "norm_topk_prob": True if family == QWEN3_5_MOE else text.get("norm_topk_prob", True),
      "base_moe_mlp_dim": text["moe_intermediate_size"],
      "shared_expert_mlp_dim": text["shared_expert_intermediate_size"],
      "logits_via_embedding": tied,
      "mtp_num_layers": text.get("mtp_num_hidden_layers", hf.get("mtp_num_hidden_layers", 0)),
  }


def _mrope_section(rotary_dim: int) -> list[int]:
  """Three M-RoPE sections summing to rotary_dim / 2 ([11, 11, 10] for 64); any split gives the same text RoPE."""
  half = rotary_dim // 2
  return [half // 3 + (1 if i < half % 3 else 0) for i in range(3)]


def _text_config(c: Config) -> dict[str, Any]:
  return {
      "vocab_size": c.vocab_size,
      "hidden_size": c.base_emb_dim,
      "num_hidden_layers": c.base_num_decoder_layers,
      "num_attention_heads": c.base_num_query_heads,
      "num_key_value_heads": c.base_num_kv_heads,
      "head_dim": c.head_dim,
      "rms_norm_eps": c.normalization_layer_epsilon,
      "layer_types": list(c.layer_types),
      "linear_conv_kernel_dim": c.linear_conv_kernel_dim,
      "linear_key_head_dim": c.linear_key_head_dim,
      "linear_value_head_dim": c.linear_value_head_dim,
      "linear_num_key_heads": c.linear_num_key_heads,
      "linear_num_value_heads": c.linear_num_value_heads,
      "num_experts": c.num_experts,
      "num_experts_per_tok": c.num_experts_per_tok,
      "moe_intermediate_size": c.base_moe_mlp_dim,
      "shared_expert_intermediate_size": c.shared_expert_mlp_dim,
      "tie_word_embeddings": c.logits_via_embedding,
      "mtp_num_hidden_layers": c.mtp_num_layers,
      "hidden_act": "silu",
      "attention_bias": False,
  }


def hf_config_from_config(c: Config) -> dict[str, Any]:
  """An HF config.json dict for our model (transformers 5 layout; Qwen3-Next also gets the hub's top-level rope
  keys; Qwen3.5 / 3.6 the nested multimodal layout with transformers' default vision_config)."""
  text = _text_config(c)
  rope = {"rope_type": "default", "rope_theta": c.rope_max_timescale, "partial_rotary_factor": c.partial_rotary_factor}
  if c.rope_type == "yarn":
    rope.update(_yarn_to_hf(c))
    # transformers checks factor against max_position_embeddings / original_max_position_embeddings.
    text["max_position_embeddings"] = int(c.original_max_position_embeddings * c.rope_factor)
  if c.model_family == QWEN3_5_MOE:
    rope.update(mrope_section=_mrope_section(c.rotary_dim), mrope_interleaved=True)
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": QWEN3_5_MOE,
        "tie_word_embeddings": c.logits_via_embedding,
        "text_config": {**text, "model_type": "qwen3_5_moe_text", "rope_parameters": rope},
    }
  return {
      "architectures": ["Qwen3NextForCausalLM"],
      "model_type": QWEN3_NEXT,
      **text,
      "rope_parameters": rope,
      "rope_theta": c.rope_max_timescale,
      "partial_rotary_factor": c.partial_rotary_factor,
      "full_attention_interval": c.full_attention_interval,
      "norm_topk_prob": c.norm_topk_prob,
      "decoder_sparse_step": 1,
      "mlp_only_layers": [],
  }
