"""Tiny random HF Qwen3-Next checkpoints: the independent reference of the tests, and a checkpoint to try the tools on.

  python3 -m tests.assets.tiny_hf_checkpoint --output-dir DIR [--config grouped_values] [--vocab-size 151936]
      [--yarn FACTOR:ORIGINAL_MAX_POSITION_EMBEDDINGS]

The vocabulary defaults to Qwen's (151936) so that real prompts tokenise into valid ids.
"""

from __future__ import annotations

import argparse
import sys

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


def save_tiny_hf(name: str, directory: str, seed: int = 0, **config_overrides):
  """Build, perturb and `save_pretrained` a random tiny model; returns (model in eval mode, its HF config)."""
  import torch
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
  return model, config


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output-dir", required=True)
  parser.add_argument("--config", default="grouped_values", choices=sorted(HF_TINY_CONFIGS))
  parser.add_argument("--vocab-size", type=int, default=151936)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--yarn", default=None, help="FACTOR:ORIGINAL: rope_type yarn with this factor and"
                      " original_max_position_embeddings (max_position_embeddings = their product)")
  args = parser.parse_args(argv)
  overrides = {"vocab_size": args.vocab_size}
  if args.yarn:
    factor, original = args.yarn.split(":")
    rope = {**HF_TINY_CONFIGS[args.config]["rope_parameters"], "rope_type": "yarn", "factor": float(factor),
            "original_max_position_embeddings": int(original)}
    overrides.update(rope_parameters=rope, max_position_embeddings=int(float(factor) * int(original)))
  save_tiny_hf(args.config, args.output_dir, args.seed, **overrides)
  print(f"wrote a random tiny Qwen3-Next ({args.config}, vocab {args.vocab_size}) to {args.output_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
