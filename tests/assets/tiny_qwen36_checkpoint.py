"""Tiny random HF Qwen3.5 / Qwen3.6 MoE checkpoints (`Qwen3_5MoeForConditionalGeneration`, hub layout).

  python3 -m tests.assets.tiny_qwen36_checkpoint --output-dir DIR [--config irregular] [--fused-experts]
      [--yarn FACTOR:ORIGINAL_MAX_POSITION_EMBEDDINGS]

`save_pretrained` writes experts one tensor per expert; `fuse_experts` rewrites a folder with the fused 3-D form
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) that the hub's Qwen3.6 repos use.
`add_mtp` adds `mtp.*` tensors (transformers does not model the MTP layer, so save_pretrained writes none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

# The vocabulary covers the golden prompts' Qwen3.6 token ids (< 16000); the full one is 248320.
TINY_VOCAB = 16000
_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, temporal_patch_size=1,
               num_position_embeddings=16)
# Two shapes: Qwen3.6's periodic pattern (3 GDN + 1 attention, twice) with more value than key heads; and a
# non-periodic pattern with equal heads, dk != dv, a tied head and odd sizes.
QWEN36_TINY_CONFIGS = {
    "periodic": dict(
        vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    ),
    "irregular": dict(
        vocab_size=TINY_VOCAB, hidden_size=48, num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=3,
        head_dim=16, linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=8,
        linear_value_head_dim=12, linear_conv_kernel_dim=3, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=24, shared_expert_intermediate_size=20, tie_word_embeddings=True,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    ),
}


def hf_config(name: str, **text_overrides):
  from transformers import Qwen3_5MoeConfig

  text = {**QWEN36_TINY_CONFIGS[name], **text_overrides}
  vision = {**_VISION, "out_hidden_size": text["hidden_size"]}
  return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"])


def perturb_(model) -> None:
  """HF initialises norms to 0 / 1 and dt_bias to 1: perturb them so a mis-mapped norm cannot hide; decays of
  0.3-0.95 per token (A in [0.1, 1]) keep the recurrence alive."""
  import torch

  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if "norm" in param_name or "dt_bias" in param_name:
        param.add_(0.1 * torch.randn_like(param))
      if param_name.endswith("A_log"):
        param.copy_(torch.empty_like(param).uniform_(0.1, 1.0).log())


def save_tiny_qwen36(name: str, directory: str, seed: int = 0, **text_overrides):
  """Build, perturb and `save_pretrained` a random tiny model; returns (model in eval mode, its HF config)."""
  import torch
  from transformers import Qwen3_5MoeForConditionalGeneration

  torch.manual_seed(seed)
  config = hf_config(name, **text_overrides)
  config.text_config._attn_implementation = "eager"
  model = Qwen3_5MoeForConditionalGeneration(config).eval()
  perturb_(model)
  model.save_pretrained(directory)
  return model, config


def read_tensors(directory: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return load_file(os.path.join(directory, "model.safetensors"))


def write_folder(source: str, directory: str, tensors: dict[str, np.ndarray], config_updates: dict | None = None):
  """A copy of the folder `source` holding `tensors` (one safetensors file) and an updated config.json."""
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  for key, value in (config_updates or {}).items():
    config["text_config"][key] = value
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def fuse_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-expert tensors -> the fused 3-D form (gate rows then up rows), every layer including mtp.*."""
  out, groups = {}, {}
  for name, array in tensors.items():
    if ".mlp.experts." in name and name.endswith(".weight"):
      prefix, rest = name.split(".mlp.experts.", 1)
      expert, kind = rest.split(".")[:2]
      groups.setdefault(prefix, {}).setdefault(kind, {})[int(expert)] = array
    else:
      out[name] = array
  for prefix, kinds in groups.items():
    stack = lambda kind: np.stack([kinds[kind][e] for e in range(len(kinds[kind]))])
    out[f"{prefix}.mlp.experts.gate_up_proj"] = np.concatenate([stack("gate_proj"), stack("up_proj")], axis=1)
    out[f"{prefix}.mlp.experts.down_proj"] = stack("down_proj")
  return out


def random_mtp_tensors(tensors: dict[str, np.ndarray], seed: int = 7) -> dict[str, np.ndarray]:
  """mtp.* tensors for one MTP layer (full attention + MoE), shaped after layer tensors of `tensors`."""
  rng = np.random.default_rng(seed)
  prefix = "model.language_model."
  attention = next(n.split(".self_attn.")[0] for n in tensors if ".self_attn.q_proj" in n)
  layer = {n[len(attention) + 1 :]: a for n, a in tensors.items() if n.startswith(attention + ".")}
  hidden = tensors[prefix + "norm.weight"].shape[0]
  out = {f"mtp.layers.0.{n}": (0.05 * rng.standard_normal(a.shape)).astype(a.dtype) for n, a in layer.items()}
  out["mtp.fc.weight"] = (0.05 * rng.standard_normal((hidden, 2 * hidden))).astype(np.float32)
  for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
    out[f"mtp.{norm}.weight"] = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output-dir", required=True)
  parser.add_argument("--config", default="periodic", choices=sorted(QWEN36_TINY_CONFIGS))
  parser.add_argument("--vocab-size", type=int, default=TINY_VOCAB)
  parser.add_argument("--fused-experts", action="store_true", help="store experts fused, as the hub's repos do")
  parser.add_argument("--with-mtp", action="store_true", help="add random mtp.* tensors (mtp_num_hidden_layers=1)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--yarn", default=None, help="FACTOR:ORIGINAL: rope_type yarn with this factor and"
                      " original_max_position_embeddings (max_position_embeddings = their product)")
  args = parser.parse_args(argv)
  overrides = {"vocab_size": args.vocab_size}
  if args.yarn:
    factor, original = args.yarn.split(":")
    rope = {**QWEN36_TINY_CONFIGS[args.config]["rope_parameters"], "rope_type": "yarn", "factor": float(factor),
            "original_max_position_embeddings": int(original)}
    overrides.update(rope_parameters=rope, max_position_embeddings=int(float(factor) * int(original)))
  save_tiny_qwen36(args.config, args.output_dir, args.seed, **overrides)
  if args.fused_experts or args.with_mtp:
    tensors = read_tensors(args.output_dir)
    if args.with_mtp:
      tensors.update(random_mtp_tensors(tensors))
    if args.fused_experts:
      tensors = fuse_experts(tensors)
    write_folder(args.output_dir, args.output_dir, tensors, {"mtp_num_hidden_layers": 1} if args.with_mtp else None)
  print(f"wrote a random tiny Qwen3.6 ({args.config}, vocab {args.vocab_size}) to {args.output_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
