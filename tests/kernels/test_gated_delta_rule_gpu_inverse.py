"""The blocked WY inverse of the GPU kernels (gpu_inverse.py, ChunkedLaunch.inverse_block): the inverse itself
against float64 numpy, and the whole op through it (fused and unfused forward) against the jnp reference in values
and gradients. Interpret mode on the CPU; tolerances as in test_gated_delta_rule_gpu.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule_reference
from maxtext.kernels.gated_delta_rule.gpu import ChunkedLaunch, chunk_gated_delta_rule_gpu
from maxtext.kernels.gated_delta_rule.gpu_inverse import block_lower_inverse
from maxtext.kernels.gated_delta_rule.gpu_precision import dot

from tests.kernels.test_gated_delta_rule import random_inputs, relative_error, values_and_grads
from tests.kernels.test_gated_delta_rule_gpu import TOLERANCE, documents


@pytest.mark.parametrize("block", [16, 32])
def test_block_lower_inverse_matches_float64(block):
  """A chunk's A from unit keys with a shared component (large off-diagonal entries), betas in (0, 1) and slow
  decays: the lower blocks of (I + A)^-1 against numpy's float64 inverse; the blocks above stay unwritten."""
  rng = np.random.default_rng(block)
  size = 64
  keys = rng.standard_normal((size, 128)) + 3 * rng.standard_normal((1, 128))
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  beta = rng.uniform(0.1, 1.0, size)
  gc = np.cumsum(-rng.uniform(0.0, 0.05, size))
  a = beta[:, None] * (keys @ keys.T) * np.exp(np.minimum(gc[:, None] - gc[None, :], 0.0))
  a = a + np.triu(rng.standard_normal((size, size)))  # garbage on and above the diagonal: must not be read
  expected = np.linalg.inv(np.eye(size) + np.tril(a, -1))
  count = size // block
  blocks = [[jnp.asarray(a[i * block:(i + 1) * block, j * block:(j + 1) * block], jnp.float32) for j in range(i + 1)]
            for i in range(count)]
  t = block_lower_inverse(blocks, functools.partial(dot, precision="ieee", interpret=True))
  got = np.block([[np.asarray(t[i][j], np.float64) if j <= i else np.zeros((block, block)) for j in range(count)]
                  for i in range(count)])
  assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


def check_slow_decays(dims, chunk, dtype, precision, launch, segment_ids=None, seed=0):
  """test_gated_delta_rule_gpu.check on inputs whose decays are 50x slower (~0.02 per token): with the shared
  inputs' decays a chunk's far blocks of T are ~exp(-25), and leaving out terms of the substitution went unseen."""
  q, k, v, g, beta, h0 = random_inputs(seed, *dims, dtype, True)
  inputs = (q, k, v, (g.astype(jnp.float32) * 0.02).astype(dtype), beta, h0)
  expected = values_and_grads(chunk_gated_delta_rule_reference, *inputs, segment_ids, chunk)
  kernel = functools.partial(chunk_gated_delta_rule_gpu, precision=precision, launch=launch, interpret=True)
  got = values_and_grads(kernel, *inputs, segment_ids, chunk)
  names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
  for name, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert a.dtype == b.dtype, name
    assert relative_error(a, b) < TOLERANCE[precision], name


def test_fused_blocked16_packed_ragged_with_state():
  """The fused forward with 16-wide blocks in chunks of 64 (four row blocks): documents ending inside blocks, in
  a block's last row and across chunks, a ragged tail (100 tokens), an initial state; values and every gradient."""
  check_slow_decays((1, 100, 1, 2, 32, 32), 64, jnp.float32, "ieee", segment_ids=documents([40, 7, 53]),
                    launch=ChunkedLaunch(fused_forward=True, inverse_block=16, block_v=16))


def test_unfused_blocked32_bf16_groups():
  """The unfused forward (wy_kernel's w, u and T by 32-wide blocks) in the 16-bit default precision: B = 2, two
  value heads per key head, Dk != Dv, ragged tail, initial state."""
  check_slow_decays((2, 90, 1, 2, 32, 16), 64, jnp.bfloat16, "bf16",
                    launch=ChunkedLaunch(fused_forward=False, inverse_block=32))


def test_rejects_inverse_block_triton_cannot_tile():
  q, k, v, g, beta, _ = random_inputs(0, 1, 32, 1, 1, 16, 16, jnp.float32, False)
  with pytest.raises(ValueError, match="inverse_block=8 must be a power of two >= 16"):
    chunk_gated_delta_rule_gpu(q, k, v, g, beta, None, chunk_size=32, interpret=True,
                               launch=ChunkedLaunch(inverse_block=8))
