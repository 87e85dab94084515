"""Grouped matmul kernels (interpret mode on CPU) against jax.lax.ragged_dot and float64 numpy."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from maxtext.kernels.grouped_matmul import grouped_matmul, tgmm_reference
from maxtext.kernels.grouped_matmul.gpu import GpuTiling, gmm_gpu, tgmm_gpu, work_items
from maxtext.kernels.grouped_matmul.tpu import gmm_tpu, tgmm_tpu

# Small tiles so the test shapes cross several tiles, group boundaries inside tiles and a ragged tail.
SMALL_GPU_TILES = GpuTiling(block_m=16, block_n=16, block_k=16, tgmm_block_m=16, tgmm_block_k=16, tgmm_block_n=16)
# groups with no rows (first, middle, last), a 1-row group, and rows past the sum (the tail)
GROUP_SIZES = (0, 21, 0, 1, 37, 9, 0)
ROWS, K_DIM, N_DIM = 80, 24, 40  # K and N off the 16-grid: padded inside the GPU kernel


def numpy_gmm(lhs, rhs, sizes):
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def numpy_tgmm(lhs, grad, sizes):
  out, start = [], 0
  for size in sizes:
    out.append(lhs[start:start + size].T @ grad[start:start + size])
    start += size
  return np.stack(out)


def inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  lhs = rng.standard_normal((ROWS, K_DIM))
  rhs = rng.standard_normal((len(GROUP_SIZES), K_DIM, N_DIM)) * 0.2
  grad = rng.standard_normal((ROWS, N_DIM))
  as_jax = lambda x: jnp.asarray(x, dtype)
  # The float64 references take the inputs as rounded to `dtype`.
  return (as_jax(lhs), as_jax(rhs), as_jax(grad), jnp.asarray(GROUP_SIZES, jnp.int32),
          *(np.asarray(as_jax(x), np.float64) for x in (lhs, rhs, grad)))


def relative_error(ours, reference) -> float:
  return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
KERNELS = {
    "gpu": (lambda *a, **k: gmm_gpu(*a, tiling=SMALL_GPU_TILES, interpret=True, **k),
            lambda *a, **k: tgmm_gpu(*a, tiling=SMALL_GPU_TILES, interpret=True, **k)),
    "megablox": (lambda *a, **k: gmm_tpu(*a, interpret=True, **k), lambda *a, **k: tgmm_tpu(*a, interpret=True, **k)),
}


def test_work_items_cover_every_row_once():
  sizes = jnp.asarray(GROUP_SIZES, jnp.int32)
  group, start, end = map(np.asarray, work_items(sizes, ROWS, 16))
  covered = np.zeros(ROWS, int)
  for g, s, e in zip(group, start, end):
    covered[s:e] += 1
    if e > s:  # an item lies inside its group (group 7 is the tail past the sum)
      offsets = np.concatenate([[0], np.cumsum(GROUP_SIZES), [ROWS]])
      assert offsets[g] <= s < e <= offsets[g + 1] and e - s <= 16
  assert (covered == 1).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_kernels_match_numpy(impl, dtype):
  """gmm, gmm with rhs transposed and tgmm; tail rows zero, empty groups' d_rhs zero."""
  gmm, tgmm = KERNELS[impl]
  lhs, rhs, grad, sizes, lhs64, rhs64, grad64 = inputs(dtype)
  expected = numpy_gmm(lhs64, rhs64, GROUP_SIZES)
  out = gmm(lhs, rhs, sizes)
  assert out.shape == (ROWS, N_DIM) and out.dtype == dtype
  assert relative_error(out, expected) < TOLERANCE[dtype]
  assert not np.asarray(out[sum(GROUP_SIZES):]).any(), "rows past sum(group_sizes) must be zero"
  transposed = gmm(grad, rhs, sizes, transpose_rhs=True)  # grad [M, N] @ rhs[g]^T: the d_lhs product
  assert relative_error(transposed, numpy_gmm(grad64, rhs64.swapaxes(1, 2), GROUP_SIZES)) < TOLERANCE[dtype]
  d_rhs = tgmm(lhs, grad, sizes)
  assert d_rhs.shape == rhs.shape
  assert relative_error(d_rhs, numpy_tgmm(lhs64, grad64, GROUP_SIZES)) < TOLERANCE[dtype]
  empty = [g for g, size in enumerate(GROUP_SIZES) if size == 0]
  assert not np.asarray(d_rhs[jnp.asarray(empty)]).any()


def test_tgmm_reference_matches_numpy():
  lhs, _, grad, sizes, lhs64, _, grad64 = inputs(jnp.float32)
  assert relative_error(tgmm_reference(lhs, grad, sizes), numpy_tgmm(lhs64, grad64, GROUP_SIZES)) < 1e-5


