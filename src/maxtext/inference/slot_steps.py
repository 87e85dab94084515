"""The jitted device functions of continuous batching: a fixed set of rows ("slots") whose caches persist across
calls, each row at its own point (free, part-way through its prompt, or decoding).

One `advance` call feeds every row up to T tokens (`counts[b]` of them real: a prompt chunk, the newest generated
token, or none for a free row) and samples the token after each row's last real input. The caches are donated, so
they update in place. Prompt chunks go through the same token recurrence as decode steps, so a state restored from
the prefix cache at a chunk boundary continues exactly as the cold run did.

`read_block` / `write_block` copy one row's attention keys and values for `block` consecutive slots and its Gated
DeltaNet conv and recurrent state (float32), the unit the prefix cache stores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from maxtext.inference.sampling import BatchSampling, sample, token_logprobs
from maxtext.layers.decode_cache import DecodeContext, GdnCache, KVCache
from maxtext.models.qwen3_next import Qwen3NextForCausalLM

_is_cache = lambda x: isinstance(x, (GdnCache, KVCache))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
  cache: Any  # the model's decode cache for every row
  presence: jax.Array  # [B, V] bool: tokens each row generated so far (presence penalty)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
  tokens: jax.Array  # [B] int32: the token after each row's last real input
  logprobs: jax.Array  # [B] float32
  top_logprobs: jax.Array  # [B, top] float32
  top_ids: jax.Array  # [B, top] int32


class SlotSteps:
  """Compiled once per (rows, T, num_top, greedy_only, filtered)."""

  def __init__(self, model: Qwen3NextForCausalLM, capacity: int, block: int):
    self.model, self.capacity, self.block = model, capacity, block
    self.batch_axis = 1 if model.spec.scan_layers else 0  # scanned layers stack their caches on a leading axis
    self.advance = jax.jit(self._advance, donate_argnums=(1,), static_argnames=("num_top", "greedy_only", "filtered"))
    self.reset_rows = jax.jit(self._reset_rows, donate_argnums=(0,))
    self.read_block = jax.jit(self._read_block)
    self.write_block = jax.jit(self._write_block, donate_argnums=(0,))

  def empty(self, params: Any, rows: int) -> SlotState:
    """Zero caches for `rows` rows of `capacity` slots (their shapes from a prefill, traced, not run)."""
    def prefill(params):
      tokens = jnp.zeros((rows, 1), jnp.int32)
      context = DecodeContext(jnp.zeros((rows,), jnp.int32), jnp.ones((rows, 1), bool), capacity=self.capacity)
      return self.model.apply({"params": params}, tokens, tokens, None, context, method="decode_hidden")[1]

    shapes = jax.eval_shape(prefill, params)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return SlotState(cache, jnp.zeros((rows, self.model.spec.vocab_size), bool))

  # ---- one call: every row forward by its counts ----
  def _advance(self, params, state: SlotState, tokens, cursor, counts, emit, sampling: BatchSampling, steps,
               previous, feed_previous, *, num_top: int, greedy_only: bool,
               filtered: bool = True) -> tuple[SlotState, Sampled]:
    """tokens [B, T] (row b's first counts[b] real) at slots cursor[b]..; emit [B] bool: rows whose sampled token
    is kept (marks presence). steps [B]: index of the token being drawn per row (its rng stream). Rows where
    feed_previous[b] take previous[b] (the token the previous call sampled, still on the device) as their input, so
    a call can be dispatched before the previous one's tokens are read back. filtered=False: no row uses top-k,
    top-p or min-p, so sampling needs no vocabulary sort (a row draws the same token either way)."""
    tokens = tokens.at[:, 0].set(jnp.where(feed_previous, previous, tokens[:, 0]))
    length = tokens.shape[1]
    positions = cursor[:, None] + jnp.arange(length, dtype=jnp.int32)
    context = DecodeContext(cursor, jnp.arange(length)[None, :] < counts[:, None])
    hidden, cache = self.model.apply({"params": params}, tokens, positions, state.cache, context,
                                     method="decode_hidden")
    last = jnp.take_along_axis(hidden, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = self.model.apply({"params": params}, last, method="logits_of").astype(jnp.float32)
    token = sample(logits, sampling, state.presence, steps, greedy_only=greedy_only, filtered=filtered)
    chosen, top_values, top_ids = token_logprobs(logits, token, num_top)
    rows = jnp.arange(token.shape[0])
    presence = state.presence.at[rows, token].max(emit)
    return SlotState(cache, presence), Sampled(token, chosen, top_values, top_ids)

  # ---- row bookkeeping ----
  def _rows(self, x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, self.batch_axis, 0)

  def _unrows(self, x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, 0, self.batch_axis)

  def _reset_rows(self, state: SlotState, rows: jax.Array) -> SlotState:
    """Zero the recurrent state, conv inputs and presence of the rows where rows[b] (attention slots past a row's
    cursor are never read, so they need no clearing)."""
    def clear(x):
      mask = rows.reshape((-1,) + (1,) * (x.ndim - 1 - self.batch_axis))
      return jnp.where(mask, jnp.zeros_like(x), x)

    def visit(entry):
      if isinstance(entry, GdnCache):
        return GdnCache(clear(entry.conv), clear(entry.state))
      return entry

    cache = jax.tree.map(visit, state.cache, is_leaf=_is_cache)
    return SlotState(cache, jnp.where(rows[:, None], False, state.presence))

  def _read_block(self, state: SlotState, row: jax.Array, start: jax.Array) -> Any:
    """Row `row`'s keys/values of slots start..start+block-1 and its GDN state now (conv and state in float32)."""
    def visit(entry):
      if isinstance(entry, KVCache):
        take = lambda x: jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_index_in_dim(
            self._rows(x), row, 0, keepdims=False), start, self.block, axis=self.batch_axis)
        return KVCache(take(entry.key), take(entry.value))
      pick = lambda x: jax.lax.dynamic_index_in_dim(self._rows(x), row, 0, keepdims=False).astype(jnp.float32)
      return GdnCache(pick(entry.conv), pick(entry.state))

    return jax.tree.map(visit, state.cache, is_leaf=_is_cache)

  def _write_block(self, state: SlotState, row: jax.Array, start: jax.Array, block: Any) -> SlotState:
    """The inverse of read_block: the block's keys/values at slots start.. of `row`, its GDN state as the row's."""
    def visit(entry, saved):
      if isinstance(entry, KVCache):
        def put(x, new):
          rows = self._rows(x)
          current = jax.lax.dynamic_index_in_dim(rows, row, 0, keepdims=False)
          updated = jax.lax.dynamic_update_slice_in_dim(current, new.astype(x.dtype), start, axis=self.batch_axis)
          return self._unrows(jax.lax.dynamic_update_index_in_dim(rows, updated, row, 0))
        return KVCache(put(entry.key, saved.key), put(entry.value, saved.value))

      def put_state(x, new):
        rows = self._rows(x)
        return self._unrows(jax.lax.dynamic_update_index_in_dim(rows, new.astype(x.dtype), row, 0))
      return GdnCache(put_state(entry.conv, saved.conv), put_state(entry.state, saved.state))

    cache = jax.tree.map(visit, state.cache, block, is_leaf=_is_cache)
    return SlotState(cache, state.presence)
