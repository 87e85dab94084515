"""Attention of new tokens to a KV cache: the Pallas-Triton flash kernel (Pallas interpreter on a CPU, compiled on a
GPU with -m device) against a float64 numpy softmax and the jnp reference; the dispatcher's choice per backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext import sharding
from maxtext.kernels import dispatch
from maxtext.kernels.attention import cached, cached_attention, cached_attention_reference, gpu_cached

# Small tiles so the interpreter's cases cover several query blocks, whole-visible and masked key blocks and the
# flush last block (a cache length off the 32-slot grid).
SMALL = gpu_cached.CachedTiling(block_q=32, block_kv=32, num_warps=4, num_stages=1)


def numpy_attention(query, key, value, cursor, scale) -> np.ndarray:
  """float64 softmax attention; token t of row b sees the slots <= cursor[b] + t."""
  query, key, value = (np.asarray(x, np.float64) for x in (query, key, value))
  batch, length, num_heads, _ = query.shape
  groups = num_heads // key.shape[2]
  key, value = np.repeat(key, groups, axis=2), np.repeat(value, groups, axis=2)
  logits = np.einsum("bthd,bshd->bhts", query, key) * scale
  visible = np.arange(key.shape[1])[None, None, :] <= (np.asarray(cursor)[:, None] + np.arange(length))[:, :, None]
  logits = np.where(visible[:, None], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", weights, value)


def inputs(seed, batch, length, num_heads, num_kv_heads, head_dim, slots, dtype):
  rng = np.random.default_rng(seed)
  make = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return (make(batch, length, num_heads, head_dim), make(batch, slots, num_kv_heads, head_dim),
          make(batch, slots, num_kv_heads, head_dim))


def relative_error(ours, reference) -> float:
  reference = np.asarray(reference, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


# (batch, T, Hq, Hkv, D, S, cursors, dtype, tiling). Cursors: 0, mid-cache, and cursor + T == S exactly.
CASES = {
    "mha-d64-f32": (3, 37, 2, 2, 64, 150, (0, 50, 113), jnp.float32, SMALL),
    "gqa4-d64-f32": (2, 21, 8, 2, 64, 100, (79, 33), jnp.float32, SMALL),
    "gqa4-d128-bf16": (2, 19, 4, 1, 128, 70, (0, 51), jnp.bfloat16, SMALL),
    "gqa4-d64-bf16-default-tiling": (2, 45, 8, 2, 64, 200, (155, 7), jnp.bfloat16, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_float64_and_the_reference(case):
  batch, length, num_heads, num_kv_heads, head_dim, slots, cursors, dtype, tiling = CASES[case]
  query, key, value = inputs(1, batch, length, num_heads, num_kv_heads, head_dim, slots, dtype)
  cursor = jnp.asarray(cursors, jnp.int32)
  scale = head_dim**-0.5
  ours = gpu_cached.cached_flash_attention(query, key, value, cursor, scale=scale, tiling=tiling, interpret=True)
  exact = numpy_attention(query, key, value, cursor, scale)
  reference = cached_attention_reference(query, key, value, cursor, scale=scale)
  assert ours.shape == query.shape and ours.dtype == dtype
  # float32: the same sums in another order. bf16: outputs round to bf16 (8 bits) and so do the softmax weights
  # before the value product, in the kernel as in the reference.
  to_exact, to_reference = (1e-6, 1e-6) if dtype == jnp.float32 else (1e-2, 1e-2)
  assert relative_error(ours, exact) < to_exact
  assert relative_error(ours, reference) < to_reference


def test_dispatcher_runs_the_kernel_per_shard_under_a_mesh():
  """Batch over fsdp, heads over tensor: the 4 query heads in 2 groups split over 2 head shards."""
  query, key, value = inputs(2, 2, 17, 4, 2, 64, 96, jnp.float32)
  cursor = jnp.asarray([79, 0], jnp.int32)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 1}, jax.devices()[:4])
  call = lambda q, k, v, c: cached_attention(q, k, v, c, scale=0.125, impl="gpu")
  with sharding.activate(mesh):
    assert "shard_map" in str(jax.make_jaxpr(call)(query, key, value, cursor))
    ours = jax.jit(call)(query, key, value, cursor)
  assert relative_error(ours, numpy_attention(query, key, value, cursor, 0.125)) < 2e-6


@pytest.mark.parametrize(
    "platform,impl,length,head_dim,slots,expected",
    [
        ("cpu", "auto", 64, 128, 1024, "reference"),
        ("tpu", "auto", 64, 128, 1024, "reference"),
        ("gpu", "auto", 64, 256, 1024, "gpu"),
        ("gpu", "auto", 4, 256, 1024, "reference"),  # a decode step: the einsum reads the cache once
        ("gpu", "auto", 64, 96, 1024, "reference"),  # not a power of two: the kernel cannot tile it
        ("gpu", "auto", 64, 128, 32, "reference"),  # fewer slots than one key block
        ("gpu", "reference", 64, 128, 1024, "reference"),
        ("cpu", "gpu", 64, 128, 1024, "gpu"),  # the Pallas interpreter (tests)
    ],
)
def test_dispatch_choice(monkeypatch, platform, impl, length, head_dim, slots, expected):
  monkeypatch.setattr(dispatch, "backend", lambda: platform)
  query = jax.ShapeDtypeStruct((1, length, 16, head_dim), jnp.bfloat16)
  key = jax.ShapeDtypeStruct((1, slots, 2, head_dim), jnp.bfloat16)
  assert cached.choose_impl(impl, query, key) == expected


def test_forced_kernel_names_what_it_cannot_take():
  query = jax.ShapeDtypeStruct((1, 64, 16, 96), jnp.bfloat16)
  with pytest.raises(ValueError, match="impl='gpu': .*head_dim .*96"):
    cached.choose_impl("gpu", query, jax.ShapeDtypeStruct((1, 1024, 2, 96), jnp.bfloat16))
  with pytest.raises(ValueError, match="unknown cached attention implementation 'flash'"):
    cached.choose_impl("flash", query, query)


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_default_tilings_fit_the_shared_memory(head_dim, itemsize):
  tiling = gpu_cached.default_tiling(head_dim, itemsize)
  assert tiling.shared_memory_bytes(head_dim, itemsize) <= gpu_cached.SHARED_MEMORY_BYTES


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("length,cursors", [(2048, (6000, 8200 - 2048)), (8192, (0, 0)), (37, (8000, 12))])
def test_compiled_kernel_matches_the_reference_at_the_bench_shape(length, cursors):
  """The bench model's heads (16 query, 2 key, head_dim 256), bf16, a cache of 8200 slots (off the key-block grid):
  a 2048-token chunk mid-prompt and flush with the cache's end, a first 8192-token chunk, a short tail chunk."""
  slots = 8200
  query, key, value = inputs(3, 2, length, 16, 2, 256, slots, jnp.bfloat16)
  cursor = jnp.asarray(cursors, jnp.int32)
  assert cached.choose_impl("auto", query, key) == "gpu"
  ours = jax.jit(lambda *a: cached_attention(*a, scale=256**-0.5))(query, key, value, cursor)
  reference = jax.jit(lambda *a: cached_attention(*a, scale=256**-0.5, impl="reference"))(query, key, value, cursor)
  assert relative_error(ours, reference) < 1e-2
  rows = slice(0, 8)  # float64 on a few tokens of each row (the whole product would take minutes on the host)
  exact = numpy_attention(query[:, rows], key, value, cursor, 256**-0.5)
  assert relative_error(ours[:, rows], exact) < 2e-2