@pytest.mark.parametrize("impl", ["gpu", "megablox"])
def test_public_api_values_and_gradients_match_reference(impl):
  """grouped_matmul's custom vjp (gmm transposed for d_lhs, tgmm for d_rhs) against ragged_dot's autodiff."""
  lhs, rhs, grad, sizes, *_ = inputs(jnp.float32, seed=1)

  def loss(impl, lhs, rhs):
    return jnp.sum(grouped_matmul(lhs, rhs, sizes, impl=impl) * grad)

  value_grad = lambda impl: jax.jit(jax.value_and_grad(loss, argnums=(1, 2)), static_argnums=0)(impl, lhs, rhs)
  (value, (d_lhs, d_rhs)), (ref_value, (ref_d_lhs, ref_d_rhs)) = value_grad(impl), value_grad("reference")
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for ours, reference in ((d_lhs, ref_d_lhs), (d_rhs, ref_d_rhs)):
    assert relative_error(ours, np.asarray(reference, np.float64)) < 1e-5


def test_bad_shapes_name_the_operands():
  lhs, rhs, _, sizes, *_ = inputs(jnp.float32)
  with pytest.raises(ValueError, match="grouped_matmul: expected lhs"):
    grouped_matmul(lhs[:, :5], rhs, sizes)
  with pytest.raises(ValueError, match="unknown grouped_matmul implementation"):
    grouped_matmul(lhs, rhs, sizes, impl="cuda")


def test_gpu_kernels_lower_to_triton_without_a_gpu():
  """The three kernels (gmm, gmm with rhs transposed, tgmm) pass Pallas' Triton lowering for CUDA (no GPU needed:
  interpret mode cannot catch an op the Triton lowering lacks)."""
  from jax import export
  from maxtext.kernels.grouped_matmul import _with_vjp

  struct = jax.ShapeDtypeStruct
  lhs, rhs = struct((256, 128), jnp.bfloat16), struct((4, 128, 64), jnp.bfloat16)
  sizes, d_out = struct((4,), jnp.int32), struct((256, 64), jnp.bfloat16)

  def forward_backward(lhs, rhs, sizes, d_out):
    out, vjp = jax.vjp(lambda l, r: _with_vjp("gpu", False)(l, r, sizes), lhs, rhs)
    return out, vjp(d_out)

  triton = "__gpu$xla.gpu.triton"
  exported = export.export(jax.jit(forward_backward), platforms=["cuda"],
                           disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(lhs, rhs, sizes, d_out)
  assert exported.mlir_module().count(f"custom_call @{triton}") == 3


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("tiling", [GpuTiling(), SMALL_GPU_TILES], ids=["default-tiles", "small-tiles"])
def test_compiled_on_gpu_matches_numpy(tiling):
  """Through the real Triton lowering: ragged groups, empty groups and a tail, in float32 and bfloat16 (the GPU's
  float32 dots are IEEE: precision HIGHEST)."""
  for dtype in (jnp.float32, jnp.bfloat16):
    lhs, rhs, grad, sizes, lhs64, rhs64, grad64 = inputs(dtype, seed=2)
    out = gmm_gpu(lhs, rhs, sizes, tiling=tiling)
    assert relative_error(out, numpy_gmm(lhs64, rhs64, GROUP_SIZES)) < TOLERANCE[dtype]
    assert not np.asarray(out[sum(GROUP_SIZES):]).any()
    transposed = gmm_gpu(grad, rhs, sizes, transpose_rhs=True, tiling=tiling)
    assert relative_error(transposed, numpy_gmm(grad64, rhs64.swapaxes(1, 2), GROUP_SIZES)) < TOLERANCE[dtype]
    d_rhs = tgmm_gpu(lhs, grad, sizes, tiling=tiling)
    assert relative_error(d_rhs, numpy_tgmm(lhs64, grad64, GROUP_SIZES)) < TOLERANCE[dtype]


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
def test_compiled_on_gpu_at_a_production_like_shape():
  """64 experts [2048 -> 512], 8192 rows in bf16 (Dirichlet group sizes, some empty) against float32 XLA dots."""
  rng = np.random.default_rng(5)
  sizes = np.floor(rng.dirichlet(np.ones(64) * 0.5) * 8000).astype(np.int32)  # rows 8000..8191: the tail
  lhs = jnp.asarray(rng.standard_normal((8192, 2048)), jnp.bfloat16)
  rhs = jnp.asarray(rng.standard_normal((64, 2048, 512)) * 0.02, jnp.bfloat16)
  grad = jnp.asarray(rng.standard_normal((8192, 512)), jnp.bfloat16)
  gs = jnp.asarray(sizes)
  out, vjp = jax.vjp(lambda l, r: grouped_matmul(l, r, gs, impl="gpu"), lhs, rhs)
  ref_out, ref_vjp = jax.vjp(lambda l, r: grouped_matmul(l.astype(jnp.float32), r.astype(jnp.float32), gs,
                                                         impl="reference"), lhs, rhs)
  assert relative_error(out, np.asarray(ref_out, np.float64)) < 1e-2
  for ours, reference in zip(vjp(grad), ref_vjp(grad.astype(jnp.float32))):
    assert relative_error(ours, np.asarray(reference, np.float64)) < 1e-2
