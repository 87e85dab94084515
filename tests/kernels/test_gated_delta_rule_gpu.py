"""The Pallas GPU (Triton) inter-chunk kernels against their jnp twin: interpret mode on CPU, compiled on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.kernels.gated_delta_rule.chunking import prepare_chunks
from maxtext.kernels.gated_delta_rule.gpu import GpuBlockSizes, inter_chunk_backward_gpu, inter_chunk_forward_gpu
from maxtext.kernels.gated_delta_rule.inter_chunk import inter_chunk_backward, inter_chunk_forward

SHAPES = [
    # batch, heads, chunks, chunk size, key dim, value dim
    (2, 2, 1, 16, 16, 16),  # a single chunk: no carried state
    (2, 3, 3, 16, 32, 64),  # key dim != value dim; 2 value blocks of 32
    (1, 2, 3, 64, 128, 128),  # production chunk size and head dims: 4 value blocks, 2 key blocks
]
# (shape, input dtype, precision). Every shape in IEEE float32; float32 inputs with TF32 dots; bfloat16 inputs
# (against the reference on the same rounded inputs) with every dot operand rounded to bf16 (the 16-bit default).
CASES = [(shape, "float32", "ieee") for shape in SHAPES] + [
    (SHAPES[1], "float32", "tf32"),
    (SHAPES[1], "bfloat16", "bf16"),
    (SHAPES[2], "bfloat16", "bf16"),
]
# Rounding the float32 operands (state, v_new, gradients) to bf16 costs ~1 bf16 ulp (2^-9) per dot operand:
# measured 1e-3..4e-3 here (largest in dk and dw, whose dots round both operands), so 1e-2. TF32 rounds to 2^-11:
# ~5e-4 measured end to end, so 3e-3 (interpret mode has no TF32 and runs IEEE float32: exact there).
TOLERANCE = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 3e-3, "bf16": 1e-2}
# On a GPU also TF32x3 and a longer production-like shape in every mode.
DEVICE_CASES = CASES + [(SHAPES[1], "float32", "tf32x3")] + [
    ((1, 4, 16, 64, 128, 128), dtype, precision)
    for dtype, precision in (("float32", "ieee"), ("float32", "tf32"), ("float32", "tf32x3"), ("bfloat16", "bf16"))
]
# Jitted once per shape (eager scans would retrace on every call).
reference_forward, reference_backward = jax.jit(inter_chunk_forward), jax.jit(inter_chunk_backward)
prepare = jax.jit(prepare_chunks, static_argnames="chunk_size")


def case_id(case) -> str:
  shape, dtype, precision = case
  return "x".join(map(str, shape)) + f"-{dtype}-{precision}"


def relative_error(ours, reference) -> float:
  reference = np.asarray(reference, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


def random_inputs(seed: int, shape: tuple[int, ...], dtype: str) -> dict[str, jax.Array]:
  """Recurrence inputs as the model makes them (prepare_chunks on random q, k, v, gates), cast to `dtype`.

  Unit-norm keys and the WY form keep the state bounded over many chunks (entries of k, w ~ 0.1-0.3, decays in
  (0, 1]); independent normal k and w would instead grow the state several-fold per chunk at Dk = 128.
  """
  rng = np.random.default_rng(seed)
  b, h, n, c, dk, dv = shape
  normal = lambda *dims: jnp.asarray(rng.standard_normal(dims), jnp.float32)
  g = jnp.asarray(-rng.uniform(0.001, 0.05, (b, n * c, h)), jnp.float32)  # log decay per token
  beta = jax.nn.sigmoid(normal(b, n * c, h))
  chunks = prepare(normal(b, n * c, h, dk), normal(b, n * c, h, dk), normal(b, n * c, h, dv), g, beta, chunk_size=c)
  cast = lambda x: x.astype(dtype)
  return dict(
      q=cast(chunks.q), k=cast(chunks.k), w=cast(chunks.w), u=cast(chunks.u), intra=cast(chunks.intra),
      decay=chunks.decay, h0=cast(normal(b, h, dk, dv)), d_out=cast(normal(b, h, n, c, dv)),
      d_final_state=normal(b, h, dk, dv),
  )


def forward_args(x: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  return x["q"], x["k"], x["w"], x["u"], x["intra"], x["decay"], x["h0"]


def backward_args(x: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  fwd = reference_forward(*forward_args(x))  # the residuals, from the reference
  return x["q"], x["k"], x["w"], x["intra"], x["decay"], fwd.states, fwd.v_new, x["d_out"], x["d_final_state"]


# Stored in the 16-bit input dtype in 'bf16' mode (gpu.py's module docstring); float32 otherwise.
STORED = {"out", "states", "v_new", "dq", "dk", "dw", "du", "dintra"}


def assert_close(ours, reference, tolerance: float, dtype: str, precision: str) -> None:
  for name, a, b in zip(reference._fields, ours, reference):
    expected = dtype if precision == "bf16" and name in STORED else "float32"
    assert a.shape == b.shape and a.dtype == expected, (name, a.shape, a.dtype, b.shape)
    error = relative_error(a, b)
    assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e}"


def check_forward(case, interpret: bool) -> None:
  shape, dtype, precision = case
  args = forward_args(random_inputs(sum(shape), shape, dtype))
  ours = inter_chunk_forward_gpu(*args, interpret=interpret, precision=precision)
  assert_close(ours, reference_forward(*args), TOLERANCE[precision], dtype, precision)


def check_backward(case, interpret: bool) -> None:
  shape, dtype, precision = case
  args = backward_args(random_inputs(sum(shape) + 1, shape, dtype))
  ours = inter_chunk_backward_gpu(*args, interpret=interpret, precision=precision)
  assert_close(ours, reference_backward(*args), TOLERANCE[precision], dtype, precision)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_reference(case):
  check_forward(case, interpret=True)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_reference(case):
  check_backward(case, interpret=True)


def test_fused_output_forward_matches_reference():
  """The forward with out computed inside the recurrence (GpuBlockSizes.fuse_output) instead of its own kernel."""
  shape, dtype, precision = SHAPES[1], "float32", "ieee"
  args = forward_args(random_inputs(7, shape, dtype))
  ours = inter_chunk_forward_gpu(*args, interpret=True, precision=precision,
                                 block_sizes=GpuBlockSizes(fuse_output=True))
  assert_close(ours, reference_forward(*args), TOLERANCE[precision], dtype, precision)


@pytest.mark.parametrize("sizes", [dict(key_dim=24), dict(value_dim=8), dict(block_v=48)], ids=str)
def test_rejects_dims_triton_cannot_tile(sizes):
  b, h, n, c = 1, 1, 2, 16
  dk, dv = sizes.get("key_dim", 16), sizes.get("value_dim", 64)
  zeros = lambda *dims: jnp.zeros(dims, jnp.float32)
  qkw = (zeros(b, h, n, c, dk),) * 3
  args = qkw + (zeros(b, h, n, c, dv), zeros(b, h, n, c, c), zeros(b, h, n), zeros(b, h, dk, dv))
  name = next(iter(sizes))
  with pytest.raises(ValueError, match=f"{name}={sizes[name]} must be a power of two >= 16"):
    inter_chunk_forward_gpu(*args, interpret=True, block_sizes=GpuBlockSizes(block_v=sizes.get("block_v", 32)))


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("case", DEVICE_CASES, ids=case_id)
def test_compiled_on_gpu_matches_reference(case):
  """The same checks through the real Triton lowering, plus TF32x3 and a longer production-like shape."""
  check_forward(case, interpret=False)
  check_backward(case, interpret=False)
