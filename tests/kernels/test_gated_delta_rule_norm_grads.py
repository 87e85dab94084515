"""gpu_norm_grads.key_head_grads (interpret mode) against JAX autodiff of the op's l2 norm and the sum over each key
head's value heads, in float64 numpy terms: dx = vjp of x -> l2_normalize(x), at the group-summed dy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.kernels.gated_delta_rule.chunking import l2_normalize
from maxtext.kernels.gated_delta_rule.gpu_norm_grads import key_head_grads


def expected(x, dy, normalized):
  batch, length, key_heads, dim = x.shape
  g = np.asarray(dy, np.float64).reshape(batch, length, key_heads, -1, dim).sum(3)
  if not normalized:
    return g
  x = np.asarray(x, np.float64)
  r = 1.0 / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
  y = x * r
  return r * (g - y * (y * g).sum(-1, keepdims=True))


@pytest.mark.parametrize("key_heads, value_heads", [(2, 4), (1, 3), (2, 2)])
@pytest.mark.parametrize("normalized", [True, False])
def test_matches_float64(key_heads, value_heads, normalized):
  rng = np.random.default_rng(key_heads * 10 + value_heads)
  x = jnp.asarray(rng.normal(size=(2, 96, key_heads, 32)), jnp.float32).at[0, 5].set(0.0)  # a zero row: eps
  dy = jnp.asarray(rng.normal(size=(2, 96, value_heads, 32)), jnp.float32)
  got = key_head_grads(x, dy, block=32, normalized=normalized, interpret=True)
  assert got.dtype == x.dtype and got.shape == x.shape
  np.testing.assert_allclose(np.asarray(got), expected(x, dy, normalized), rtol=1e-5, atol=1e-6)


def test_matches_autodiff_of_the_norm_in_bf16():
  """bf16 x and dy: the float32 arithmetic inside, one rounding of dx to bf16 (autodiff of the f32 norm agrees)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 64, 2, 64)), jnp.bfloat16)
  dy = jnp.asarray(rng.normal(size=(1, 64, 4, 64)), jnp.bfloat16)
  g = dy.astype(jnp.float32).reshape(1, 64, 2, 2, 64).sum(3)
  want = jax.vjp(lambda a: l2_normalize(a.astype(jnp.float32)), x)[1](g)[0]
  got = key_head_grads(x, dy, block=16, normalized=True, interpret=True)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=8e-3, atol=1e-3)


def test_rejects_mismatched_shapes():
  x = jnp.zeros((1, 64, 2, 32))
  with pytest.raises(ValueError, match="value heads a multiple of key heads"):
    key_head_grads(x, jnp.zeros((1, 64, 3, 32)), block=32, normalized=True, interpret=True)
  with pytest.raises(ValueError, match="multiple of the block 48"):
    key_head_grads(x, jnp.zeros((1, 64, 4, 32)), block=48, normalized=True, interpret=True)
