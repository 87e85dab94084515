"""The fused GPU chunk-algebra kernels (gpu_chunk.py) against chunking.prepare_chunks and its jax.vjp.

Interpret mode on CPU (exact float32: interpret mode has no TF32); compiled on a GPU with -m device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.kernels import dispatch
from maxtext.kernels.gated_delta_rule import ChunkOptions, _chunked, chunk_gated_delta_rule
from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule_reference
from maxtext.kernels.gated_delta_rule.chunking import ChunkInputs, prepare_chunks
from maxtext.kernels.gated_delta_rule.gpu_chunk import prepare_chunks_gpu, prepare_chunks_gpu_backward

# batch, length, key heads, value heads, key dim, value dim, chunk; packed; l2 norm and scale
CASES = [
    ((2, 100, 2, 4, 16, 16, 32), False, (True, None)),  # groups of 2, ragged tail, B > 1
    ((1, 40, 1, 1, 32, 16, 16), True, (True, None)),  # one value head per key head, packed documents
    ((1, 48, 1, 2, 16, 32, 16), True, (False, 0.3)),  # no l2 norm, explicit scale, Dk != Dv
]
CASE_IDS = ["grouped_ragged", "packed_g1", "packed_no_l2norm"]


def relative_error(ours, reference) -> float:
  """max|a - b| / max|b| (absolute where b is all zero, e.g. the decays of chunks that all start a document)."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1.0 if not reference.any() else 0.0))


def random_inputs(seed, batch, length, key_heads, value_heads, key_dim, value_dim, packed, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (batch, length, key_heads, key_dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, key_heads, key_dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, value_heads, value_dim), dtype)
  g = -jnp.exp(jax.random.normal(keys[3], (batch, length, value_heads))) * 0.5
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (batch, length, value_heads))).astype(dtype)
  segment_ids = None
  if packed:  # documents of 3, 30, the rest and 5 tokens: boundaries inside chunks, one chunk inside a document
    lengths = [3, 30, length - 38, 5]
    segment_ids = jnp.asarray(np.repeat(np.arange(4), lengths)[None].repeat(batch, 0), jnp.int32)
  return (q, k, v, g, beta), segment_ids


def reference_and_vjp(inputs, segment_ids, chunk, l2norm, scale):
  prepare = lambda *x: prepare_chunks(*x, segment_ids, chunk_size=chunk, use_qk_l2norm=l2norm, scale=scale,
                                      solve="inverse")
  return jax.vjp(prepare, *(x.astype(jnp.float32) for x in inputs))


def random_cotangents(chunks: ChunkInputs) -> ChunkInputs:
  keys = jax.random.split(jax.random.key(7), len(chunks))
  return ChunkInputs(*(jax.random.normal(key, x.shape) for key, x in zip(keys, chunks)))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_backward_match_prepare_chunks(case):
  """float32 inputs in 'ieee' mode: every ChunkInputs field and every input gradient to < 1e-5."""
  (*dims, chunk), packed, (l2norm, scale) = case
  inputs, segment_ids = random_inputs(0, *dims, packed)
  options = dict(chunk_size=chunk, use_qk_l2norm=l2norm, scale=scale, interpret=True)
  reference, vjp = reference_and_vjp(inputs, segment_ids, chunk, l2norm, scale)
  ours = prepare_chunks_gpu(*inputs, segment_ids, **options)
  for name, a, b in zip(ChunkInputs._fields, ours, reference):
    assert a.shape == b.shape and a.dtype == jnp.float32, name
    assert relative_error(a, b) < 1e-5, name
  cotangents = random_cotangents(reference)
  grads = prepare_chunks_gpu_backward(*inputs, segment_ids, cotangents, **options)
  for name, a, b, x in zip(("q", "k", "v", "g", "beta"), grads, vjp(cotangents), inputs):
    assert a.shape == x.shape and a.dtype == x.dtype, name
    assert relative_error(a, b) < 1e-5, name


def test_bf16_mode_stores_bf16_within_bf16_rounding():
  """bf16 inputs, 'bf16' dots: the big outputs and gradients in bf16, within the gpu.py tests' 1e-2 of float32."""
  inputs, _ = random_inputs(1, 1, 64, 1, 2, 32, 32, False, jnp.bfloat16)
  options = dict(chunk_size=32, precision="bf16", interpret=True)
  reference, vjp = reference_and_vjp(inputs, None, 32, True, None)
  ours = prepare_chunks_gpu(*inputs, None, **options)
  for name, a, b in zip(ChunkInputs._fields, ours, reference):
    assert a.dtype == (jnp.float32 if name == "decay" else jnp.bfloat16), name
    assert relative_error(a, b) < 1e-2, name
  cotangents = random_cotangents(reference)
  grads = prepare_chunks_gpu_backward(*inputs, None, jax.tree.map(lambda x, y: x.astype(y.dtype), cotangents, ours),
                                      **options)
  for name, a, b, x in zip(("q", "k", "v", "g", "beta"), grads, vjp(cotangents), inputs):
    assert a.dtype == x.dtype, name
    assert relative_error(a, b) < 1e-2, name


