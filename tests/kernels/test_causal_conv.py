"""The causal depthwise conv (+ SiLU): the jnp reference against a float64 numpy conv written with loops, and the
Pallas GPU kernels (gpu.py; interpret mode on the CPU, compiled on a GPU when marked device) against the reference.
Values and the gradients w.r.t. x and the kernel, for a random cotangent, with and without packed documents and the
SiLU, at lengths that fill the time tiles, leave a ragged tail, or fit inside one tile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.kernels import dispatch as kernel_dispatch
from maxtext.kernels.causal_conv import causal_conv, causal_conv_reference
from maxtext.kernels.causal_conv.dispatch import choose_impl
from maxtext.kernels.causal_conv.gpu import ConvTiling, causal_conv_gpu

WIDTH = 4
# 16 x 32 tiles: C = 48 leaves a ragged channel block, T = 37 a ragged time block, T = 5 is shorter than a tile.
SMALL_TILES = ConvTiling(block_t=16, block_c=32, backward_block_t=16, backward_block_c=32)


def documents(lengths, batch=2):
  return np.repeat(np.arange(len(lengths)), lengths)[None].repeat(batch, 0).astype(np.int32)


def random_case(length, channels=48, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, length, channels)), rng.standard_normal((WIDTH, channels)),
          rng.standard_normal((batch, length, channels)))  # x, kernel, cotangent


def numpy_conv(x, kernel, segment_ids):
  """The float64 pre-activation [B, T, C], by loops over rows and taps."""
  batch, length, _ = x.shape
  width = kernel.shape[0]
  a = np.zeros_like(x)
  for b in range(batch):
    for t in range(length):
      for i in range(width):
        s = t - width + 1 + i
        if s >= 0 and (segment_ids is None or segment_ids[b, s] == segment_ids[b, t]):
          a[b, t] += kernel[i] * x[b, s]
  return a


def numpy_values_and_grads(x, kernel, segment_ids, activation, dy):
  """float64 (y, dx, dkernel) for the cotangent dy: each tap's product added to its input row and kernel row."""
  x, kernel, dy = (np.asarray(v, np.float64) for v in (x, kernel, dy))
  a = numpy_conv(x, kernel, segment_ids)
  if activation == "silu":
    gate = 1 / (1 + np.exp(-a))
    y, da = a * gate, dy * (gate + a * gate * (1 - gate))
  else:
    y, da = a, dy
  width = kernel.shape[0]
  dx, dkernel = np.zeros_like(x), np.zeros_like(kernel)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for i in range(width):
        s = t - width + 1 + i
        if s >= 0 and (segment_ids is None or segment_ids[b, s] == segment_ids[b, t]):
          dx[b, s] += kernel[i] * da[b, t]
          dkernel[i] += x[b, s] * da[b, t]
  return y, dx, dkernel


def values_and_grads(conv, x, kernel, segment_ids, activation, dy):
  ids = None if segment_ids is None else jnp.asarray(segment_ids)

  @jax.jit
  def run(x, kernel, dy):
    y, vjp = jax.vjp(lambda x, kernel: conv(x, kernel, ids, activation), x, kernel)
    return (y, *vjp(dy))

  return run(x, kernel, dy)


def relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_reference_matches_float64_numpy(activation, packed):
  x, kernel, dy = random_case(21, channels=8)
  segment_ids = documents([5, 1, 12, 3]) if packed else None
  got = values_and_grads(causal_conv_reference, *(jnp.asarray(v, jnp.float32) for v in (x, kernel)), segment_ids,
                         activation, jnp.asarray(dy, jnp.float32))
  expected = numpy_values_and_grads(x, kernel, segment_ids, activation, dy)
  for name, a, b in zip(("y", "dx", "dkernel"), got, expected):
    assert relative_error(a, b) < 1e-6, name


def test_reference_kernel_gradient_sums_bf16_inputs_in_float32():
  """4096 tokens of bf16: a bf16 running sum would lose ~2^-9 per addition; float32 leaves one final rounding."""
  x, kernel, dy = random_case(4096, channels=4, batch=1, seed=1)
  x, kernel, dy = (np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32)) for v in (x, kernel, dy))
  _, _, dkernel = values_and_grads(causal_conv_reference, *(jnp.asarray(v, jnp.bfloat16) for v in (x, kernel)),
                                   None, "silu", jnp.asarray(dy, jnp.bfloat16))
  _, _, expected = numpy_values_and_grads(x, kernel, None, "silu", dy)
  assert dkernel.dtype == jnp.bfloat16
  # One bf16 rounding of each sum (2^-9 relative), plus the bf16-rounded activation gradient's noise.
  assert np.abs(np.asarray(dkernel, np.float64) - expected).max() <= 2 ** -8 * np.abs(expected).max()


