"""Flash attention against the jnp reference: splash attention in the Pallas interpreter (values and gradients, with
and without packing, inside shard_map), the dispatch choice per backend, and the cuDNN path's packed layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext import sharding
from maxtext.configs import ConfigError, load_config
from maxtext.kernels import dispatch
from maxtext.kernels.attention import choose_impl, dot_product_attention, dot_product_attention_reference
from maxtext.models.spec import ModelSpec

# Small enough for the interpreter: 2 query blocks of 128, GQA 4/2, head_dim 64.
BATCH, LENGTH, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 256, 4, 2, 64
SCALE = HEAD_DIM**-0.5
# Row 0: two documents and padding (id 0); row 1: one document, a boundary off the 128-block grid.
SEGMENTS = np.array([[1] * 100 + [2] * 100 + [0] * 56, [3] * 77 + [4] * 179], np.int32)


def inputs(seed: int, dtype=jnp.float32) -> tuple[jax.Array, ...]:
  rng = np.random.default_rng(seed)
  shape = lambda heads: (BATCH, LENGTH, heads, HEAD_DIM)
  return tuple(jnp.asarray(rng.standard_normal(shape(h)), dtype) for h in (Q_HEADS, KV_HEADS, KV_HEADS))


def relative_error(ours, reference) -> float:
  reference = np.asarray(reference, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


def loss(impl: str, segment_ids):
  """A scalar that weighs every output element differently, so gradients see each one."""
  def fn(q, k, v):
    out = dot_product_attention(q, k, v, scale=SCALE, segment_ids=segment_ids, impl=impl)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))
  return fn


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_splash_matches_reference_values_and_gradients(packed):
  segment_ids = jnp.asarray(SEGMENTS) if packed else None
  q, k, v = inputs(1)
  (value, grads) = jax.value_and_grad(loss("tpu", segment_ids), argnums=(0, 1, 2))(q, k, v)
  (ref_value, ref_grads) = jax.value_and_grad(loss("reference", segment_ids), argnums=(0, 1, 2))(q, k, v)
  assert abs(float(value) - float(ref_value)) < 1e-4 * abs(float(ref_value))
  for name, ours, ref in zip("qkv", grads, ref_grads):
    assert relative_error(ours, ref) < 1e-5, name


def test_splash_bfloat16_matches_reference_on_the_same_inputs():
  q, k, v = inputs(2, jnp.bfloat16)
  ours = dot_product_attention(q, k, v, scale=SCALE, segment_ids=jnp.asarray(SEGMENTS), impl="tpu")
  reference = dot_product_attention_reference(q, k, v, scale=SCALE, q_segment_ids=jnp.asarray(SEGMENTS))
  assert ours.dtype == jnp.bfloat16
  assert relative_error(ours, reference) < 2e-2


@pytest.mark.parametrize("fsdp,tensor", [(2, 2), (1, 4)], ids=["kv-heads-split", "kv-heads-repeated"])
def test_splash_per_shard_under_a_mesh(fsdp, tensor):
  """Batch over fsdp, heads over tensor; with 4 head shards the 2 KV heads are repeated to whole groups."""
  q, k, v = inputs(3)
  segment_ids = jnp.asarray(SEGMENTS)
  mesh = sharding.make_mesh({"data": 1, "fsdp": fsdp, "tensor": tensor, "expert": 1}, jax.devices()[:4])
  with sharding.activate(mesh):
    ours = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, scale=SCALE, segment_ids=segment_ids,
                                                         impl="tpu"))(q, k, v)
    assert "shard_map" in str(jax.make_jaxpr(
        lambda q, k, v: dot_product_attention(q, k, v, scale=SCALE, impl="tpu"))(q, k, v))
  reference = dot_product_attention_reference(q, k, v, scale=SCALE, q_segment_ids=segment_ids)
  assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize(
    "platform,impl,dtype,length,expected",
    [
        ("cpu", "auto", jnp.float32, 256, "reference"),
        ("cpu", "flash", jnp.bfloat16, 256, "reference"),  # no flash kernel on a CPU: the reference
        ("tpu", "auto", jnp.bfloat16, 256, "tpu"),
        ("tpu", "auto", jnp.bfloat16, 200, "reference"),  # not a multiple of 128: splash cannot tile it
        ("gpu", "auto", jnp.bfloat16, 200, "gpu"),
        ("gpu", "auto", jnp.float32, 256, "reference"),  # cuDNN takes only 16-bit inputs
        ("gpu", "reference", jnp.bfloat16, 256, "reference"),
    ],
)
def test_dispatch_choice(monkeypatch, platform, impl, dtype, length, expected):
  monkeypatch.setattr(dispatch, "backend", lambda: platform)
  q = jax.ShapeDtypeStruct((1, length, Q_HEADS, 128), dtype)
  k = jax.ShapeDtypeStruct((1, length, KV_HEADS, 128), dtype)
  assert choose_impl(impl, q, k) == expected


@pytest.mark.parametrize(
    "platform,dtype,length,culprit",
    [("tpu", jnp.bfloat16, 200, "multiples of 128"), ("gpu", jnp.float32, 256, "bfloat16 or float16")],
)
def test_flash_names_what_the_kernel_cannot_take(monkeypatch, platform, dtype, length, culprit):
  monkeypatch.setattr(dispatch, "backend", lambda: platform)
  q = jax.ShapeDtypeStruct((1, length, Q_HEADS, 128), dtype)
  with pytest.raises(ValueError, match=f"attention=flash: .*{culprit}"):
    choose_impl("flash", q, q)


def test_reference_fallback_runs_on_cpu():
  q, k, v = inputs(4)
  ours = dot_product_attention(q, k, v, scale=SCALE, impl="auto")
  np.testing.assert_array_equal(ours, dot_product_attention_reference(q, k, v, scale=SCALE))


@pytest.mark.parametrize("value,impl", [("autoselected", "auto"), ("dot_product", "reference"), ("flash", "flash")])
def test_attention_config_key_sets_the_layer_impl(value, impl):
  assert ModelSpec.from_config(load_config(overrides={"attention": value})).attention.impl == impl


def test_attention_config_key_rejects_unknown_values():
  with pytest.raises(ConfigError, match="config key 'attention' must be one of autoselected, dot_product, flash"):
    load_config(overrides={"attention": "splash"})



@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("length", [256, 255, 769])
def test_cudnn_matches_reference_values_and_gradients(length):
  """cuDNN (bf16) against the float32 reference, packed documents, even and odd lengths (odd ones are padded for
  cuDNN's masked backward, the packed RL rows' case)."""
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.standard_normal((BATCH, length, h, HEAD_DIM)), jnp.float32)
             for h in (Q_HEADS, KV_HEADS, KV_HEADS))
  segments = jnp.asarray(np.pad(SEGMENTS, ((0, 0), (0, 1024 - LENGTH)), mode="edge")[:, :length])
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out, grads = jax.value_and_grad(loss("gpu", segments), argnums=(0, 1, 2))(*bf16)
  ref, ref_grads = jax.value_and_grad(loss("reference", segments), argnums=(0, 1, 2))(q, k, v)
  assert abs(float(out) - float(ref)) / abs(float(ref)) < 2e-2
  for ours, reference in zip(grads, ref_grads):
    assert relative_error(ours, reference) < 3e-2
