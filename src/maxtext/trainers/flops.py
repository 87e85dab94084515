"""Model FLOPs of one training token, by formula (what MFU divides by).

Training FLOPs = 3 x forward FLOPs (the backward pass costs two forward passes: gradients of activations and of
weights). Rematerialisation is not counted: these are model FLOPs, not hardware FLOPs. A multiply-add is 2 FLOPs.

Forward FLOPs per token, with E = base_emb_dim, V = vocab_size, T = max_target_length:
- every matmul weight used by the token: 2 x its size. Per attention layer the q (with its output gate), k, v and o
  projections: E * D * (3 Hq + 2 Hkv). Per Gated DeltaNet layer in_proj_qkvz, in_proj_ba and out_proj:
  E * (2 Hk dk + 2 Hv dv) + E * 2 Hv + Hv dv * E. Per MoE: router E * experts, top_k routed experts of 3 E I each,
  the shared expert 3 E Is and its gate E. The output head E * V. The embedding lookup is not a matmul.
- causal attention: QK^T and PV over on average T/2 keys: 2 * 2 * (T/2) * Hq * D = 2 T Hq D per attention layer.
- the chunked delta rule (chunk C = gdn_chunk_size), per value head: the state read by q and by the chunk's w
  and the state update k^T u, each dk x dv: 3 * 2 dk dv; the causal products within a chunk (q k^T and k k^T over
  C/2 keys, the solve applied to k and v, the intra-chunk output): 2 * (C/2) * (3 dk + 2 dv) = C (3 dk + 2 dv).
- the causal depthwise conv over the q, k, v channels: 2 * kernel * (2 Hk dk + Hv dv).
- with mtp_num_layers > 0 and mtp_loss_scaling_factor > 0, each MTP step adds its fc (2E -> E), one attention
  decoder layer with its MoE, and the output head.
Norms, rotary, activations, gates and the softmax are elementwise and left out (under 1% at these sizes).
"""

from __future__ import annotations

from maxtext.configs import Config

# Dense bf16 peak of one device, in TFLOP/s, by jax `device_kind` prefix (vendor datasheets, no sparsity).
PEAK_BF16_TFLOPS = (
    ("NVIDIA H200", 989.0),
    ("NVIDIA H100", 989.0),  # SXM; the PCIe card is 756
    ("NVIDIA A100", 312.0),
    ("NVIDIA B200", 2250.0),
    ("TPU v6", 918.0),
    ("TPU v5 lite", 197.0),  # v5e reports "TPU v5 lite"
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports plain "TPU v5"
    ("TPU v4", 275.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak of a device kind, or None when unknown (a CPU): then no MFU is reported."""
  if "PCIe" in device_kind and device_kind.startswith("NVIDIA H100"):
    return 756.0
  for prefix, tflops in PEAK_BF16_TFLOPS:
    if device_kind.startswith(prefix):
      return tflops
  return None


def _moe_weights(c: Config) -> int:
  E = c.base_emb_dim
  return E * c.num_experts + c.num_experts_per_tok * 3 * E * c.base_moe_mlp_dim + 3 * E * c.shared_expert_mlp_dim + E


def _attention_layer_flops(c: Config) -> float:
  E, D, Hq, Hkv, T = c.base_emb_dim, c.head_dim, c.base_num_query_heads, c.base_num_kv_heads, c.max_target_length
  weights = E * D * (3 * Hq + 2 * Hkv) + _moe_weights(c)
  return 2 * weights + 2 * T * Hq * D


def _gated_delta_net_layer_flops(c: Config) -> float:
  E, C = c.base_emb_dim, c.gdn_chunk_size
  Hk, Hv, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
  weights = E * (2 * Hk * dk + 2 * Hv * dv) + E * 2 * Hv + Hv * dv * E + _moe_weights(c)
  delta_rule = Hv * (6 * dk * dv + C * (3 * dk + 2 * dv))
  conv = 2 * c.linear_conv_kernel_dim * (2 * Hk * dk + Hv * dv)
  return 2 * weights + delta_rule + conv


def forward_flops_per_token(c: Config) -> float:
  """Forward FLOPs of one token through the model (and the MTP module when it is trained)."""
  head = 2 * c.base_emb_dim * c.vocab_size
  layers = sum(
      _attention_layer_flops(c) if kind == "full_attention" else _gated_delta_net_layer_flops(c)
      for kind in c.layer_types
  )
  total = layers + head
  if c.mtp_num_layers and c.mtp_loss_scaling_factor > 0:
    fc = 2 * (2 * c.base_emb_dim) * c.base_emb_dim
    total += c.mtp_num_layers * (fc + _attention_layer_flops(c) + head)
  return float(total)


def training_flops_per_token(c: Config) -> float:
  """Model FLOPs of one trained token: 3 x forward (see the module docstring for the formula)."""
  return 3.0 * forward_flops_per_token(c)
