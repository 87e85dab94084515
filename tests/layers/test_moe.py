"""The MoE layer's paths against a float64 numpy MoE: dropless (every grouped-matmul kernel) and token dropping."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from maxtext.layers.moe import SparseMoe, buffer_places, expert_capacity
from maxtext.layers.specs import MoeSpec, Numerics

SPEC = MoeSpec(num_experts=8, top_k=3, norm_topk_prob=True, expert_dim=24, shared_expert_dim=20)
BATCH, LENGTH, EMBED = 2, 10, 32
UNUSED_EXPERTS = (2, 5)  # the router never picks these: zero-token groups in every path


def layer_inputs(seed: int = 0):
  """x and float32 parameters where UNUSED_EXPERTS get no token: feature 0 is large, their router column < 0."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, LENGTH, EMBED))
  x[..., 0] = 4.0
  # Parameter shapes from the layer itself, values from numpy (no init compile), O(1) activations.
  shapes = nn.unbox(jax.eval_shape(SparseMoe(SPEC, Numerics()).init, jax.random.key(0), jnp.zeros((1, 2, EMBED))))
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape) / np.sqrt(a.shape[-2]), shapes["params"])
  params["gate"]["kernel"][0, np.asarray(UNUSED_EXPERTS)] = -10.0
  return jnp.asarray(x, jnp.float32), jax.tree.map(jnp.asarray, params)


def numpy_moe(x, params, spec: MoeSpec, kept=None):
  """float64 loop over tokens and their top-k experts; `kept[b, t, j]` False drops slot j of token (b, t)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  silu = lambda v: v / (1.0 + np.exp(-v))
  tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  logits = tokens @ p["gate"]["kernel"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(tokens)
  experts = p["experts"]
  for n, token in enumerate(tokens):
    top = np.argsort(-probs[n], kind="stable")[: spec.top_k]
    weights = probs[n, top] / (probs[n, top].sum() if spec.norm_topk_prob else 1.0)
    for j, (e, weight) in enumerate(zip(top, weights)):
      if kept is not None and not kept.reshape(-1, spec.top_k)[n, j]:
        continue
      hidden = silu(token @ experts["gate_proj"][e]) * (token @ experts["up_proj"][e])
      out[n] += weight * (hidden @ experts["down_proj"][e])
    shared = p["shared_expert"]
    hidden = silu(token @ shared["gate_proj"]["kernel"]) * (token @ shared["up_proj"]["kernel"])
    gate = 1.0 / (1.0 + np.exp(-(token @ p["shared_expert_gate"]["kernel"])))
    out[n] += gate[0] * (hidden @ shared["down_proj"]["kernel"])
  return out.reshape(x.shape), probs


def relative_error(ours, reference) -> float:
  reference = np.asarray(reference, np.float64)
  return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


PATHS = {
    "reference": dict(impl="reference"),
    "gpu-interpret": dict(impl="gpu"),
    "megablox-interpret": dict(impl="megablox"),
    "dropping-no-capacity-limit": dict(sparse_matmul=False, capacity_factor=-1.0),
    # capacity ceil(T k / E * E / k) = T: room for every token, so nothing drops
    "dropping-capacity-T": dict(sparse_matmul=False, capacity_factor=SPEC.num_experts / SPEC.top_k),
}


@functools.cache
def value_and_grads(path: str):
  x, params = layer_inputs()
  layer = SparseMoe(dataclasses.replace(SPEC, **PATHS[path]), Numerics())

  def loss(params, x):
    out, stats = layer.apply({"params": params}, x)
    weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)  # a non-uniform cotangent
    return jnp.sum(out * weights), (out, stats)

  (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return out, stats, grads


def test_reference_path_matches_numpy_and_skips_unused_experts():
  x, params = layer_inputs()
  out, stats, grads = value_and_grads("reference")
  expected, probs = numpy_moe(x, params, SPEC)
  assert relative_error(out, expected) < 1e-5
  counts = np.asarray(stats.slot_counts)
  assert counts.sum() == BATCH * LENGTH * SPEC.top_k and (counts[np.asarray(UNUSED_EXPERTS)] == 0).all()
  np.testing.assert_allclose(stats.prob_sums, probs.sum(0), rtol=1e-5)
  # unused experts get exactly zero weight gradient
  for name in ("gate_proj", "up_proj", "down_proj"):
    assert not np.asarray(grads[0]["experts"][name][np.asarray(UNUSED_EXPERTS)]).any()


@pytest.mark.parametrize("path", [p for p in PATHS if p != "reference"])
def test_every_path_matches_reference_values_and_gradients(path):
  out, stats, (d_params, d_x) = value_and_grads(path)
  ref_out, ref_stats, (ref_d_params, ref_d_x) = value_and_grads("reference")
  assert relative_error(out, ref_out) < 1e-5
  np.testing.assert_array_equal(stats.slot_counts, ref_stats.slot_counts)
  assert relative_error(d_x, ref_d_x) < 1e-5
  flat, ref_flat = jax.tree_util.tree_leaves_with_path(d_params), jax.tree.leaves(ref_d_params)
  for (name, ours), reference in zip(flat, ref_flat):
    assert relative_error(ours, reference) < 1e-4, jax.tree_util.keystr(name)


def numpy_kept_slots(top_experts: np.ndarray, num_experts: int, capacity: int) -> np.ndarray:
  """MaxText's rule, written as a loop: per sequence, tokens in order, slots in top-k order, first come first kept."""
  kept = np.zeros(top_experts.shape, bool)
  for b in range(top_experts.shape[0]):
    taken = np.zeros(num_experts, int)
    for t in range(top_experts.shape[1]):
      for j, e in enumerate(top_experts[b, t]):
        kept[b, t, j] = taken[e] < capacity
        taken[e] += 1
  return kept


