"""ModelSpec: the model's sizes, taken once from the Config; the only thing the model assembly reads."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from maxtext.configs import Config
from maxtext.configs.layer_pattern import block_length
from maxtext.layers.rotary import RopeScaling
from maxtext.layers.specs import AttentionSpec, GatedDeltaNetSpec, MoeSpec, Numerics


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  vocab_size: int
  emb_dim: int
  layer_types: tuple[str, ...]
  attention: AttentionSpec
  gated_delta_net: GatedDeltaNetSpec
  moe: MoeSpec
  rope_theta: float
  eps: float
  tie_embeddings: bool
  mtp_num_layers: int
  scan_layers: bool
  numerics: Numerics
  # Rematerialisation of each decoder block (scanned) or layer (unscanned): 'none', 'minimal' or 'full'.
  remat_policy: str = "none"
  # The HF checkpoint family (the converters' name table); the layer math is the same for all.
  family: str = "qwen3_next"
  # YaRN or plain RoPE (on the attention's rotary_dim dims).
  rope_scaling: RopeScaling = RopeScaling()

  @property
  def num_layers(self) -> int:
    return len(self.layer_types)

  @property
  def block_length(self) -> int:
    """Layers per scanned block: the shortest block that repeats over layer_types (all layers if none does)."""
    return block_length(self.layer_types)

  @property
  def num_blocks(self) -> int:
    return self.num_layers // self.block_length

  @classmethod
  def from_config(cls, c: Config) -> "ModelSpec":
    return cls(
        vocab_size=c.vocab_size,
        emb_dim=c.base_emb_dim,
        layer_types=c.layer_types,
        attention=AttentionSpec(
            num_heads=c.base_num_query_heads,
            num_kv_heads=c.base_num_kv_heads,
            head_dim=c.head_dim,
            rotary_dim=c.rotary_dim,
            impl={"autoselected": "auto", "dot_product": "reference", "flash": "flash"}[c.attention],
        ),
        gated_delta_net=GatedDeltaNetSpec(
            num_key_heads=c.linear_num_key_heads,
            num_value_heads=c.linear_num_value_heads,
            key_head_dim=c.linear_key_head_dim,
            value_head_dim=c.linear_value_head_dim,
            conv_kernel=c.linear_conv_kernel_dim,
            chunk_size=c.gdn_chunk_size,
            impl=c.gdn_kernel,
        ),
        moe=MoeSpec(
            num_experts=c.num_experts,
            top_k=c.num_experts_per_tok,
            norm_topk_prob=c.norm_topk_prob,
            expert_dim=c.base_moe_mlp_dim,
            shared_expert_dim=c.shared_expert_mlp_dim,
            impl=c.grouped_matmul_kernel,
            sparse_matmul=c.sparse_matmul,
            megablox=c.megablox,
            capacity_factor=c.capacity_factor,
        ),
        rope_theta=c.rope_max_timescale,
        eps=c.normalization_layer_epsilon,
        tie_embeddings=c.logits_via_embedding,
        mtp_num_layers=c.mtp_num_layers,
        scan_layers=c.scan_layers,
        remat_policy=c.remat_policy,
        family=c.model_family,
        rope_scaling=rope_scaling_of(c),
        numerics=Numerics(dtype=jnp.dtype(c.dtype), weight_dtype=jnp.dtype(c.weight_dtype)),
    )


def rope_scaling_of(c: Config) -> RopeScaling:
  if c.rope_type == "default":
    return RopeScaling()
  return RopeScaling(
      rope_type=c.rope_type, factor=c.rope_factor, original_max_position_embeddings=c.original_max_position_embeddings,
      beta_fast=c.beta_fast, beta_slow=c.beta_slow, attention_factor=c.rope_attention_factor, mscale=c.mscale,
      mscale_all_dim=c.mscale_all_dim, truncate=c.rope_truncate,
  )