# length, packed documents (or None), activation, dtype
GPU_CASES = [
    (37, [10, 3, 20, 4], "silu", jnp.float32),  # ragged tail; a document ends inside the halo
    (37, None, None, jnp.float32),
    (32, None, "silu", jnp.float32),  # two full time tiles
    (5, [2, 3], None, jnp.float32),  # shorter than one tile
    (37, [1, 30, 6], "silu", jnp.bfloat16),
]


@pytest.mark.parametrize("length, lengths, activation, dtype", GPU_CASES,
                         ids=["ragged_packed_silu", "ragged_plain_linear", "full_tiles_silu", "short_packed_linear",
                              "bf16_packed_silu"])
def test_gpu_kernel_interpreted_matches_reference(length, lengths, activation, dtype):
  x, kernel, dy = (jnp.asarray(v, dtype) for v in random_case(length))
  segment_ids = None if lengths is None else documents(lengths)
  kernel_conv = lambda *a: causal_conv_gpu(*a, tiling=SMALL_TILES, interpret=True)
  got = values_and_grads(kernel_conv, x, kernel, segment_ids, activation, dy)
  expected = values_and_grads(causal_conv_reference, x, kernel, segment_ids, activation, dy)
  # Both sum in float32 in the same tap order; bf16 outputs may differ by one rounding of a float32 near-tie.
  tolerance = 1e-6 if dtype == jnp.float32 else 2 ** -8
  for name, a, b in zip(("y", "dx", "dkernel"), got, expected):
    assert a.dtype == b.dtype == dtype, name
    assert relative_error(a, b) < tolerance, name


def test_auto_takes_the_kernel_on_a_gpu_for_the_widths_and_dtypes_it_supports(monkeypatch):
  monkeypatch.setattr(kernel_dispatch, "backend", lambda: "gpu")
  assert choose_impl("auto", WIDTH, jnp.bfloat16) == "gpu"
  assert choose_impl("auto", 9, jnp.bfloat16) == "reference"  # wider than the kernel's unrolled taps
  assert choose_impl("auto", WIDTH, jnp.int8) == "reference"


def test_auto_takes_the_reference_on_a_cpu_and_gpu_runs_interpreted():
  assert choose_impl("auto", WIDTH, jnp.bfloat16) == "reference"
  x, kernel, _ = (jnp.asarray(v, jnp.float32) for v in random_case(9, channels=16, batch=1))
  np.testing.assert_allclose(causal_conv(x, kernel, impl="gpu"), causal_conv(x, kernel, impl="auto"), rtol=1e-6,
                             atol=1e-6)
  with pytest.raises(ValueError, match="unknown causal_conv implementation 'triton'"):
    causal_conv(x, kernel, impl="triton")


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_compiled_on_gpu_matches_reference(dtype, packed):
  """Default tiles, a ragged tail (1000 tokens), 1024 channels; the first tile's halo is masked, not padded."""
  x, kernel, dy = (jnp.asarray(v, dtype) for v in random_case(1000, channels=1024))
  segment_ids = documents([100, 300, 1, 476, 123]) if packed else None
  got = values_and_grads(lambda *a: causal_conv_gpu(*a), x, kernel, segment_ids, "silu", dy)
  expected = values_and_grads(causal_conv_reference, x, kernel, segment_ids, "silu", dy)
  tolerance = 1e-5 if dtype == jnp.float32 else 2 ** -7  # GPU exp/sigmoid differ from XLA's by a few ulps
  for name, a, b in zip(("y", "dx", "dkernel"), got, expected):
    assert relative_error(a, b) < tolerance, name


def test_gpu_kernel_per_batch_shard_sums_the_kernel_gradient_over_shards():
  """Under a mesh splitting the batch over 2 devices the kernel runs per shard (shard_map); dkernel adds both."""
  from maxtext import sharding  # noqa: PLC0415

  x, kernel, dy = (jnp.asarray(v, jnp.float32) for v in random_case(13, channels=16, batch=4))
  segment_ids = documents([6, 7], batch=4)
  expected = values_and_grads(causal_conv_reference, x, kernel, segment_ids, "silu", dy)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1, "expert": 1}, jax.devices()[:2])
  with sharding.activate(mesh):
    got = values_and_grads(lambda *a: causal_conv(*a, impl="gpu"), x, kernel, segment_ids, "silu", dy)
  for name, a, b in zip(("y", "dx", "dkernel"), got, expected):
    assert relative_error(a, b) < 1e-6, name
