"""The Pallas decode kernels of the gated delta rule (interpret mode on CPU) against the jnp token recurrence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.kernels.gated_delta_rule.recurrent_kernels import (
    recurrent_gated_delta_rule_gpu,
    recurrent_gated_delta_rule_tpu,
)
from maxtext.kernels.gated_delta_rule.reference import recurrent_gated_delta_rule_reference

_reference = jax.jit(recurrent_gated_delta_rule_reference, static_argnames="use_qk_l2norm")

KERNELS = {"tpu": recurrent_gated_delta_rule_tpu, "gpu": recurrent_gated_delta_rule_gpu}
CASES = [
    # tokens, batch, key heads, value heads, key dim, value dim, initial state, dtype
    (1, 2, 2, 4, 16, 16, True, "float32"),  # one decode step, grouped value heads
    (3, 2, 2, 2, 32, 64, False, "float32"),  # a few tokens, one value head per key head, Dk != Dv
    (3, 2, 2, 4, 32, 64, True, "float32"),  # a few tokens, grouped, carried state
    # bfloat16 inputs, checked against the reference on the same rounded inputs
    (3, 2, 1, 2, 16, 16, True, "bfloat16"),
    (1, 3, 2, 2, 32, 64, False, "bfloat16"),
    (19, 2, 1, 2, 16, 32, True, "float32"),  # a prompt chunk: past the GPU kernel's unrolled length, it loops
]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-3}


def random_inputs(seed: int, length, batch, key_heads, value_heads, key_dim, value_dim, with_state, dtype):
  """q, k, v, g (log decay < 0), beta in (0, 1) in `dtype`; a float32 state or None (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  q, k = normal(batch, length, key_heads, key_dim), normal(batch, length, key_heads, key_dim)
  v = normal(batch, length, value_heads, value_dim)
  g = -np.exp(normal(batch, length, value_heads)) * 0.5
  beta = 1 / (1 + np.exp(-normal(batch, length, value_heads)))
  state = jnp.asarray(normal(batch, value_heads, key_dim, value_dim)) if with_state else None
  return *(jnp.asarray(x, dtype) for x in (q, k, v, g, beta)), state


@functools.cache
def case_data(case: tuple) -> tuple[tuple, tuple[jax.Array, jax.Array]]:
  """Inputs and reference results of one case, shared by both kernels' tests."""
  inputs = random_inputs(sum(case[:6]), *case)
  return inputs, _reference(*inputs)


def relative_error(ours, reference) -> float:
  reference = np.asarray(reference, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("impl", sorted(KERNELS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-B{}-Hk{}-Hv{}-Dk{}-Dv{}-state{}-{}".format(*c))
def test_matches_reference(impl, case):
  inputs, (ref_out, ref_state) = case_data(case)
  out, final_state = KERNELS[impl](*inputs, interpret=True)
  assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
  assert final_state.shape == ref_state.shape and final_state.dtype == jnp.float32
  tolerance = TOLERANCE[case[-1]]
  assert relative_error(out, ref_out) < tolerance
  assert relative_error(final_state, ref_state) < tolerance


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_without_l2norm_matches_reference(impl):
  # Unit-norm-ish inputs keep the un-normalised recurrence bounded; q is still scaled by Dk**-0.5.
  q, k, v, g, beta, state = random_inputs(7, *CASES[0])
  q, k = q / 4, k / 4
  out, final_state = KERNELS[impl](q, k, v, g, beta, state, use_qk_l2norm=False, interpret=True)
  ref_out, ref_state = _reference(q, k, v, g, beta, state, use_qk_l2norm=False)
  assert relative_error(out, ref_out) < 1e-5
  assert relative_error(final_state, ref_state) < 1e-5


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_token_by_token_equals_one_call(impl):
  """Feeding the final state back one token at a time gives what one T-token call gives (decode vs verify)."""
  q, k, v, g, beta, state = random_inputs(11, *CASES[2])
  kernel = KERNELS[impl]
  out, final_state = kernel(q, k, v, g, beta, state, interpret=True)
  step_state, step_outs = state, []
  for t in range(q.shape[1]):
    token = slice(t, t + 1)
    step_out, step_state = kernel(q[:, token], k[:, token], v[:, token], g[:, token], beta[:, token], step_state,
                                  interpret=True)
    step_outs.append(step_out)
  assert relative_error(jnp.concatenate(step_outs, axis=1), out) < 1e-6
  assert relative_error(step_state, final_state) < 1e-6


def test_gpu_rejects_head_dims_triton_cannot_tile():
  q, k, v, g, beta, state = random_inputs(0, 1, 1, 1, 1, 24, 16, False, "float32")
  with pytest.raises(ValueError, match="key_dim=24 must be a power of two >= 16"):
    recurrent_gated_delta_rule_gpu(q, k, v, g, beta, state, interpret=True)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_dispatcher_runs_the_kernels(impl):
  from maxtext.kernels.gated_delta_rule import recurrent_gated_delta_rule

  keys = jax.random.split(jax.random.key(7), 6)
  q, k = (jax.random.normal(key, (2, 2, 1, 16)) for key in keys[:2])
  v = jax.random.normal(keys[2], (2, 2, 2, 16))
  g = -jnp.exp(jax.random.normal(keys[3], (2, 2, 2))) * 0.5
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (2, 2, 2)))
  state = jax.random.normal(keys[5], (2, 2, 16, 16))
  o, final = recurrent_gated_delta_rule(q, k, v, g, beta, state, impl=impl)
  o_ref, final_ref = recurrent_gated_delta_rule(q, k, v, g, beta, state, impl="reference")
  assert float(jnp.abs(o - o_ref).max() / jnp.abs(o_ref).max()) < 1e-5
  assert float(jnp.abs(final - final_ref).max() / jnp.abs(final_ref).max()) < 1e-5
