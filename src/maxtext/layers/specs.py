"""Plain, hashable size bundles handed to layers (built from the Config at the model's edge)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Numerics:
  """Compute dtype of activations and matmuls, storage dtype of parameters."""

  dtype: jnp.dtype = jnp.float32
  weight_dtype: jnp.dtype = jnp.float32


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rotary_dim: int
  impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetSpec:
  num_key_heads: int
  num_value_heads: int
  key_head_dim: int
  value_head_dim: int
  conv_kernel: int
  chunk_size: int = 64
  impl: str = "auto"

  @property
  def value_heads_per_key_head(self) -> int:
    return self.num_value_heads // self.num_key_heads

  @property
  def key_dim(self) -> int:
    return self.num_key_heads * self.key_head_dim

  @property
  def value_dim(self) -> int:
    return self.num_value_heads * self.value_head_dim


@dataclasses.dataclass(frozen=True)
class MoeSpec:
  num_experts: int
  top_k: int
  norm_topk_prob: bool
  expert_dim: int
  shared_expert_dim: int
  impl: str = "auto"  # grouped matmul implementation (kernels/grouped_matmul)
  sparse_matmul: bool = True  # dropless grouped matmuls; False: token-dropping dense einsums
  megablox: bool = True  # on TPU, impl='auto' takes megablox (False: XLA's ragged_dot)
  capacity_factor: float = -1.0  # token dropping only; <= 0 drops nothing
