"""The whole-sequence splash kernel the context-parallel path builds: the same mask info as splash's own CausalMask
(built without forming the blocks off the diagonal), and tiles that keep its block grid small at long lengths."""

import jax
import numpy as np
import pytest

splash = pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel")
splash_mask = pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_mask")

from maxtext.kernels.attention import context_parallel, tpu  # noqa: E402


@pytest.mark.parametrize("length,shards,tile", [(4096, 4, 512), (8192, 8, 1024), (2048, 1, 256)])
def test_causal_kernel_mask_info_matches_splash_causal_mask(length, shards, tile):
  blocks = tpu.SplashBlocks(block_q=tile, block_kv=tile)
  ours = tpu.causal_kernel(4, length, length, length // shards, blocks=blocks, interpret=True)
  stock = splash.make_splash_mha(
      splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * 4),
      block_sizes=blocks.for_lengths(length // shards, length).splash_block_sizes(),
      head_shards=1, q_seq_shards=shards, interpret=True)
  for info in ("fwd_mask_info", "dkv_mask_info"):  # no dq info: the backward is the fused dK/dV/dQ kernel
    got, want = jax.tree.leaves(getattr(ours, info)), jax.tree.leaves(getattr(stock, info))
    assert len(got) == len(want) > 0, info
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=info)


def test_long_sequences_get_larger_tiles():
  sizes = {n: context_parallel.long_sequence_blocks(n).block_q for n in (4096, 1 << 17, 1 << 18, 1 << 20, 1 << 22)}
  assert sizes == {4096: 512, 1 << 17: 512, 1 << 18: 1024, 1 << 20: 1024, 1 << 22: 1024}
