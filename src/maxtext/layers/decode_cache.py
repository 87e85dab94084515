"""What a decoding model carries between calls: per-layer caches and the per-call position bookkeeping.

A batch decodes with right-padded rows: row b holds `cursor[b]` tokens in its caches (slots 0..cursor-1) and the
next call's T inputs go to slots cursor..cursor+T-1, so rows of different lengths share one fixed-shape step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class DecodeContext:
  """Per-call inputs of a decoding forward pass.

  cursor [B] int32: tokens already in the caches of each row (0 for a prefill, which builds the caches).
  valid [B, T] bool: which inputs are real tokens (a prefill's right padding is not; it must not touch state).
  capacity: cache length (slots) a prefill allocates; steps keep the caches' length.
  keep_all_states: recurrent layers return their state after every input token ([B, T, ...]) instead of the last,
    so a speculative verification can keep the state of its last accepted token.
  """

  cursor: jax.Array
  valid: jax.Array
  capacity: int = 0
  keep_all_states: bool = False

  @property
  def is_prefill(self) -> bool:
    return self.capacity > 0


jax.tree_util.register_dataclass(
    DecodeContext, data_fields=["cursor", "valid"], meta_fields=["capacity", "keep_all_states"]
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of an attention layer: [B, S, Hkv, D] each, in the compute dtype (rotary applied)."""

  key: jax.Array
  value: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GdnCache:
  """A Gated DeltaNet layer's recurrent state.

  conv [B, K - 1, C]: the last K - 1 inputs of the depthwise conv (q | k | v channels, before the conv).
  state [B, Hv, Dk, Dv] float32: the delta-rule state. With keep_all_states both gain a token axis after B.
  """

  conv: jax.Array
  state: jax.Array


def write_rows(cache: jax.Array, new: jax.Array, cursor: jax.Array) -> jax.Array:
  """cache [B, S, ...], new [B, T, ...] -> cache with row b's slots cursor[b]..cursor[b]+T-1 replaced by new[b]."""
  write = lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), i, axis=0)
  return jax.vmap(write)(cache, new, cursor)


def read_rows(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """x [B, L, ...] -> [B, size, ...]: row b's slice start[b]..start[b]+size-1."""
  return jax.vmap(lambda row, i: jax.lax.dynamic_slice_in_dim(row, i, size, axis=0))(x, start)


def select_token(tree, index: jax.Array):
  """Caches with a token axis after B (keep_all_states) -> those at token index[b] of each row."""
  pick = lambda x: jnp.take_along_axis(x, index.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
  return jax.tree.map(pick, tree)
