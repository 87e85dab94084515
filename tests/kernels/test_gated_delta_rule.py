"""Every chunked gated delta rule implementation against the jnp reference: values and gradients.

The Pallas kernels run in interpret mode on the CPU. Packed sequences are also checked against running each
document alone, which does not depend on the reference's own segment handling.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_reference

# (impl, GPU dot precision): the GPU kernels' 16-bit default rounds dot operands to bf16 as fla does, their 'tf32'
# mode keeps float32 arithmetic (IEEE in interpret mode); see tests/kernels/test_gated_delta_rule_gpu.py.
IMPLS = [("xla", None), ("tpu", None), ("gpu", "tf32"), ("gpu", None)]
IMPL_IDS = ["xla", "tpu", "gpu_tf32", "gpu"]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-3}
BF16_DOTS_TOLERANCE = 1e-2  # ~1 bf16 ulp (2^-9) per rounded operand; the GPU test file explains it


def tolerance(impl, precision, dtype) -> float:
  gpu_bf16_dots = impl == "gpu" and precision is None and dtype == jnp.bfloat16
  return BF16_DOTS_TOLERANCE if gpu_bf16_dots else TOLERANCE[dtype]


def random_inputs(seed, batch, length, key_heads, value_heads, key_dim, value_dim, dtype, with_state):
  keys = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(keys[0], (batch, length, key_heads, key_dim))
  k = jax.random.normal(keys[1], (batch, length, key_heads, key_dim))
  v = jax.random.normal(keys[2], (batch, length, value_heads, value_dim))
  g = -jnp.exp(jax.random.normal(keys[3], (batch, length, value_heads))) * 0.5
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, length, value_heads)))
  state = jax.random.normal(keys[5], (batch, value_heads, key_dim, value_dim)) if with_state else None
  cast = lambda x: x.astype(dtype)
  return cast(q), cast(k), cast(v), cast(g), cast(beta), state


def relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def values_and_grads(fn, q, k, v, g, beta, state, segment_ids, chunk_size):
  """(o, final state) and the gradients of a random projection of both w.r.t. every input."""
  with_state = state is not None
  if state is None:
    state = jnp.zeros((q.shape[0], v.shape[2], q.shape[3], v.shape[3]), jnp.float32)
  cot_keys = jax.random.split(jax.random.key(99), 2)
  cot_out = jax.random.normal(cot_keys[0], v.shape, jnp.float32)
  cot_state = jax.random.normal(cot_keys[1], state.shape, jnp.float32)

  def loss(q, k, v, g, beta, state):
    o, final = fn(q, k, v, g, beta, state if with_state else None, segment_ids=segment_ids, chunk_size=chunk_size)
    return jnp.sum(o.astype(jnp.float32) * cot_out) + jnp.sum(final * cot_state), (o, final)

  grads, (o, final) = jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(q, k, v, g, beta, state)
  return (o, final), grads


# batch, length, key heads, value heads, key dim, value dim, chunk; dtype; initial state
CASES = [
    ((2, 100, 2, 4, 16, 16, 64), jnp.float32, False),  # ragged tail, grouped value heads, B > 1
    ((1, 40, 1, 2, 16, 32, 64), jnp.float32, True),  # shorter than one chunk, Dk != Dv
    ((2, 80, 2, 2, 32, 16, 16), jnp.bfloat16, True),  # several chunks plus a tail
    ((1, 130, 1, 2, 16, 16, 64), jnp.bfloat16, False),
]
CASE_IDS = ["ragged_f32", "short_state_f32", "chunks_state_bf16", "ragged_bf16"]


@functools.cache
def reference_case(index):
  shape, dtype, with_state = CASES[index]
  *dims, chunk = shape
  inputs = random_inputs(index, *dims, dtype, with_state)
  return inputs, values_and_grads(chunk_gated_delta_rule_reference, *inputs, None, chunk)


@pytest.mark.parametrize("impl, precision", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_matches_reference(impl, precision, case):
  (_, dtype, with_state), chunk = CASES[case], CASES[case][0][-1]
  inputs, ((o_ref, final_ref), grads_ref) = reference_case(case)
  kernel = lambda *a, **kw: chunk_gated_delta_rule(*a, impl=impl, gpu_precision=precision, **kw)
  (o, final), grads = values_and_grads(kernel, *inputs, None, chunk)
  tolerance_ = tolerance(impl, precision, dtype)
  assert o.dtype == o_ref.dtype == dtype
  assert relative_error(o, o_ref) < tolerance_
  assert relative_error(final, final_ref) < tolerance_
  names = ["q", "k", "v", "g", "beta", "initial_state"][: 6 if with_state else 5]
  for name, grad, grad_ref in zip(names, grads, grads_ref):
    assert grad.dtype == grad_ref.dtype, name
    assert relative_error(grad, grad_ref) < tolerance_, name


def packed_documents(lengths, seed):
  """A [1, sum(lengths)] packed row and its segment ids."""
  total = sum(lengths)
  inputs = random_inputs(seed, 1, total, 2, 4, 16, 16, jnp.float32, True)
  segment_ids = jnp.asarray(np.repeat(np.arange(1, len(lengths) + 1), lengths)[None], jnp.int32)
  return inputs, segment_ids


@pytest.mark.parametrize(
    "impl, lengths",
    [("reference", (37, 64, 27)), ("reference", (5, 3, 80, 1))] + [(impl, (5, 3, 80, 1)) for impl in
                                                                     ("xla", "tpu", "gpu")],
)
def test_packed_batch_equals_documents_alone(impl, lengths):
  (q, k, v, g, beta, state), segment_ids = packed_documents(lengths, seed=len(lengths))
  run = lambda *a, **kw: chunk_gated_delta_rule(*a, impl=impl, chunk_size=32, **kw)
  packed_out, packed_final = run(q, k, v, g, beta, state, segment_ids=segment_ids)
  start = 0
  for index, length in enumerate(lengths):
    piece = lambda x: x[:, start : start + length]
    # The initial state belongs to the first document only.
    doc_state = state if index == 0 else None
    alone_out, alone_final = chunk_gated_delta_rule_reference(
        *(piece(x) for x in (q, k, v, g, beta)), doc_state, chunk_size=32
    )
    assert relative_error(piece(packed_out), alone_out) < 1e-5, f"document {index}"
    start += length
  assert relative_error(packed_final, alone_final) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "tpu", "gpu"])
def test_packed_gradients_match_reference(impl):
  (q, k, v, g, beta, state), segment_ids = packed_documents((37, 64, 27), seed=5)
  kernel = lambda *a, **kw: chunk_gated_delta_rule(*a, impl=impl, **kw)
  (o, final), grads = values_and_grads(kernel, q, k, v, g, beta, state, segment_ids, 32)
  (o_ref, final_ref), grads_ref = values_and_grads(
      chunk_gated_delta_rule_reference, q, k, v, g, beta, state, segment_ids, 32
  )
  assert relative_error(o, o_ref) < 1e-5
  for name, grad, grad_ref in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, grads_ref):
    assert relative_error(grad, grad_ref) < 1e-5, name


def test_shape_errors_name_the_argument():
  q, k, v, g, beta, _ = random_inputs(0, 1, 8, 2, 4, 8, 8, jnp.float32, False)
  with pytest.raises(ValueError, match="beta must be"):
    chunk_gated_delta_rule(q, k, v, g, beta[..., :2])
  with pytest.raises(ValueError, match="segment_ids must be"):
    chunk_gated_delta_rule(q, k, v, g, beta, segment_ids=jnp.zeros((1, 7), jnp.int32))


def test_unknown_impl_is_refused():
  q, k, v, g, beta, _ = random_inputs(0, 1, 8, 2, 4, 8, 8, jnp.float32, False)
  with pytest.raises(ValueError, match="unknown gated_delta_rule implementation 'cuda'"):
    chunk_gated_delta_rule(q, k, v, g, beta, impl="cuda")
