"""The "2.5B bench" model of shared/bench (the peers' anchor config), for our side and HF's side alike.

hidden 2048, 8 layers = 2 x (3 GDN + 1 attention), 16/2 heads of 256, GDN 16/32 heads of 128, 64 experts top-8,
expert and shared MLP 512, vocab 151936. The HF config is derived from ours by the export's translation, so both
sides always run the same model.
"""

from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")]

BENCH_MODEL = dict(
    vocab_size=151936, base_emb_dim=2048, base_num_decoder_layers=8, base_num_query_heads=16, base_num_kv_heads=2,
    head_dim=256, full_attention_interval=4, linear_num_key_heads=16, linear_num_value_heads=32,
    linear_key_head_dim=128, linear_value_head_dim=128, num_experts=64, num_experts_per_tok=8, base_moe_mlp_dim=512,
    shared_expert_mlp_dim=512, mtp_num_layers=0, norm_topk_prob=True, partial_rotary_factor=0.25,
)


FAST_COMPILE_XLA_FLAGS = "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false"


def prefer_fast_gpu_compiles() -> str:
  """Adds FAST_COMPILE_XLA_FLAGS to XLA_FLAGS (unless XLA_FLAGS already sets autotuning); returns XLA_FLAGS.

  Call before jax loads. A precaution for benchmarks that compile many shapes inside one 10-minute device call:
  XLA then takes cuBLAS with its heuristic choice for every matmul instead of timing candidates. It was not the
  cause of the 2-minute serving-step compiles (those came from an unrolled kernel and stayed with it off), and
  its effect on the measured speeds has not been measured; the numbers in docs/benchmarks.md say which flags ran.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_autotune_level" not in flags and "xla_gpu_enable_triton_gemm" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_XLA_FLAGS}".strip()
  return os.environ["XLA_FLAGS"]


def hf_bench_config(**overrides):
  """transformers' Qwen3NextConfig of the bench model (with `overrides` of our config keys)."""
  from transformers import Qwen3NextConfig  # noqa: PLC0415 - only the HF worker needs torch/transformers

  from maxtext.configs.hf_config import hf_config_from_config  # noqa: PLC0415
  from maxtext.configs import load_config  # noqa: PLC0415

  return Qwen3NextConfig(**hf_config_from_config(load_config(overrides={**BENCH_MODEL, **overrides})))
