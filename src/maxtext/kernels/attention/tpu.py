"""Causal GQA flash attention on TPU: JAX's Pallas splash attention kernel, called per device shard.

Splash attention brings its own custom vjp (fused dK/dV and dQ kernels), so nothing here differentiates by hand.
The caller (kernels/attention/__init__.py) wraps this in shard_map: Mosaic kernels cannot be auto-partitioned.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

# Splash tiles the sequence in lanes of 128; its blocks must be multiples of that.
LANES = 128


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
  """Tile sizes along queries and keys, forward and backward (the fused dK/dV/dQ kernel)."""

  block_q: int = 512
  block_kv: int = 512

  def for_lengths(self, q_len: int, kv_len: int) -> "SplashBlocks":
    """The largest tiles, at most these, that divide the lengths (lengths are multiples of LANES)."""
    return SplashBlocks(_largest_divisor_tile(q_len, self.block_q), _largest_divisor_tile(kv_len, self.block_kv))

  def splash_block_sizes(self) -> splash.BlockSizes:
    bq, bkv = self.block_q, self.block_kv
    # Scores are formed [bq, compute] at a time, at most 512 keys wide, whatever the key tile (long sequences).
    compute = _largest_divisor_tile(bkv, 512)
    return splash.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=compute,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=compute,
        use_fused_bwd_kernel=True,
    )


def _largest_divisor_tile(length: int, limit: int) -> int:
  tile = max(LANES, limit - limit % LANES)
  while length % tile:
    tile -= LANES
  return tile


def unsupported_reason(q: jax.Array, k: jax.Array) -> str | None:
  """Why splash attention cannot take these shapes, or None when it can."""
  q_len, kv_len = q.shape[1], k.shape[1]
  if q_len % LANES or kv_len % LANES:
    return f"splash attention needs query and key lengths that are multiples of {LANES}, got {q_len} and {kv_len}"
  if q_len > kv_len:
    return f"causal attention needs at least as many keys ({kv_len}) as queries ({q_len})"
  return None


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    segment_ids: jax.Array | None = None,
    blocks: SplashBlocks = SplashBlocks(),
    interpret: bool = False,
) -> jax.Array:
  """q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; segment_ids: [B, T] (T == S) or None. Returns [B, T, Hq, D].

  Queries are the last T of the S positions (as in the reference). On a CPU, interpret=True runs the kernel in
  the Pallas interpreter (tests).
  """
  batch, q_len, num_heads, _ = q.shape
  kv_len = k.shape[1]
  reason = unsupported_reason(q, k)
  if reason is not None:
    raise ValueError(reason)
  if segment_ids is not None and (segment_ids.shape != (batch, q_len) or q_len != kv_len):
    raise ValueError(f"segment_ids must be [batch, length] = {(batch, q_len)} with as many keys as queries,"
                     f" got {segment_ids.shape} for {kv_len} keys")
  kernel = causal_kernel(num_heads, q_len, kv_len, q_len, blocks=blocks, interpret=interpret)
  return run_kernel(kernel, q, k, v, scale=scale, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)


class _ConstantBlock:
  """A mask block with one value throughout: answers splash's any() / all() without forming the block."""

  def __init__(self, value: bool):
    self.value = value

  def any(self) -> bool:
    return self.value

  def all(self) -> bool:
    return self.value


class _CausalMask(splash_mask.CausalMask):
  """splash's CausalMask, with blocks wholly below or above the diagonal answered without forming them.

  Building a kernel walks the mask block by block in numpy (forward, dQ and dKV mask infos) and asks each block
  any() and all(), forming only the partial ones for the kernel: forming every block is T^2 element operations,
  over an hour at 1M tokens. Here only the diagonal blocks are formed; the mask info is the same
  (tests/kernels/test_attention_context_parallel.py compares it with the stock CausalMask's).
  """

  def __getitem__(self, idx):
    if len(idx) == 2 and all(isinstance(x, slice) and x.start is not None and x.stop is not None
                             and x.step in (None, 1) for x in idx):
      q_slice, kv_slice = idx
      if kv_slice.stop - 1 <= q_slice.start + self.offset:  # every key at or before every query
        return _ConstantBlock(True)
      if kv_slice.start > q_slice.stop - 1 + self.offset:  # every key after every query
        return _ConstantBlock(False)
    return super().__getitem__(idx)

  __hash__ = splash_mask.CausalMask.__hash__


def causal_kernel(num_heads: int, q_len: int, kv_len: int, q_block_len: int, *, blocks: SplashBlocks = SplashBlocks(),
                  interpret: bool = False) -> splash.SplashAttentionKernel:
  """Splash kernel for causal attention of q_len queries (the last of kv_len positions) over kv_len keys.

  q_block_len: the queries each call gets (q_len, or a shard of it: the kernel's mask info then splits over
  q_len // q_block_len shards, see `SplashAttentionKernel.manual_sharding_spec`).
  """
  causal = _CausalMask((q_len, kv_len), offset=kv_len - q_len)
  return splash.make_splash_mha(
      splash_mask.MultiHeadMask([causal] * num_heads),
      block_sizes=blocks.for_lengths(q_block_len, kv_len).splash_block_sizes(),
      head_shards=1,
      q_seq_shards=q_len // q_block_len,
      interpret=interpret,
  )


def run_kernel(kernel, q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
               q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; segment ids [B, T] and [B, S] or None -> [B, T, Hq, D]."""
  # Splash does not scale the logits; scaling q in float32 first rounds once (exactly for power-of-two scales).
  q_bhtd = (q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 2, 1, 3)
  k_bhsd, v_bhsd = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if q_segment_ids is None:
    out_bhtd = jax.vmap(kernel)(q_bhtd, k_bhsd, v_bhsd)
  else:
    ids = splash.SegmentIds(q=q_segment_ids.astype(jnp.int32), kv=kv_segment_ids.astype(jnp.int32))
    out_bhtd = jax.vmap(kernel)(q_bhtd, k_bhsd, v_bhsd, ids)
  return out_bhtd.transpose(0, 2, 1, 3).astype(q.dtype)
