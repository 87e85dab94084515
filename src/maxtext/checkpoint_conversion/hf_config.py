"""Translate between an HF Qwen3-Next `config.json` and our model config keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maxtext.configs import Config, ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3_next",)


def _rope(hf: Mapping[str, Any]) -> tuple[float, float, str]:
  """(theta, partial_rotary_factor, rope_type): transformers 5 nests them in rope_parameters; the hub keeps
  them at top level."""
  nested = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = nested.get("rope_theta", hf.get("rope_theta", 10000.0))
  factor = nested.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))
  rope_type = nested.get("rope_type", nested.get("type", "default"))
  return float(theta), float(factor), rope_type


def _attention_interval(hf: Mapping[str, Any]) -> int:
  layers = hf["num_hidden_layers"]
  layer_types = hf.get("layer_types")
  if layer_types is None:
    return int(hf.get("full_attention_interval", 4))
  full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
  if not full:
    raise ConfigError("HF config 'layer_types' has no full_attention layer")
  interval = full[0] + 1
  expected = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
  if list(layer_types) != expected:
    raise ConfigError(
        f"HF config 'layer_types' is not the periodic pattern of every {interval}th layer full attention;"
        " only that pattern is supported"
    )
  return interval


def config_overrides_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Our model keys from an HF config.json dict; raises ConfigError on what we cannot represent."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConfigError(f"HF config model_type '{model_type}' is not supported (expected one of {SUPPORTED_MODEL_TYPES})")
  theta, partial, rope_type = _rope(hf)
  if rope_type != "default":
    raise ConfigError(f"HF config rope_type '{rope_type}' is not supported yet (only 'default')")
  if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
    raise ConfigError("HF config has dense MLP layers (mlp_only_layers / decoder_sparse_step); only all-MoE is supported")
  if hf.get("attention_bias", False):
    raise ConfigError("HF config 'attention_bias' true is not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"HF config hidden_act '{hf.get('hidden_act')}' is not supported (only silu)")
  return {
      "vocab_size": hf["vocab_size"],
      "base_emb_dim": hf["hidden_size"],
      "base_num_decoder_layers": hf["num_hidden_layers"],
      "base_num_query_heads": hf["num_attention_heads"],
      "base_num_kv_heads": hf["num_key_value_heads"],
      "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      "normalization_layer_epsilon": hf.get("rms_norm_eps", 1e-6),
      "rope_max_timescale": theta,
      "partial_rotary_factor": partial,
      "full_attention_interval": _attention_interval(hf),
      "linear_conv_kernel_dim": hf["linear_conv_kernel_dim"],
      "linear_key_head_dim": hf["linear_key_head_dim"],
      "linear_value_head_dim": hf["linear_value_head_dim"],
      "linear_num_key_heads": hf["linear_num_key_heads"],
      "linear_num_value_heads": hf["linear_num_value_heads"],
      "num_experts": hf["num_experts"],
      "num_experts_per_tok": hf["num_experts_per_tok"],
      "norm_topk_prob": hf.get("norm_topk_prob", True),
      "base_moe_mlp_dim": hf["moe_intermediate_size"],
      "shared_expert_mlp_dim": hf["shared_expert_intermediate_size"],
      "logits_via_embedding": hf.get("tie_word_embeddings", False),
      "mtp_num_layers": hf.get("mtp_num_hidden_layers", 0),
  }


def hf_config_from_config(c: Config) -> dict[str, Any]:
  """An HF config.json dict for our model (transformers 5 layout, with the top-level rope keys of the hub too)."""
  return {
      "architectures": ["Qwen3NextForCausalLM"],
      "model_type": "qwen3_next",
      "vocab_size": c.vocab_size,
      "hidden_size": c.base_emb_dim,
      "num_hidden_layers": c.base_num_decoder_layers,
      "num_attention_heads": c.base_num_query_heads,
      "num_key_value_heads": c.base_num_kv_heads,
      "head_dim": c.head_dim,
      "rms_norm_eps": c.normalization_layer_epsilon,
      "rope_parameters": {
          "rope_type": "default",
          "rope_theta": c.rope_max_timescale,
          "partial_rotary_factor": c.partial_rotary_factor,
      },
      "rope_theta": c.rope_max_timescale,
      "partial_rotary_factor": c.partial_rotary_factor,
      "layer_types": list(c.layer_types),
      "full_attention_interval": c.full_attention_interval,
      "linear_conv_kernel_dim": c.linear_conv_kernel_dim,
      "linear_key_head_dim": c.linear_key_head_dim,
      "linear_value_head_dim": c.linear_value_head_dim,
      "linear_num_key_heads": c.linear_num_key_heads,
      "linear_num_value_heads": c.linear_num_value_heads,
      "num_experts": c.num_experts,
      "num_experts_per_tok": c.num_experts_per_tok,
      "norm_topk_prob": c.norm_topk_prob,
      "moe_intermediate_size": c.base_moe_mlp_dim,
      "shared_expert_intermediate_size": c.shared_expert_mlp_dim,
      "tie_word_embeddings": c.logits_via_embedding,
      "mtp_num_hidden_layers": c.mtp_num_layers,
      "hidden_act": "silu",
      "decoder_sparse_step": 1,
      "mlp_only_layers": [],
      "attention_bias": False,
  }
