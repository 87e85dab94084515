"""Shared fixtures: tiny random HF Qwen3-Next models (the independent reference) and our model built from them."""

from __future__ import annotations

import os

# Four host devices so sharding tests can build a real mesh; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Two shapes: more value heads than key heads with un-normalised top-k, and equal heads with normalised top-k
# and a tied head; both with experts > top-k, a sequence length not a multiple of the chunk and 2 blocks.
HF_TINY_CONFIGS = {
    "grouped_values": dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.25},
    ),
    "normalised_topk": dict(
        vocab_size=320, hidden_size=48, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=3,
        head_dim=16, linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=8,
        linear_value_head_dim=12, linear_conv_kernel_dim=3, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=24, shared_expert_intermediate_size=20, norm_topk_prob=True,
        tie_word_embeddings=False, layer_types=["linear_attention", "full_attention"] * 3,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
    ),
}


@dataclasses.dataclass
class HfTiny:
  name: str
  model: object  # transformers Qwen3NextForCausalLM, float32, eval mode
  config_dict: dict
  tensors: dict[str, np.ndarray]  # hub-layout state dict (what save_pretrained writes)
  path: str  # the save_pretrained directory


def build_hf_tiny(name: str, directory: str, seed: int = 0, **config_overrides) -> HfTiny:
  import torch
  from safetensors.numpy import load_file
  from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

  torch.manual_seed(seed)
  config = Qwen3NextConfig(**{**HF_TINY_CONFIGS[name], **config_overrides}, attn_implementation="eager")
  model = Qwen3NextForCausalLM(config).eval()
  with torch.no_grad():
    # HF initialises norms to 0 / 1 and dt_bias to 1; perturb them so a mis-mapped norm cannot hide.
    for param_name, param in model.named_parameters():
      if "norm" in param_name or "dt_bias" in param_name:
        param.add_(0.1 * torch.randn_like(param))
      # HF draws A from U(0.01, 16): most heads then forget their state within a token, which would leave the
      # recurrence (and its gradients) barely exercised. Decays of 0.3-0.95 per token keep the state alive.
      if param_name.endswith("A_log"):
        param.copy_(torch.empty_like(param).uniform_(0.1, 1.0).log())
  model.save_pretrained(directory)
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  return HfTiny(name, model, config.to_dict(), tensors, directory)


@pytest.fixture(scope="session", params=sorted(HF_TINY_CONFIGS))
def hf_tiny(request, tmp_path_factory) -> HfTiny:
  return build_hf_tiny(request.param, str(tmp_path_factory.mktemp(request.param)))


def our_config(hf_config: dict, **overrides):
  from maxtext.checkpoint_conversion.hf_config import config_overrides_from_hf
  from maxtext.configs import load_config

  values = {**config_overrides_from_hf(hf_config), "dtype": "float32", "weight_dtype": "float32", **overrides}
  return load_config(overrides=values)


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
  """Per-token KL(reference || ours), computed in float64."""
  def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  log_p, log_q = log_softmax(reference_logits), log_softmax(logits)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def hub_layout(named_tensors: dict) -> dict[str, np.ndarray]:
  """transformers' in-memory names (fused `experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) ->
  the hub's per-expert names, as numpy float32 arrays."""
  out = {}
  for name, tensor in named_tensors.items():
    array = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
    if name.endswith("experts.gate_up_proj"):
      prefix, inter = name[: -len("gate_up_proj")], array.shape[1] // 2
      for e in range(array.shape[0]):
        out[f"{prefix}{e}.gate_proj.weight"] = array[e, :inter]
        out[f"{prefix}{e}.up_proj.weight"] = array[e, inter:]
    elif name.endswith("experts.down_proj"):
      prefix = name[: -len("down_proj")]
      for e in range(array.shape[0]):
        out[f"{prefix}{e}.down_proj.weight"] = array[e]
    else:
      out[name] = array
  return out