def test_rejects_dims_triton_cannot_tile():
  inputs, _ = random_inputs(0, 1, 32, 1, 1, 24, 16, False)
  with pytest.raises(ValueError, match="key_dim=24 must be a power of two >= 16"):
    prepare_chunks_gpu(*inputs, chunk_size=16, interpret=True)


def test_fused_path_matches_reference_through_the_vjp():
  """ChunkOptions(fused_prepare=True): the fused kernels then the inter-chunk kernels under one custom vjp:
  outputs, final state and every gradient against the jnp reference (the default unfused path is covered by
  tests/kernels/test_gated_delta_rule.py)."""
  fused = True
  (q, k, v, g, beta), segment_ids = random_inputs(3, 1, 40, 1, 2, 16, 16, True)
  state = jax.random.normal(jax.random.key(4), (1, 2, 16, 16))
  options = ChunkOptions("inverse", fused_prepare=fused)

  def loss(run, *args):
    out, final = run(*args)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(final * jnp.sin(final)), (out, final)

  ours = lambda *a: _chunked(*a, segment_ids=segment_ids, chunk_size=16, use_qk_l2norm=True, scale=None,
                             impl="gpu", interpret=True, options=options)
  reference = lambda *a: chunk_gated_delta_rule_reference(*a, segment_ids=segment_ids, chunk_size=16)
  args = (q, k, v, g, beta, state)
  (grads, (out, final)), (ref_grads, (ref_out, ref_final)) = (
      jax.grad(functools.partial(loss, run), argnums=tuple(range(6)), has_aux=True)(*args)
      for run in (ours, reference))
  assert relative_error(out, ref_out) < 1e-5 and relative_error(final, ref_final) < 1e-5
  for name, a, b in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, ref_grads):
    assert relative_error(a, b) < 1e-5, name


def test_auto_on_gpu_runs_xla_for_sizes_triton_cannot_tile(monkeypatch):
  """Dk = 8: impl='auto' on a GPU picks 'xla' (the Triton kernels would refuse it), and matches the reference."""
  monkeypatch.setattr(dispatch, "backend", lambda: "gpu")
  (q, k, v, g, beta), _ = random_inputs(2, 1, 40, 1, 2, 8, 16, False)
  expected, expected_state = chunk_gated_delta_rule_reference(q, k, v, g, beta, chunk_size=16)
  out, state = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16)
  assert relative_error(out, expected) < 1e-5 and relative_error(state, expected_state) < 1e-5
  with pytest.raises(ValueError, match="key_dim=8 must be a power of two >= 16"):
    chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, impl="gpu")


# On a GPU: production chunk and head sizes, compiled, against prepare_chunks in float32 (errors are of the dot
# precision: TF32 rounds operands to 2^-11, bf16 to 2^-9; the gpu.py tests measured ~5e-4 and ~4e-3).
DEVICE_TOLERANCE = {"ieee": 1e-5, "tf32": 3e-3, "bf16": 1e-2}


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_compiled_on_gpu_matches_prepare_chunks(precision, packed):
  dtype = jnp.float32 if precision == "ieee" else jnp.bfloat16
  inputs, segment_ids = random_inputs(4, 2, 1024, 2, 4, 128, 128, False, dtype)
  if packed:
    segment_ids = jnp.asarray(np.repeat(np.arange(5), [100, 300, 1, 500, 123])[None].repeat(2, 0), jnp.int32)
  tolerance = DEVICE_TOLERANCE[precision]
  reference, vjp = reference_and_vjp(inputs, segment_ids, 64, True, None)
  ours = prepare_chunks_gpu(*inputs, segment_ids, chunk_size=64, precision=precision)
  for name, a, b in zip(ChunkInputs._fields, ours, reference):
    assert relative_error(a, b) < tolerance, name
  cotangents = random_cotangents(reference)
  grads = prepare_chunks_gpu_backward(*inputs, segment_ids, cotangents, chunk_size=64, precision=precision)
  for name, a, b in zip(("q", "k", "v", "g", "beta"), grads, vjp(cotangents)):
    assert relative_error(a, b) < tolerance, name
