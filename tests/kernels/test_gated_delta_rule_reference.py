"""The jnp chunked and recurrent gated delta rules against a float64 numpy token-by-token recurrence."""

import numpy as np
import pytest

from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule_reference, recurrent_gated_delta_rule_reference


def numpy_recurrence(q, k, v, g, beta, initial_state):
  """float64, one token at a time, with the model's l2-norm of q, k and 1/sqrt(dk) scaling."""
  q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
  batch, length, key_heads, key_dim = q.shape
  value_heads = v.shape[2]
  group = value_heads // key_heads
  normalise = lambda x: x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
  q, k = normalise(q) / np.sqrt(key_dim), normalise(k)
  state = np.array(initial_state, np.float64)
  out = np.zeros(v.shape, np.float64)
  for b in range(batch):
    for h in range(value_heads):
      s = state[b, h]
      for t in range(length):
        q_t, k_t = q[b, t, h // group], k[b, t, h // group]
        s = np.exp(g[b, t, h]) * s
        s = s + np.outer(k_t, beta[b, t, h] * (v[b, t, h] - s.T @ k_t))
        out[b, t, h] = s.T @ q_t
      state[b, h] = s
  return out, state


def random_inputs(rng, batch, length, key_heads, value_heads, key_dim, value_dim, with_state):
  f32 = lambda x: x.astype(np.float32)
  q = f32(rng.standard_normal((batch, length, key_heads, key_dim)))
  k = f32(rng.standard_normal((batch, length, key_heads, key_dim)))
  v = f32(rng.standard_normal((batch, length, value_heads, value_dim)))
  g = f32(-np.exp(rng.standard_normal((batch, length, value_heads))) * 0.5)
  beta = f32(1.0 / (1.0 + np.exp(-rng.standard_normal((batch, length, value_heads)))))
  state = rng.standard_normal((batch, value_heads, key_dim, value_dim)) if with_state else None
  return q, k, v, g, beta, None if state is None else f32(state)


def relative_error(ours, reference):
  return np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max()


SHAPES = [
    # batch, length, key heads, value heads, key dim, value dim, chunk
    (1, 64, 1, 1, 16, 16, 64),
    (2, 100, 2, 4, 16, 8, 64),  # ragged tail, grouped value heads, B > 1
    (1, 23, 2, 2, 8, 16, 64),  # shorter than one chunk
    (2, 77, 1, 3, 32, 16, 16),  # several chunks plus a tail
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_chunked_matches_float64_recurrence(shape, with_state):
  *dims, chunk = shape
  inputs = random_inputs(np.random.default_rng(sum(shape)), *dims, with_state)
  q, k, v, g, beta, state = inputs
  zero = np.zeros((dims[0], dims[3], dims[4], dims[5]))
  expected_out, expected_state = numpy_recurrence(q, k, v, g, beta, zero if state is None else state)
  out, final_state = chunk_gated_delta_rule_reference(q, k, v, g, beta, state, chunk_size=chunk)
  assert out.shape == v.shape and out.dtype == np.float32
  assert final_state.shape == expected_state.shape
  assert relative_error(out, expected_out) < 1e-5
  assert relative_error(final_state, expected_state) < 1e-5


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_recurrent_matches_float64_recurrence(with_state):
  dims = (2, 37, 2, 4, 16, 8)
  q, k, v, g, beta, state = random_inputs(np.random.default_rng(7), *dims, with_state)
  zero = np.zeros((2, 4, 16, 8))
  expected_out, expected_state = numpy_recurrence(q, k, v, g, beta, zero if state is None else state)
  out, final_state = recurrent_gated_delta_rule_reference(q, k, v, g, beta, state)
  assert relative_error(out, expected_out) < 1e-5
  assert relative_error(final_state, expected_state) < 1e-5


def test_chunked_prefill_then_recurrent_steps_continue_the_sequence():
  """Final state of a chunked prefix + recurrent steps equals one pass over the whole sequence."""
  q, k, v, g, beta, _ = random_inputs(np.random.default_rng(3), 1, 70, 2, 4, 16, 16, False)
  full, full_state = chunk_gated_delta_rule_reference(q, k, v, g, beta)
  split = 66
  _, prefix_state = chunk_gated_delta_rule_reference(*(x[:, :split] for x in (q, k, v, g, beta)))
  tail, tail_state = recurrent_gated_delta_rule_reference(*(x[:, split:] for x in (q, k, v, g, beta)), prefix_state)
  np.testing.assert_allclose(tail, full[:, split:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tail_state, full_state, rtol=1e-5, atol=1e-5)


def test_rejects_value_heads_not_a_multiple_of_key_heads():
  q, k, v, g, beta, _ = random_inputs(np.random.default_rng(0), 1, 8, 2, 3, 8, 8, False)
  with pytest.raises(ValueError, match="Hv a multiple of 2"):
    chunk_gated_delta_rule_reference(q, k, v, g, beta)
