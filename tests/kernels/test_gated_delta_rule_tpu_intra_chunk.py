"""The Pallas TPU intra-chunk kernels (interpret mode on CPU) against their jnp twin, values and gradients.

The twin is chunking.prepare_chunks differentiated by JAX; the kernels' backward is hand-written. The last test runs
the whole 'tpu' op (these kernels + the recurrence kernels) on a ragged, packed batch with an initial state against
the reference op.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_reference
from maxtext.kernels.gated_delta_rule.chunking import prepare_chunks
from maxtext.kernels.gated_delta_rule.tpu_intra_chunk import prepare_chunks_tpu
from tests.kernels.test_gated_delta_rule import random_inputs, relative_error, values_and_grads

# Both sides compute in float32 from the same inputs; bfloat16 gradients are rounded to bfloat16 on both sides,
# where one rounding apart is 2^-8 of the largest entry at most.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2**-8}


def packed_ids(batch: int, lengths: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.repeat(np.arange(3, 3 + len(lengths)), lengths)[None].repeat(batch, 0), jnp.int32)


# (batch, length, key heads, value heads, key dim, value dim, chunk), dtype, document lengths (None: unpacked),
# l2 norm of q and k
CASES = {
    "ragged_grouped": ((2, 100, 2, 4, 16, 16, 32), jnp.float32, None, True),
    "packed_dk_ne_dv": ((1, 70, 1, 2, 16, 32, 16), jnp.float32, (9, 1, 45, 15), True),
    "packed_lane_blocks": ((1, 40, 2, 2, 128, 128, 16), jnp.float32, (17, 23), True),  # [B, T, H * D] reads
    "bf16_group_of_3_no_l2norm": ((1, 48, 1, 3, 16, 16, 16), jnp.bfloat16, None, False),
}


@functools.cache
def case(name: str):
  """((kernel outputs, kernel grads), (twin outputs, twin grads)) of one case, compiled once."""
  shape, dtype, lengths, l2norm = CASES[name]
  *dims, chunk = shape
  q, k, v, g, beta, _ = random_inputs(len(name), *dims, dtype, False)
  segment_ids = None if lengths is None else packed_ids(dims[0], lengths)
  kwargs = dict(chunk_size=chunk, use_qk_l2norm=l2norm)
  results = []
  for prepare in (functools.partial(prepare_chunks_tpu, interpret=True), prepare_chunks):
    def run(q, k, v, g, beta, prepare=prepare):
      out, vjp = jax.vjp(lambda *x: prepare(*x, segment_ids, **kwargs), q, k, v, g, beta)
      # Random cotangents for every output (decay included), the same for both sides.
      keys = jax.random.split(jax.random.key(7), len(out))
      return out, vjp(type(out)(*(jax.random.normal(key, x.shape) for key, x in zip(keys, out))))
    results.append(jax.jit(run)(q, k, v, g, beta))
  return results, dtype


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_jnp_twin(name):
  ((out, _), (out_ref, _)), dtype = case(name)
  for field, ours, theirs in zip(out_ref._fields, out, out_ref):
    assert ours.shape == theirs.shape and ours.dtype == jnp.float32, field
    assert relative_error(ours, theirs) < TOLERANCE[jnp.float32], field


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_jnp_twin(name):
  ((_, grads), (_, grads_ref)), dtype = case(name)
  for field, ours, theirs in zip(["q", "k", "v", "g", "beta"], grads, grads_ref):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == dtype, field
    assert relative_error(ours, theirs) < TOLERANCE[dtype], field


def test_tpu_op_on_ragged_packed_batch_with_initial_state():
  q, k, v, g, beta, state = random_inputs(3, 2, 75, 2, 4, 16, 16, jnp.float32, True)
  segment_ids = packed_ids(2, (30, 40, 5))
  tpu = lambda *a, **kw: chunk_gated_delta_rule(*a, impl="tpu", **kw)
  (o, final), grads = values_and_grads(tpu, q, k, v, g, beta, state, segment_ids, 16)
  (o_ref, final_ref), grads_ref = values_and_grads(
      chunk_gated_delta_rule_reference, q, k, v, g, beta, state, segment_ids, 16)
  assert relative_error(o, o_ref) < 1e-5 and relative_error(final, final_ref) < 1e-5
  for name, grad, grad_ref in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, grads_ref):
    assert relative_error(grad, grad_ref) < 1e-5, name


def test_unsupported_chunk_size_is_named():
  q, k, v, g, beta, _ = random_inputs(0, 1, 8, 1, 1, 8, 8, jnp.float32, False)
  with pytest.raises(ValueError, match="chunk_size=12 must be a power of two"):
    prepare_chunks_tpu(q, k, v, g, beta, chunk_size=12, interpret=True)