def test_buffer_places_keep_earliest_tokens_up_to_capacity():
  rng = np.random.default_rng(3)
  top_experts = np.stack([np.stack([rng.choice(6, 2, replace=False) for _ in range(9)]) for _ in range(2)])
  places = np.asarray(buffer_places(jnp.asarray(top_experts), 6, capacity=2))
  kept = numpy_kept_slots(top_experts, 6, 2)
  assert ((places >= 0) == kept).all() and 0 < kept.sum() < kept.size
  for b, t, j in zip(*np.nonzero(kept)):  # a kept slot's place is the number of slots before it in its expert
    e = top_experts[b, t, j]
    assert places[b, t, j] == np.sum(top_experts[b, :t] == e) + np.sum(top_experts[b, t, :j] == e)


def test_small_capacity_drops_exactly_the_late_slots():
  x, params = layer_inputs(seed=4)
  capacity_factor = 0.25
  capacity = expert_capacity(LENGTH, SPEC.top_k, SPEC.num_experts, capacity_factor)
  assert capacity == 1  # ceil(10 * 3 / 8 * 0.25)
  layer = SparseMoe(dataclasses.replace(SPEC, sparse_matmul=False, capacity_factor=capacity_factor), Numerics())
  out, _ = jax.jit(layer.apply)({"params": params}, x)
  _, probs = numpy_moe(x, params, SPEC)
  top_experts = np.argsort(-probs, axis=-1, kind="stable")[:, : SPEC.top_k].reshape(BATCH, LENGTH, SPEC.top_k)
  kept = numpy_kept_slots(top_experts, SPEC.num_experts, capacity)
  assert 0 < kept.sum() < kept.size
  expected, _ = numpy_moe(x, params, SPEC, kept=kept)
  assert relative_error(out, expected) < 1e-5
  assert relative_error(out, numpy_moe(x, params, SPEC)[0]) > 1e-2  # dropping changed the output


def test_capacity_formula_follows_maxtext():
  assert expert_capacity(4096, 10, 512, 1.0) == 80
  assert expert_capacity(4096, 10, 512, 1.25) == 100
  assert expert_capacity(100, 10, 512, 1.0) == 2  # ceil(1.953)
  assert expert_capacity(100, 10, 512, -1.0) == 100  # dropless


def test_config_keys_reach_the_layer_spec_and_capacity_needs_the_dense_path():
  from maxtext.configs import ConfigError, load_config
  from maxtext.models.spec import ModelSpec

  spec = ModelSpec.from_config(load_config(overrides={"sparse_matmul": False, "capacity_factor": 1.25,
                                                      "grouped_matmul_kernel": "gpu", "megablox": False})).moe
  assert (spec.sparse_matmul, spec.capacity_factor, spec.impl, spec.megablox) == (False, 1.25, "gpu", False)
  with pytest.raises(ConfigError, match="'capacity_factor' .* sparse_matmul=false"):
    load_config(overrides={"capacity_factor": 1.0})
  with pytest.raises(ConfigError, match="grouped_matmul_kernel"):
    load_config(overrides={"grouped_matmul_kernel": "cuda"})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weighted_combine_gradients_equal_autodiff_and_float64(dtype):
  """The combine's hand-written backward (kept to save a bf16 rather than float32 residual) is autodiff's
  arithmetic: equal to autodiff of the plain formula bit for bit, and to float64 numpy up to the dtype's rounding."""
  from maxtext.layers.moe import _combine  # noqa: PLC0415 - the private piece under test

  n, k, d = 6, 3, 16
  keys = jax.random.split(jax.random.key(7), 3)
  slot_out = jax.random.normal(keys[0], (n * k, d)).astype(dtype)
  top_probs = jax.nn.softmax(jax.random.normal(keys[1], (n, k)), axis=-1)
  d_out = jax.random.normal(keys[2], (n, d)).astype(dtype)

  def plain(x, p):
    weighted = x.reshape(n, k, -1).astype(jnp.float32) * p[..., None].astype(jnp.float32)
    return jnp.sum(weighted, axis=1).astype(x.dtype)

  ours, ours_vjp = jax.vjp(_combine, slot_out, top_probs)
  theirs, theirs_vjp = jax.vjp(plain, slot_out, top_probs)
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))
  for got, want in zip(ours_vjp(d_out), theirs_vjp(d_out)):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))

  x64 = np.asarray(slot_out, np.float64).reshape(n, k, d)
  p64, g64 = np.asarray(top_probs, np.float64), np.asarray(d_out, np.float64)
  d_slot, d_probs = ours_vjp(d_out)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(ours, np.float64), np.einsum("nkd,nk->nd", x64, p64), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(d_slot, np.float64).reshape(n, k, d), g64[:, None, :] * p64[..., None],
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(d_probs, np.float64), np.einsum("nd,nkd->nk", g64, x64), rtol=1e-5,
                             atol=1e-5)
