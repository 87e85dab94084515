"""Flash attention of a prefill chunk to the KV cache on NVIDIA GPUs: a Pallas kernel lowered by Triton.

Contract (cached.py's reference): query [B, T, Hq, D] sits at cache slots cursor[b]..cursor[b]+T-1 of row b and
attends to the slots s <= its own; key, value [B, S, Hkv, D]. Forward only (inference).

Layout. GQA without repeating keys: the G = Hq / Hkv query heads that share a key head are rows of one matrix, so
the query goes in as [B, Hkv, T * G, D] (row r = token r // G, head r % G of the group; one transpose of the
query, small next to the cache reads) padded to whole query blocks. A program takes one block of block_q rows of
one (row b, key head h) and walks the cache in blocks of block_kv slots with an online softmax in float32.

Causal early exit: the walk stops after the last block the program's last token can see, so a chunk's work is
about T x (cursor + T), not T x S. Blocks every row of the program sees in full skip the mask; the rest mask the
slots past each row's own. The cache is read in place ([B, S, Hkv, D], slot stride Hkv * D): the last block is
taken flush with the cache's end (slots an earlier block covered are masked out there), so S needs no padding,
only S >= block_kv. Programs of later query blocks walk further; the grid launches them first.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.triton_compat import TritonParams as _TritonParams

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
SHARED_MEMORY_BYTES = 227 * 1024  # an H100/H200 block's opt-in maximum
_LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class CachedTiling:
  """Block sizes (powers of two >= 16) and launch parameters; the query block plus the pipelined key and value blocks
  must fit the shared memory (`shared_memory_bytes`)."""

  block_q: int = 64  # query rows (token x group head) per program
  block_kv: int = 64  # cache slots per step of the walk
  num_warps: int = 4
  num_stages: int = 2

  def shared_memory_bytes(self, head_dim: int, itemsize: int) -> int:
    """An estimate: the query block plus num_stages buffered key and value blocks. Triton's own scratch (layout
    conversions, the weights as a dot operand: block_q x block_kv) comes on top, so keep a margin."""
    return (self.block_q + 2 * self.num_stages * self.block_kv) * head_dim * itemsize


def default_tiling(head_dim: int, itemsize: int = 2) -> CachedTiling:
  """16-bit inputs: 128-row query blocks of 8 warps, 64-slot steps; 3 stages at head_dim <= 128, 2 at 256 (196 KB).
  At head_dim 256, bf16, on an H200 (2026-12-01; an 8192-token chunk against 122880 cached slots, Hq 16, Hkv 2):
  this tile 34.8 ms (490 TFLOP/s); 64 rows / 4 warps / 2 stages 57.3 ms; 64 / 4 / 3 38.6; 128 rows / 32 slots / 3
  stages 37.4; the XLA reference 146 ms. float32 inputs (twice the bytes): 2 stages of 64-slot blocks, 32-slot
  blocks at head_dim 256 (not timed)."""
  if itemsize > 2:
    return CachedTiling(block_q=64, block_kv=64 if head_dim <= 128 else 32, num_warps=4, num_stages=2)
  return CachedTiling(block_q=128, block_kv=64, num_warps=8, num_stages=3 if head_dim <= 128 else 2)


def unsupported_reason(query: jax.Array, key: jax.Array, tiling: CachedTiling | None = None) -> str | None:
  """Why the kernel cannot take these inputs, or None when it can."""
  head_dim, slots = query.shape[-1], key.shape[1]
  tiling = tiling or default_tiling(head_dim, jnp.dtype(query.dtype).itemsize)
  if query.dtype not in DTYPES or key.dtype != query.dtype:
    return f"needs bfloat16, float16 or float32 query and cache of one dtype, got {query.dtype} and {key.dtype}"
  if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
    return f"needs a head_dim that is a power of two in [16, 256], got {head_dim}"
  if query.shape[2] % key.shape[2]:
    return f"needs query heads ({query.shape[2]}) a multiple of key heads ({key.shape[2]})"
  if slots < tiling.block_kv:
    return f"needs at least block_kv={tiling.block_kv} cache slots, got {slots}"
  smem = tiling.shared_memory_bytes(head_dim, jnp.dtype(query.dtype).itemsize)
  if smem > SHARED_MEMORY_BYTES:
    return f"tiling {tiling} needs {smem} bytes of shared memory at head_dim {head_dim}, over {SHARED_MEMORY_BYTES}"
  return None


def _dot(a: jax.Array, b: jax.Array, trans_b: bool = False) -> jax.Array:
  """a @ b (or a @ b^T), float32 accumulation; float32 operands in IEEE float32 (Triton's default is TF32)."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _kernel(cursor_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float, groups: int, length: int, slots: int,
            block_q: int, block_kv: int):
  """One (query block, key head h, row b): o = softmax(q k^T * scale, causal to the cache) v."""
  num_q_blocks = pl.num_programs(0)
  i, h, b = num_q_blocks - 1 - pl.program_id(0), pl.program_id(1), pl.program_id(2)  # longest walks first
  rows = pl.ds(i * block_q, block_q)
  q = q_ref[b, h, rows, :]  # [BQ, D]
  cursor = cursor_ref[b]
  row = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  last_visible = cursor + jnp.minimum(row // groups, length - 1)  # [BQ]; padding rows copy the last token
  first_row, last_row = i * block_q, i * block_q + block_q - 1
  seen_by_all = cursor + jnp.minimum(first_row // groups, length - 1)  # every row sees the slots <= this
  seen_by_any = cursor + jnp.minimum(last_row // groups, length - 1)
  num_blocks = jnp.minimum(seen_by_any // block_kv + 1, pl.cdiv(slots, block_kv))
  full_blocks = jnp.minimum((seen_by_all + 1) // block_kv, slots // block_kv)  # visible to all, inside the cache
  slot_in_block = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1)
  logit_scale = scale * _LOG2_E  # exp2 below

  def step(j, carry, masked: bool):
    running_max, running_sum, acc = carry  # [BQ], [BQ], [BQ, D] float32
    start = jnp.minimum(j * block_kv, slots - block_kv) if masked else j * block_kv
    slots_j = pl.ds(start, block_kv)
    key, value = k_ref[b, slots_j, h, :], v_ref[b, slots_j, h, :]  # [BKV, D]
    logits = _dot(q, key, trans_b=True) * logit_scale  # [BQ, BKV], log2 units
    if masked:
      slot = start + slot_in_block
      visible = (slot >= j * block_kv) & (slot <= last_visible[:, None])
      logits = jnp.where(visible, logits, -jnp.inf)
    # Finite from the first block on: every row sees slot 0, so masked slots give exp2(-inf) = 0, never NaN.
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
    weights = jnp.exp2(logits - new_max[:, None])
    correction = jnp.exp2(running_max - new_max)
    running_sum = running_sum * correction + jnp.sum(weights, axis=1)
    acc = acc * correction[:, None] + _dot(weights.astype(value.dtype), value)
    return new_max, running_sum, acc

  head_dim = q.shape[-1]
  carry = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
           jnp.zeros((block_q, head_dim), jnp.float32))
  carry = jax.lax.fori_loop(0, full_blocks, functools.partial(step, masked=False), carry)
  _, running_sum, acc = jax.lax.fori_loop(full_blocks, num_blocks, functools.partial(step, masked=True), carry)
  o_ref[b, h, rows, :] = (acc / running_sum[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "tiling", "interpret"))
def cached_flash_attention(query: jax.Array, key: jax.Array, value: jax.Array, cursor: jax.Array, *, scale: float,
                           tiling: CachedTiling | None = None, interpret: bool = False) -> jax.Array:
  """query [B, T, Hq, D] at slots cursor..cursor+T-1 (cursor [B] int32); key, value [B, S, Hkv, D] -> [B, T, Hq, D]."""
  batch, length, num_heads, head_dim = query.shape
  slots, num_kv_heads = key.shape[1], key.shape[2]
  tiling = tiling or default_tiling(head_dim, jnp.dtype(query.dtype).itemsize)
  reason = unsupported_reason(query, key, tiling)
  if reason is not None:
    raise ValueError(f"cached flash attention: {reason}")
  groups = num_heads // num_kv_heads
  rows = length * groups
  block_q = max(16, min(tiling.block_q, pl.next_power_of_2(rows)))
  padded_rows = pl.cdiv(rows, block_q) * block_q
  q_rows = query.reshape(batch, length, num_kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
  q_rows = q_rows.reshape(batch, num_kv_heads, rows, head_dim)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded_rows - rows), (0, 0)))
  kernel = functools.partial(_kernel, scale=float(scale), groups=groups, length=length, slots=slots,
                             block_q=block_q, block_kv=tiling.block_kv)
  out = pl.pallas_call(
      kernel,
      grid=(padded_rows // block_q, num_kv_heads, batch),
      out_shape=jax.ShapeDtypeStruct(q_rows.shape, query.dtype),
      compiler_params=_TritonParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
      interpret=interpret,
      name="cached_flash_attention",
  )(cursor.astype(jnp.int32), q_rows, key, value)
  out = out[:, :, :rows].reshape(batch, num_kv_heads, length, groups, head_dim).transpose(0, 2, 1, 3, 4)
  return out.reshape(batch, length, num_heads, head_dim)
