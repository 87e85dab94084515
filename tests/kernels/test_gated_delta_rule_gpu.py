"""The Pallas GPU (Triton) kernels of the whole chunked op (gpu.py) against the jnp reference: values and the
gradients w.r.t. every input. Interpret mode on the CPU; compiled on a GPU (marked device).

Precision modes (gpu_precision.py): float32 inputs run IEEE float32 dots and storage (1e-5); 'tf32' with 16-bit
inputs stores float32 (interpret mode runs its dots in IEEE float32; on a GPU TF32 rounds operands to 2^-11); the
16-bit default 'bf16' rounds every dot operand and stored intermediate to bf16 as fla does: ~1 bf16 ulp (2^-9)
per rounded operand, 2e-3..9e-3 measured, so 1e-2 (fla's own error on the H100 at 1x4096 reached 5.9e-3,
docs/benchmarks.md).
"""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtext.kernels import dispatch
from maxtext.kernels.gated_delta_rule import gpu
from maxtext.kernels.gated_delta_rule import chunk_gated_delta_rule, chunk_gated_delta_rule_reference
from maxtext.kernels.gated_delta_rule.gpu import (ChunkedLaunch, chunk_gated_delta_rule_gpu, walk_blocks, walk_stages,
                                                 walk_warpgroups)

from tests.kernels.test_gated_delta_rule import random_inputs, relative_error, values_and_grads

TOLERANCE = {"ieee": 1e-5, "tf32": 2e-3, "bf16": 1e-2}
# several key and value blocks; the two-kernel backward (fused_backward has its own tests below)
SMALL_TILES = ChunkedLaunch(block_v=16, grad_block_k=16, grad_block_v=16, fused_backward=False)
# The Triton kernels throughout (on a Hopper the default launch runs gpu_mosaic_*.py where they apply)
TRITON = dict(chunk_grads_mosaic=0, reverse_walk_mosaic=0)
# gpu_fused.py's forward or not, the whole-tile WY inverse or the blocked one (gpu_inverse.py, the default)
FUSED = dict(split=dict(fused_forward=False, inverse_block=None, fused_backward=False, **TRITON),
             fused=dict(fused_forward=True, inverse_block=None, fused_backward=False, **TRITON),
             blocked16=dict(fused_forward=True, inverse_block=16, fused_backward=False, **TRITON),
             fusedbwd=dict(fused_forward=True, inverse_block=16, fused_backward=True, **TRITON),  # gpu_backward.py
             prep_kh=dict(fused_forward=True, inverse_block=16, prep_per_key_head=True, **TRITON),  # prep by key head
             prep_split=dict(prep_split=True, scores_warps=0),  # T and P by separate prep launches
             # what walk_blocks picks for many programs (B x Hv x Dv / 64 >= 512), here forced at a small shape
             wide_walk=dict(block_v=64, **TRITON),  # both walks 64 columns (the reverse walk's 2 stages)
             # the default launch: gpu_mosaic_backward.py's two-warpgroup chunk backward and gpu_mosaic_walks.py's
             # reverse walk where they apply (bf16, unpacked; the Triton kernels for the others)
             default=dict(),
             mosaic_bwd=dict(chunk_grads_mosaic=1, reverse_walk_mosaic=0),  # one warpgroup a chunk
             # both of gpu_mosaic_walks.py's walks, one warpgroup a program, with the Triton chunk backward
             mosaic_walks=dict(forward_walk_mosaic=1, reverse_walk_mosaic=1, chunk_grads_mosaic=0),
             # both walks with two warpgroups a program (sharing the loads), with the Mosaic chunk backward
             walks_2wg=dict(forward_walk_mosaic=2, reverse_walk_mosaic=2),
             # the forward walk as warpgroups in roles (gpu_mosaic_roles.py): state, output and loads
             walk_roles=dict(forward_walk_roles=3), walk_roles2=dict(forward_walk_roles=2),
             # P by gpu_fused.scores_kernel with 4 warps (the default launch's: 8)
             scores4=dict(scores_warps=4),
             # gpu_norm_grads.py's kernel for dq, dk through the group sum and the l2 norm, on the default launch
             norm_kernel=dict(norm_grads_kernel=True),
             # the forward's l2 norm of q and k in gpu_qk_norm.py's kernel
             qk_norm=dict(qk_norm_kernel=True))

def scores_launched(jaxpr_text: str) -> bool:
  """Whether a jaxpr launches a kernel for P alone (gpu_fused.scores_kernel, or prep_kernel's blocked P)."""
  return "gdr_scores_fwd" in jaxpr_text or "gdr_prep_p_fwd" in jaxpr_text


def _eqns_outside_kernels(jaxpr):
  """Every equation of a jaxpr and its sub-jaxprs, not descending into Pallas kernels."""
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name != "pallas_call":
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from _eqns_outside_kernels(sub)


def primitives_outside_kernels(jaxpr) -> collections.Counter:
  """How often each primitive occurs in a jaxpr outside its Pallas kernels (XLA's part of the computation)."""
  return collections.Counter(eqn.primitive.name for eqn in _eqns_outside_kernels(jaxpr))


def kernel_launches(jaxpr) -> list:
  """The pallas_call equations of a jaxpr, nested ones included."""
  return [eqn for eqn in _eqns_outside_kernels(jaxpr) if eqn.primitive.name == "pallas_call"]


def documents(lengths, batch=1):
  return jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None].repeat(batch, 0), jnp.int32)


def check(dims, chunk, dtype, precision, segment_ids=None, with_state=True, launch=ChunkedLaunch(),
          interpret=True, seed=0, use_qk_l2norm=True):
  """Values and every gradient against the reference. Without the l2 norm q, k are the operands as given: they
  are scaled by 0.1 so that the state stays bounded."""
  inputs = random_inputs(seed, *dims, dtype, with_state)
  if not use_qk_l2norm:
    inputs = (inputs[0] * 0.1, inputs[1] * 0.1, *inputs[2:])
  expected = values_and_grads(functools.partial(chunk_gated_delta_rule_reference, use_qk_l2norm=use_qk_l2norm),
                              *inputs, segment_ids, chunk)
  kernel = lambda *a, **kw: chunk_gated_delta_rule_gpu(*a, precision=precision, launch=launch,
                                                       interpret=interpret, use_qk_l2norm=use_qk_l2norm, **kw)
  got = values_and_grads(kernel, *inputs, segment_ids, chunk)
  names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"][: 8 if with_state else 7]
  for name, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert a.dtype == b.dtype, name
    assert relative_error(a, b) < TOLERANCE[precision], name


# batch, length, key heads, value heads, key dim, value dim; chunk; initial state
@pytest.mark.parametrize("dims, chunk, with_state", [
    ((1, 100, 1, 2, 64, 32), 32, True),  # ragged tail; 4 key blocks, 2 value blocks with SMALL_TILES; Dk != Dv
    ((2, 20, 2, 2, 16, 16), 16, False),  # one value head per key head, B > 1, shorter than two chunks
], ids=["groups2_tiles", "groups1_short"])
def test_float32_matches_reference_with_small_tiles(dims, chunk, with_state):
  check(dims, chunk, jnp.float32, "ieee", with_state=with_state, launch=SMALL_TILES)


def test_packed_documents_with_small_tiles():
  """Documents of 30, 50 and 20 tokens in chunks of 32: boundaries inside chunks, one chunk holding three."""
  check((1, 100, 1, 2, 32, 32), 32, jnp.float32, "ieee", segment_ids=documents([30, 3, 47, 20]),
        launch=SMALL_TILES)


@pytest.mark.parametrize("launch", [ChunkedLaunch(norm_grads_kernel=False), ChunkedLaunch(norm_grads_kernel=True)],
                         ids=["xla_norm", "norm_kernel"])
@pytest.mark.parametrize("use_qk_l2norm", [True, False], ids=["l2norm", "no_l2norm"])
def test_qk_gradients_with_or_without_the_norm(launch, use_qk_l2norm):
  """dq, dk by gpu_norm_grads.py's kernel or by XLA autodiff, through the l2 norm or not."""
  check((1, 70, 2, 4, 32, 32), 32, jnp.float32, "ieee", launch=launch, seed=3, use_qk_l2norm=use_qk_l2norm)


@pytest.mark.parametrize("dtype, precision", [(jnp.float32, "ieee"), (jnp.bfloat16, "bf16")], ids=["f32", "bf16"])
def test_qk_norm_kernel_groups_ragged(dtype, precision):
  """The forward's l2 norm in gpu_qk_norm.py's kernel: B = 2, two key heads of two value heads, a ragged tail (the
  padded tokens are zero: their norm must stay finite), documents; values and every gradient."""
  check((2, 70, 2, 4, 32, 16), 32, dtype, precision, segment_ids=documents([30, 3, 17, 20], batch=2),
        launch=ChunkedLaunch(qk_norm_kernel=True))


def test_qk_norm_kernel_matches_the_float64_norm():
  """gpu_qk_norm.l2_normalize_qk against a float64 numpy norm, rows of very different scales, both dtypes out."""
  from maxtext.kernels.gated_delta_rule import gpu_qk_norm  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  q, k = (rng.normal(size=(2, 48, 3, 32)) * rng.uniform(1e-2, 1e2, size=(2, 48, 3, 1)) for _ in range(2))
  for dtype, tolerance in ((jnp.float32, 1e-6), (jnp.bfloat16, 8e-3)):
    got = gpu_qk_norm.l2_normalize_qk(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), rows=16,
                                      dtype=dtype, interpret=True)
    for x, y in zip((q, k), got):
      expected = x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
      assert y.dtype == dtype and np.abs(np.asarray(y, np.float64) - expected).max() < tolerance


def test_norm_grads_kernel_bf16_packed():
  """gpu_norm_grads.py's kernel on bf16 with documents inside and across chunks, a ragged tail and an initial
  state: values and every gradient against the reference."""
  check((1, 150, 2, 4, 32, 32), 32, jnp.bfloat16, "bf16", segment_ids=documents([40, 3, 77, 30]),
        launch=ChunkedLaunch(norm_grads_kernel=True))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("dtype, precision", [(jnp.float32, "ieee"), (jnp.bfloat16, "bf16")], ids=["f32", "bf16"])
def test_prefill_scores_formed_in_the_walk(packed, dtype, precision, reads_w=False, dims=(1, 150, 2, 4, 32, 32),
                                          chunk=32, interpret=True, walks=None, roles=0, transposed_chain=False):
  """A forward alone with ChunkedLaunch(prefill_scores_in_walk=True): the walk forms P itself and the prep's P launch
  is gone; o and the final state against the reference (documents inside and across chunks, a ragged tail, an
  initial state, two value heads per key head). With a backward, P is still the prep's (saved for it)."""
  segment_ids = documents([40, 3, 57, dims[1] - 100], batch=dims[0]) if packed else None
  q, k, v, g, beta, h0 = random_inputs(5, *dims, dtype, True)
  walk = {} if walks is None else dict(forward_walk_mosaic=walks)
  launch = ChunkedLaunch(prefill_scores_in_walk=True, fused_walk_reads_w=reads_w, forward_walk_roles=roles,
                         roles_transposed_chain=transposed_chain, **walk)
  run = lambda *a: chunk_gated_delta_rule_gpu(*a, segment_ids=segment_ids, chunk_size=chunk, precision=precision,
                                              interpret=interpret, launch=launch)
  expected = chunk_gated_delta_rule_reference(q, k, v, g, beta, h0, segment_ids=segment_ids, chunk_size=chunk)
  got = jax.jit(run)(q, k, v, g, beta, h0)
  for name, a, b in zip(("o", "final_state"), got, expected):
    assert relative_error(a, b) < TOLERANCE[precision], name
  forward_text = str(jax.make_jaxpr(run)(q, k, v, g, beta, h0))
  walk_name = "gdr_forward_walk_roles" if roles else "gdr_walk_fwd" if not walks else f"gdr_forward_walk_{walks}wg"
  assert walk_name in forward_text and "gdr_prep_t_fwd" in forward_text
  assert not scores_launched(forward_text)
  grad_text = str(jax.make_jaxpr(jax.grad(lambda *a: run(*a)[0].astype(jnp.float32).sum()))(q, k, v, g, beta, h0))
  assert scores_launched(grad_text)


def raw_qk_prefill(seed, launch, packed, dtype, precision, dims, chunk, interpret):
  """A forward alone on raw q, k whose rows differ in scale by 1e-2 to 1e2 (documents inside and across chunks when
  packed, an initial state), its o and final state checked against the reference; returns (the jaxpr of the forward
  alone, that of the gradient), where the norm's place is for the caller to assert."""
  batch, length, key_heads = dims[:3]
  segment_ids = documents([30, 3, 17, length - 50], batch=batch) if packed else None
  q, k, *rest = random_inputs(seed, *dims, dtype, True)
  scales = jnp.asarray(np.random.default_rng(seed).uniform(1e-2, 1e2, size=(batch, length, key_heads, 1)), dtype)
  inputs = (q * scales, k * scales[:, ::-1], *rest)
  run = lambda *a: chunk_gated_delta_rule_gpu(*a, segment_ids=segment_ids, chunk_size=chunk, precision=precision,
                                              interpret=interpret, launch=launch)
  expected = chunk_gated_delta_rule_reference(*inputs, segment_ids=segment_ids, chunk_size=chunk)
  for name, a, b in zip(("o", "final_state"), jax.jit(run)(*inputs), expected):
    assert relative_error(a, b) < TOLERANCE[precision], name
  grad = jax.grad(lambda *a: run(*a)[0].astype(jnp.float32).sum())
  return jax.make_jaxpr(run)(*inputs).jaxpr, jax.make_jaxpr(grad)(*inputs).jaxpr


def launch_outputs(jaxpr, name: str) -> list[int]:
  """The output counts of a jaxpr's kernel launches of this name."""
  return [len(e.outvars) for e in kernel_launches(jaxpr) if e.params["name"] == name]


@pytest.mark.parametrize("applies, packed, dtype, precision", [
    (True, True, jnp.float32, "ieee"), (True, False, jnp.bfloat16, "bf16"), (True, True, jnp.bfloat16, "bf16"),
    (False, False, jnp.float32, "ieee")], ids=str)
def test_prefill_normalizes_in_the_walk(applies, packed, dtype, precision, dims=(2, 70, 2, 6, 32, 16), chunk=32,
                                        interpret=True, walk=None):
  """A forward alone with ChunkedLaunch(walk_normalizes_qk=True): the T launch takes the raw q, k and writes their
  reciprocal norms, the walk (forming P) scales its products of the raw q, k by them; B = 2, two key heads of three
  value heads, a ragged tail, raw q, k rows of very different scales, an initial state; o and the final state against
  the reference. Where it does not apply (the walk reading w), XLA's norm stays; the gradient's forward keeps it."""
  launch = ChunkedLaunch(walk_normalizes_qk=True, prefill_scores_in_walk=True, fused_walk_reads_w=not applies,
                         **(walk or {}))
  forward, grad = raw_qk_prefill(7, launch, packed, dtype, precision, dims, chunk, interpret)
  prep_outputs = lambda jaxpr: launch_outputs(jaxpr, "gdr_prep_t_fwd")
  assert ("rsqrt" in primitives_outside_kernels(forward)) != applies
  assert prep_outputs(forward) == [3 if applies else 2]  # T and the reciprocal norms of q, k; or T and w
  assert primitives_outside_kernels(grad)["rsqrt"] > 0 and prep_outputs(grad) == [1 if applies else 2]


@pytest.mark.parametrize("packed, dtype, precision, reads_w", [
    (True, jnp.float32, "ieee", False), (False, jnp.bfloat16, "bf16", False), (True, jnp.bfloat16, "bf16", False),
    (False, jnp.float32, "ieee", True)], ids=str)
def test_prefill_normalizes_in_the_scores_launch(packed, dtype, precision, reads_w, dims=(2, 70, 2, 6, 32, 16),
                                                 chunk=32, interpret=True, walk=None):
  """A forward alone with ChunkedLaunch(prefill_scores_norm=True): P's launch takes the raw q, k and writes them
  normalised besides P, for the T launch and the walk (which loads P); B = 2, two key heads of three value heads, a
  ragged tail, raw q, k rows of very different scales, an initial state; o and the final state against the reference.
  No norm runs outside the kernels; the gradient's forward keeps XLA's norm and P's launch writes P alone."""
  launch = ChunkedLaunch(prefill_scores_norm=True, fused_walk_reads_w=reads_w, **(walk or {}))
  forward, grad = raw_qk_prefill(8, launch, packed, dtype, precision, dims, chunk, interpret)
  scores_outputs = lambda jaxpr: launch_outputs(jaxpr, "gdr_scores_fwd")
  assert "rsqrt" not in primitives_outside_kernels(forward)
  assert scores_outputs(forward) == [3]  # P and the normalised q, k
  assert primitives_outside_kernels(grad)["rsqrt"] > 0 and scores_outputs(grad) == [1]


def test_prefill_scores_formed_in_the_walk_that_reads_w():
  test_prefill_scores_formed_in_the_walk(True, jnp.float32, "ieee", reads_w=True)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_bf16_inputs_in_each_precision(precision):
  check((1, 130, 1, 2, 32, 32), 64, jnp.bfloat16, precision)


def test_fused_forward_packed_ragged_with_state():
  """gpu_fused.py's forward and the reverse walk that forms P^T do: documents inside and across chunks, a ragged
  tail (100 tokens in chunks of 32), an initial state, two value blocks; values and every gradient."""
  launch = dataclasses.replace(SMALL_TILES, fused_forward=True)
  check((1, 100, 1, 2, 32, 32), 32, jnp.float32, "ieee", segment_ids=documents([30, 3, 47, 20]), launch=launch)


@pytest.mark.parametrize("inverse", [None, "bf16"], ids=["tf32_inverse", "bf16_inverse"])
def test_fused_forward_bf16_groups(inverse):
  """The fused path (its walk reading w) in the 16-bit default precision, B = 2, two value heads per key head,
  Dk != Dv; the WY inverse's dots in the default precision or in bf16."""
  check((2, 70, 2, 4, 32, 16), 16, jnp.bfloat16, "bf16",
        launch=ChunkedLaunch(fused_forward=True, fused_walk_reads_w=True, inverse_precision=inverse))


@pytest.mark.parametrize("fused_forward", [False, True], ids=["split_forward", "fused_forward"])
def test_fused_backward_packed_ragged_with_state(fused_forward):
  """gpu_backward.py's one kernel for the backward's parallel part, after either forward (the fused one hands it
  P, the split one does not): documents inside and across chunks, a ragged tail, an initial state, two key blocks
  (its two-phase path) and two value blocks; values and every gradient. After the split forward its grid runs
  the chunks fastest (grad_heads_fastest=False), after the fused one the value heads."""
  launch = ChunkedLaunch(block_v=16, grad_block_k=16, grad_block_v=16, fused_forward=fused_forward,
                         fused_backward=True, grad_heads_fastest=fused_forward)
  check((1, 100, 1, 2, 32, 32), 32, jnp.float32, "ieee", segment_ids=documents([30, 3, 47, 20]), launch=launch)


def test_fused_backward_bf16_groups():
  """The fused backward in the 16-bit default precision with the blocked inverse: B = 2, two value heads per key
  head, Dk != Dv, a ragged tail, no initial state; one key block (grad_block_k >= Dk: its single-pass path)."""
  check((2, 70, 2, 4, 32, 16), 16, jnp.bfloat16, "bf16", with_state=False,
        launch=ChunkedLaunch(inverse_block=16, fused_backward=True))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_prep_per_key_head_groups(packed):
  """The prep by key head (k k^T and q k^T once for both value heads of each key head): B = 2, two key heads of
  two value heads, blocks of 16 in chunks of 32, a ragged tail, an initial state; values and every gradient."""
  segment_ids = documents([30, 3, 17, 20], batch=2) if packed else None
  check((2, 70, 2, 4, 32, 16), 32, jnp.float32, "ieee", segment_ids=segment_ids,
        launch=ChunkedLaunch(inverse_block=16, prep_per_key_head=True))


@pytest.mark.parametrize("launch", [dict(prep_per_key_head=True), dict(prep_split=True), dict(scores_warps=4)],
                         ids=str)
def test_prep_forms_need_the_blocked_inverse(launch):
  q, k, v, g, beta, _ = random_inputs(0, 1, 32, 1, 2, 16, 16, jnp.float32, False)
  with pytest.raises(ValueError, match="prep_per_key_head, prep_split and scores_warps need inverse_block"):
    chunk_gated_delta_rule_gpu(q, k, v, g, beta, None, chunk_size=16, interpret=True,
                               launch=ChunkedLaunch(inverse_block=None, **launch))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("dtype, precision", [(jnp.float32, "ieee"), (jnp.bfloat16, "bf16")], ids=["f32", "bf16"])
def test_prep_split_groups(packed, dtype, precision):
  """T and P by separate launches (ChunkedLaunch.prep_split): B = 2, two key heads of two value heads, blocks of
  16 in chunks of 32, a ragged tail, an initial state; values and every gradient."""
  segment_ids = documents([30, 3, 17, 20], batch=2) if packed else None
  check((2, 70, 2, 4, 32, 16), 32, dtype, precision, segment_ids=segment_ids,
        launch=ChunkedLaunch(inverse_block=16, prep_split=True, scores_warps=0))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("dtype, precision", [(jnp.float32, "ieee"), (jnp.bfloat16, "bf16")], ids=["f32", "bf16"])
def test_scores_by_key_head_groups(packed, dtype, precision):
  """P by gpu_fused.scores_kernel (ChunkedLaunch.scores_warps: one program per key head serving its value heads):
  B = 2, two key heads of three value heads, a ragged tail, documents across chunk edges; every gradient."""
  segment_ids = documents([30, 3, 17, 20], batch=2) if packed else None
  check((2, 70, 2, 6, 32, 16), 32, dtype, precision, segment_ids=segment_ids, launch=ChunkedLaunch(scores_warps=4))


def test_prep_split_with_the_walk_reading_w():
  """prep_split's T launch also writes w for the walk that reads it (fused_walk_reads_w)."""
  check((1, 70, 1, 2, 32, 16), 32, jnp.float32, "ieee",
        launch=ChunkedLaunch(prep_split=True, scores_warps=0, fused_walk_reads_w=True))


@pytest.mark.parametrize("reads_w", [False, True], ids=["kh", "w"])
def test_fused_forward_alone_matches_reference(reads_w):
  """A forward without a backward skips the state history: o and the final state still match."""
  q, k, v, g, beta, h0 = random_inputs(1, 2, 70, 2, 4, 32, 16, jnp.float32, True)
  launch = dataclasses.replace(SMALL_TILES, fused_forward=True, fused_walk_reads_w=reads_w)
  out, state = chunk_gated_delta_rule_gpu(q, k, v, g, beta, h0, chunk_size=16, precision="ieee", launch=launch,
                                          interpret=True)
  expected, expected_state = chunk_gated_delta_rule_reference(q, k, v, g, beta, h0, chunk_size=16)
  assert relative_error(out, expected) < 1e-5 and relative_error(state, expected_state) < 1e-5


@pytest.mark.parametrize("sizes", [dict(key_dim=24), dict(value_dim=8)], ids=str)
def test_rejects_dims_triton_cannot_tile(sizes):
  key_dim, value_dim = sizes.get("key_dim", 16), sizes.get("value_dim", 16)
  q, k, v, g, beta, _ = random_inputs(0, 1, 32, 1, 2, key_dim, value_dim, jnp.float32, False)
  name = next(iter(sizes))
  with pytest.raises(ValueError, match=f"{name}={sizes[name]} must be a power of two >= 16"):
    chunk_gated_delta_rule_gpu(q, k, v, g, beta, None, chunk_size=16, interpret=True)


def test_auto_on_gpu_runs_xla_for_sizes_triton_cannot_tile(monkeypatch):
  """Dk = 8: impl='auto' on a GPU picks 'xla' (the Triton kernels would refuse it), and matches the reference."""
  monkeypatch.setattr(dispatch, "backend", lambda: "gpu")
  q, k, v, g, beta, _ = random_inputs(2, 1, 40, 1, 2, 8, 16, jnp.float32, False)
  expected, expected_state = chunk_gated_delta_rule_reference(q, k, v, g, beta, chunk_size=16)
  out, state = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16)
  assert relative_error(out, expected) < 1e-5 and relative_error(state, expected_state) < 1e-5
  with pytest.raises(ValueError, match="key_dim=8 must be a power of two >= 16"):
    chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, impl="gpu")


# On a GPU: production chunk and head sizes through the real Triton lowering. TF32 rounds operands to 2^-11:
# 3e-3 (the benchmark measured ~5e-4 end to end). 'tf32' runs on float32 inputs, so that its outputs are float32:
# with bf16 outputs one rounding flip of a near-maximal element of dq already read 3.4e-3 (H100, 2026-11-24).
DEVICE_TOLERANCE = {"ieee": 1e-5, "tf32": 3e-3, "bf16": 1e-2}


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("path", list(FUSED))
def test_compiled_on_gpu_matches_reference(precision, packed, path, monkeypatch):
  segment_ids = documents([100, 300, 1, 500, 123], batch=2) if packed else None
  monkeypatch.setitem(TOLERANCE, precision, DEVICE_TOLERANCE[precision])
  dtype = jnp.float32 if precision == "tf32" else jnp.bfloat16
  check((2, 1024, 2, 4, 128, 128), 64, dtype, precision, segment_ids=segment_ids, interpret=False,
        launch=ChunkedLaunch(**FUSED[path]))


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("length", [64, 100, 200], ids=["one_chunk", "two_chunks_ragged", "four_chunks_ragged"])
@pytest.mark.parametrize("path", ["default", "mosaic_walks", "mosaic_bwd", "walks_2wg", "walk_roles", "walk_roles2"])
def test_compiled_on_gpu_short_sequences(length, path, monkeypatch):
  """The Mosaic kernels' chunk loops at one to four chunks (their double-buffered loads: the first chunk is the last
  one), bf16, an initial state; values and every gradient against the reference."""
  monkeypatch.setitem(TOLERANCE, "bf16", DEVICE_TOLERANCE["bf16"])
  check((2, length, 2, 4, 128, 128), 64, jnp.bfloat16, "bf16", interpret=False, launch=ChunkedLaunch(**FUSED[path]))


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("path", ["mosaic_walks", "walks_2wg", "walk_roles", "walk_roles2"])
def test_compiled_on_gpu_wide_value_heads(path, monkeypatch):
  """Dv = 256: two programs per value head in the Mosaic walks (the second one's columns start at 64 x warpgroups);
  bf16, an initial state, a ragged tail; values and every gradient against the reference."""
  monkeypatch.setitem(TOLERANCE, "bf16", DEVICE_TOLERANCE["bf16"])
  check((1, 300, 1, 2, 128, 256), 64, jnp.bfloat16, "bf16", interpret=False, launch=ChunkedLaunch(**FUSED[path]))


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("packed, walks, roles, transposed_chain",
                         [(False, None, 0, None), (True, None, 0, None), (False, 1, 0, None), (False, 2, 0, None),
                          (False, None, 3, False), (False, None, 2, False), (False, None, 3, True)],
                         ids=["triton_walk", "triton_walk_packed", "mosaic_walk_1wg", "mosaic_walk_2wg",
                              "mosaic_walk_roles", "mosaic_walk_roles2", "mosaic_walk_roles_t"])
def test_compiled_on_gpu_prefill_scores_in_walk(packed, walks, roles, transposed_chain, monkeypatch):
  """ChunkedLaunch(prefill_scores_in_walk=True) compiled: a forward alone at B = 2, T = 1000, d 128, bf16, P formed
  in the Triton walk or in gpu_mosaic_walks.py's (one or two warpgroups, each forming its own, or the output
  warpgroup of gpu_mosaic_roles.py's walk, or its third one)."""
  monkeypatch.setitem(TOLERANCE, "bf16", DEVICE_TOLERANCE["bf16"])
  test_prefill_scores_formed_in_the_walk(packed, jnp.bfloat16, "bf16", dims=(2, 1000, 2, 4, 128, 128), chunk=64,
                                         interpret=False, walks=walks, roles=roles, transposed_chain=transposed_chain)


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("roles, transposed_chain", [(3, False), (2, False), (3, True)],
                         ids=["roles", "roles2", "roles_t"])
@pytest.mark.parametrize("dims", [(2, 64, 2, 4, 128, 128), (2, 100, 2, 4, 128, 128), (1, 200, 1, 2, 128, 128),
                                  (1, 300, 1, 2, 128, 256)], ids=["one_chunk", "two_ragged", "four_ragged", "dv256"])
def test_compiled_on_gpu_prefill_roles_short_and_wide(dims, roles, transposed_chain, monkeypatch):
  """A forward alone in roles (by rows, or the transposed chain: jax 0.11) at one to four chunks (the double-buffered
  loads and published tiles: the first chunk is the last one) and at Dv = 256 (two CTAs a value head): o and the
  final state against the reference."""
  monkeypatch.setitem(TOLERANCE, "bf16", DEVICE_TOLERANCE["bf16"])
  test_prefill_scores_formed_in_the_walk(False, jnp.bfloat16, "bf16", dims=dims, chunk=64, interpret=False,
                                         roles=roles, transposed_chain=transposed_chain)


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("walk", [dict(forward_walk_roles=3), dict(forward_walk_roles=0, forward_walk_mosaic=2),
                                  dict(forward_walk_roles=0, forward_walk_mosaic=0)],
                         ids=["roles", "mosaic_2wg", "triton"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_compiled_on_gpu_prefill_scores_launch(walk, packed, monkeypatch):
  """A forward alone whose walk loads P from gpu_fused.scores_kernel (scores_warps=4, prefill_scores_in_walk=False)
  at B = 2, T = 1000, d 128, bf16: o and the final state against the reference, and no blocked P launch."""
  monkeypatch.setitem(TOLERANCE, "bf16", DEVICE_TOLERANCE["bf16"])
  segment_ids = documents([40, 3, 557, 400], batch=2) if packed else None
  q, k, v, g, beta, h0 = random_inputs(5, 2, 1000, 2, 4, 128, 128, jnp.bfloat16, True)
  launch = ChunkedLaunch(scores_warps=4, prefill_scores_in_walk=False, **walk)
  run = lambda *a: chunk_gated_delta_rule_gpu(*a, segment_ids=segment_ids, chunk_size=64, precision="bf16",
                                              launch=launch)
  expected = chunk_gated_delta_rule_reference(q, k, v, g, beta, h0, segment_ids=segment_ids, chunk_size=64)
  got = jax.jit(run)(q, k, v, g, beta, h0)
  for name, a, b in zip(("o", "final_state"), got, expected):
    assert relative_error(a, b) < TOLERANCE["bf16"], name
  text = str(jax.make_jaxpr(run)(q, k, v, g, beta, h0))
  assert "gdr_scores_fwd" in text and "gdr_prep_p_fwd" not in text


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("walk", [dict(forward_walk_roles=3), dict(forward_walk_roles=2),
                                  dict(forward_walk_roles=0, forward_walk_mosaic=0)], ids=["roles", "roles2", "triton"])
@pytest.mark.parametrize("dims", [(2, 1000, 2, 4, 128, 128), (1, 100, 1, 2, 128, 128), (1, 300, 1, 2, 128, 256)],
                         ids=["b2_t1000", "two_ragged", "dv256"])
def test_compiled_on_gpu_prefill_normalizes_in_the_walk(walk, dims, monkeypatch):
  """ChunkedLaunch(walk_normalizes_qk=True) compiled: a forward alone, bf16, raw q, k of very different scales, P
  formed in gpu_mosaic_roles.py's walk (by its third warpgroup, or by the output warpgroup of two) or in Triton's;
  two chunks with a ragged tail and Dv = 256 (two CTAs a value head) too; o and the final state."""
  monkeypatch.setitem(TOLERANCE, "bf16", DEVICE_TOLERANCE["bf16"])
  test_prefill_normalizes_in_the_walk(True, False, jnp.bfloat16, "bf16", dims=dims, chunk=64, interpret=False,
                                      walk=walk)


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
def test_compiled_on_gpu_prefill_normalizes_in_the_walk_packed(monkeypatch):
  """The same with documents (the Triton walk: the Mosaic walks take no segment ids)."""
  monkeypatch.setitem(TOLERANCE, "bf16", DEVICE_TOLERANCE["bf16"])
  test_prefill_normalizes_in_the_walk(True, True, jnp.bfloat16, "bf16", dims=(2, 1000, 2, 4, 128, 128), chunk=64,
                                      interpret=False)


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("walk", [dict(forward_walk_roles=3), dict(forward_walk_roles=3, roles_transposed_chain=True),
                                  dict(forward_walk_roles=0, forward_walk_mosaic=2),
                                  dict(forward_walk_roles=0, forward_walk_mosaic=0)],
                         ids=["roles", "roles_t", "mosaic_2wg", "triton"])
@pytest.mark.parametrize("dims", [(2, 1000, 2, 4, 128, 128), (1, 100, 1, 2, 128, 128), (1, 300, 1, 2, 128, 256)],
                         ids=["b2_t1000", "two_ragged", "dv256"])
def test_compiled_on_gpu_prefill_normalizes_in_the_scores_launch(walk, dims, monkeypatch):
  """ChunkedLaunch(prefill_scores_norm=True) compiled: a forward alone, bf16, raw q, k of very different scales
  normalised by P's launch (4 warps by default there); the walk in roles (by rows or transposed), the two-warpgroup Mosaic walk or
  Triton's, loading P; two chunks with a ragged tail and Dv = 256 too; o and the final state."""
  if walk.get("roles_transposed_chain") and tuple(jax.__version_info__[:2]) < (0, 11):
    pytest.skip("the transposed chain needs jax 0.11")
  monkeypatch.setitem(TOLERANCE, "bf16", DEVICE_TOLERANCE["bf16"])
  test_prefill_normalizes_in_the_scores_launch(False, jnp.bfloat16, "bf16", False, dims=dims, chunk=64,
                                               interpret=False, walk=walk)


@pytest.mark.device
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")
def test_compiled_on_gpu_prefill_normalizes_in_the_scores_launch_packed(monkeypatch):
  """The same with documents (the Triton walk: the Mosaic walks take no segment ids)."""
  monkeypatch.setitem(TOLERANCE, "bf16", DEVICE_TOLERANCE["bf16"])
  test_prefill_normalizes_in_the_scores_launch(True, jnp.bfloat16, "bf16", False, dims=(2, 1000, 2, 4, 128, 128),
                                               chunk=64, interpret=False)


def test_prefill_scores_in_the_walk_by_default_only_in_a_mosaic_walk(monkeypatch):
  """ChunkedLaunch(prefill_scores_in_walk=None): a forward alone keeps the prep's P launch with the Triton walk and
  skips it where the forward walk is a Mosaic one, which then gets no P (here forced, a stand-in for the Mosaic
  kernel, which needs a Hopper to lower)."""
  from maxtext.kernels.gated_delta_rule import gpu, gpu_mosaic_walks  # pylint: disable=import-outside-toplevel
  calls = []

  def fake_walk(q, k, v, gc, beta, t, scores, h0, **launch):  # pylint: disable=unused-argument
    calls.append(scores is None)
    batch, _, heads, dim = v.shape
    return (jnp.zeros_like(v), jnp.zeros((batch, heads, q.shape[-1], dim), jnp.float32))
  monkeypatch.setattr(gpu, "_mosaic_walks", lambda warpgroups, **kw: warpgroups)
  monkeypatch.setattr(gpu_mosaic_walks, "forward_walk", fake_walk)
  q, k, v, g, beta, h0 = random_inputs(0, 1, 128, 2, 4, 32, 32, jnp.bfloat16, True)
  for walks, expected in ((2, [True]), (0, [])):
    calls.clear()
    run = lambda *a: chunk_gated_delta_rule_gpu(*a, chunk_size=32, interpret=True,
                                                launch=ChunkedLaunch(forward_walk_mosaic=walks, forward_walk_roles=0))
    text = str(jax.make_jaxpr(run)(q, k, v, g, beta, h0))
    assert scores_launched(text) == (walks == 0) and calls == expected


@pytest.mark.parametrize("scores_norm", [None, False], ids=["default", "scores_in_walk"])
def test_forward_walk_roles_where_asked(scores_norm, monkeypatch):
  """ChunkedLaunch(forward_walk_roles=3) runs gpu_mosaic_roles.forward_walk in place of the forward walk
  (here a stand-in: the Mosaic kernel needs a Hopper to lower). Forward alone, by default with few walk programs, P
  comes from the launch that normalises q, k (4 warps, three outputs) and the chain is transposed on jax 0.11;
  with prefill_scores_norm=False the walk forms P (no P launch, scores None). With a backward it gets the 8-warp
  P launch's P and saves the history; 0 keeps the Triton walk."""
  from maxtext.kernels.gated_delta_rule import gpu_mosaic_roles  # pylint: disable=import-outside-toplevel
  calls = []

  def fake_walk(q, k, v, gc, beta, t, scores, h0, *, save, warpgroups, transposed_chain, **launch):  # pylint: disable=unused-argument
    calls.append((scores is None, save, warpgroups, transposed_chain))
    batch, length, heads, dim = v.shape
    final = jnp.zeros((batch, heads, q.shape[-1], dim), jnp.float32)
    history = (jnp.zeros((batch, heads, length // 32, q.shape[-1], dim), v.dtype), jnp.zeros_like(v))
    return (jnp.zeros_like(v), final) + (history if save else ())
  monkeypatch.setattr(gpu, "_mosaic_walks", lambda warpgroups, **kw: warpgroups)
  monkeypatch.setattr(gpu_mosaic_roles, "forward_walk", fake_walk)
  q, k, v, g, beta, h0 = random_inputs(0, 1, 128, 2, 4, 32, 32, jnp.bfloat16, True)
  transposed = scores_norm is None and tuple(jax.__version_info__[:2]) >= (0, 11)
  scores_launches = lambda jaxpr: [(len(e.outvars), e.params["compiler_params"].num_warps)
                                   for e in kernel_launches(jaxpr) if e.params["name"] == "gdr_scores_fwd"]
  for roles in (3, 2, 0):
    calls.clear()
    launch = ChunkedLaunch(forward_walk_roles=roles, forward_walk_mosaic=0, reverse_walk_mosaic=0,
                           chunk_grads_mosaic=0, prefill_scores_norm=scores_norm)
    run = lambda *a, launch=launch: chunk_gated_delta_rule_gpu(*a, chunk_size=32, interpret=True, launch=launch)
    forward = jax.make_jaxpr(run)(q, k, v, g, beta, h0).jaxpr
    loss = lambda *a, run=run: run(*a)[0].astype(jnp.float32).sum()
    grad = jax.make_jaxpr(jax.grad(loss))(q, k, v, g, beta, h0).jaxpr
    alone = (scores_norm is not None, False, roles, transposed)
    assert calls == ([alone, (False, True, roles, False)] if roles else [])
    if roles and scores_norm is None:
      assert scores_launches(forward) == [(3, 4)] and "rsqrt" not in primitives_outside_kernels(forward)
    else:
      assert scores_launched(str(forward)) == (not roles)
    assert scores_launches(grad) == [(1, 8)]
    assert ("gdr_walk_fwd" in str(forward)) == (not roles)


def test_prefill_scores_norm_by_default_only_for_few_roles_programs():
  """ChunkedLaunch.prefill_scores_norm=None: a forward alone normalises q, k in P's launch where the walk is in roles
  with at most SCORES_NORM_PROGRAMS programs (Hv 32, Dv 128: B = 1, not 2), and not where the launch says where P
  comes from; the transposed chain follows it on jax 0.11."""
  rule = gpu.prefill_scores_norm
  assert rule(ChunkedLaunch(), 1, 32, 128, 3) and rule(ChunkedLaunch(), 2, 16, 128, 3)
  assert not rule(ChunkedLaunch(), 2, 32, 128, 3) and not rule(ChunkedLaunch(), 1, 32, 128, 0)
  assert not rule(ChunkedLaunch(prefill_scores_in_walk=True), 1, 32, 128, 3)
  assert not rule(ChunkedLaunch(prefill_scores_in_walk=False), 1, 32, 128, 3)
  assert rule(ChunkedLaunch(prefill_scores_norm=True), 8, 32, 128, 0)
  assert not rule(ChunkedLaunch(prefill_scores_norm=False), 1, 32, 128, 3)
  new_jax = tuple(jax.__version_info__[:2]) >= (0, 11)
  assert gpu.roles_transposed_chain(ChunkedLaunch(), True) == new_jax
  assert not gpu.roles_transposed_chain(ChunkedLaunch(), False)
  assert not gpu.roles_transposed_chain(ChunkedLaunch(roles_transposed_chain=False), True)


def test_reverse_walk_with_its_own_value_blocks():
  """The forward walk over whole 32-column value blocks, the reverse walk over 16-column ones (reverse_block_v):
  documents inside and across chunks, a ragged tail, an initial state; values and every gradient."""
  check((1, 100, 1, 2, 32, 32), 32, jnp.float32, "ieee", segment_ids=documents([30, 3, 47, 20]),
        launch=ChunkedLaunch(block_v=32, reverse_block_v=16, reverse_walk_warps=2))


def test_walk_blocks_widen_both_walks_only_when_programs_stay_plenty():
  default = ChunkedLaunch()
  assert walk_blocks(default, 1, 32, 128) == (32, 32)  # 64 programs of 64 columns: too few for 132 SMs
  assert walk_blocks(default, 8, 32, 128) == (64, 64)  # 512 programs of 64, both walks
  assert walk_blocks(default, 8, 32, 128, jnp.float32) == (32, 32)  # float32 storage keeps the measured tiles
  assert walk_blocks(default, 8, 32, 16) == (16, 16)  # capped at Dv
  assert walk_blocks(ChunkedLaunch(block_v=16), 8, 32, 128) == (16, 16)  # an explicit block_v sets both walks
  assert walk_blocks(ChunkedLaunch(block_v=64, reverse_block_v=16), 1, 32, 128) == (64, 16)


def test_walk_warpgroups_two_only_with_many_programs():
  default = ChunkedLaunch()
  assert walk_warpgroups(default, 1, 32, 128) == (0, 1)  # 32 CTAs of two would leave most of 132 SMs idle
  assert walk_warpgroups(default, 8, 32, 128) == (2, 2)  # 512 blocks of 64 columns
  assert walk_warpgroups(default, 8, 32, 64) == (0, 1)
  assert walk_warpgroups(ChunkedLaunch(forward_walk_mosaic=1, reverse_walk_mosaic=0), 8, 32, 128) == (1, 0)


def test_forward_walk_in_roles_by_default_where_no_mosaic_walk_is():
  """ChunkedLaunch(forward_walk_roles=None): three warpgroups in roles where walk_warpgroups picks the Triton forward
  walk (few 64-column blocks), none where the two-warpgroup walk runs; an explicit count stands."""
  default = ChunkedLaunch()
  assert gpu.forward_walk_roles(default, 1, 32, 128) == 3 and gpu.forward_walk_roles(default, 4, 32, 128) == 3
  assert gpu.forward_walk_roles(default, 8, 32, 128) == 0
  assert gpu.forward_walk_roles(ChunkedLaunch(forward_walk_roles=2), 8, 32, 128) == 2
  assert gpu.forward_walk_roles(ChunkedLaunch(forward_walk_roles=0), 1, 32, 128) == 0
  with pytest.raises(ValueError, match="forward_walk_roles=1 must be 0"):
    ChunkedLaunch(forward_walk_roles=1)
  if tuple(jax.__version_info__[:2]) < (0, 11):  # CI's jax 0.10: the transposed chain is refused up front
    with pytest.raises(ValueError, match="roles_transposed_chain needs jax 0.11"):
      ChunkedLaunch(roles_transposed_chain=True)


def test_walk_stages_fit_the_tiles_in_shared_memory():
  default = ChunkedLaunch()
  assert walk_stages(default, jnp.bfloat16, 32) == 3 and walk_stages(default, jnp.bfloat16, 32, reverse=True) == 3
  assert walk_stages(default, jnp.bfloat16, 64) == 3  # the forward walk's 64-column tiles fit 3 stages
  assert walk_stages(default, jnp.bfloat16, 64, reverse=True) == 2  # the reverse walk's would need 238 KB
  assert walk_stages(default, jnp.float32, 32) == 1 and walk_stages(default, jnp.float32, 64, reverse=True) == 1
  assert walk_stages(ChunkedLaunch(walk_stages=2), jnp.bfloat16, 64, reverse=True) == 2
  assert walk_stages(ChunkedLaunch(walk_stages=2, reverse_walk_stages=1), jnp.bfloat16, 32, reverse=True) == 1
  assert walk_stages(ChunkedLaunch(reverse_walk_stages=1), jnp.bfloat16, 32) == 3  # the forward walk keeps its own


def test_mosaic_chunk_backward_only_where_it_applies():
  """gpu_mosaic_backward covers unsegmented bf16 chunks of 64 with 128-wide heads after the fused forward, compiled;
  everything else keeps the Triton kernel (its device test: path 'mosaic_bwd' above)."""
  from maxtext.kernels.gated_delta_rule.gpu_mosaic_backward import applies
  bf16 = jnp.bfloat16
  base = dict(chunk=64, key_dim=128, value_dim=128, dtypes=(bf16, bf16, bf16), segmented=False, with_scores=True,
              interpret=False)
  assert applies(**base)
  for change in (dict(chunk=32), dict(key_dim=64), dict(value_dim=256), dict(dtypes=(jnp.float32, bf16, bf16)),
                 dict(dtypes=(jnp.float16,) * 3), dict(dtypes=(bf16, bf16, jnp.float32)), dict(segmented=True),
                 dict(with_scores=False), dict(interpret=True)):
    assert not applies(**(base | change)), change
  with pytest.raises(ValueError, match="chunk_grads_mosaic=3 must be 0"):
    ChunkedLaunch(chunk_grads_mosaic=3)


def test_mosaic_walks_only_where_they_apply():
  """gpu_mosaic_walks covers unsegmented bf16 chunks of 64 with 128-wide keys and 64 | Dv (128 | Dv for two
  warpgroups a program), compiled (device test: paths 'default', 'mosaic_walks', 'walks_2wg' above)."""
  from maxtext.kernels.gated_delta_rule.gpu_mosaic_walks import applies
  bf16 = jnp.bfloat16
  base = dict(chunk=64, key_dim=128, value_dim=128, dtypes=(bf16, bf16, bf16), segmented=False, interpret=False)
  assert applies(**base) and applies(**(base | dict(value_dim=256)))
  assert applies(**base, warpgroups=2) and applies(**(base | dict(value_dim=256)), warpgroups=2)
  assert applies(**(base | dict(value_dim=64))) and not applies(**(base | dict(value_dim=64)), warpgroups=2)
  for change in (dict(chunk=32), dict(key_dim=64), dict(value_dim=96), dict(dtypes=(jnp.float32, bf16, bf16)),
                 dict(dtypes=(bf16, jnp.float32, bf16)), dict(segmented=True), dict(interpret=True)):
    assert not applies(**(base | change)), change


def test_mosaic_walks_take_the_most_warpgroups_that_apply(monkeypatch):
  """The launch's warpgroups per walk program where 64 x warpgroups divides Dv, else fewer; none (the Triton walk)
  when asked for none, in interpret mode, or where no form applies."""
  from maxtext.kernels.gated_delta_rule import gpu
  monkeypatch.setattr(gpu, "wgmma_device", lambda: True)
  bf16 = jnp.bfloat16
  scope = dict(chunk=64, key_dim=128, dtypes=(bf16, bf16, bf16), segmented=False, interpret=False)
  assert gpu._mosaic_walks(2, value_dim=128, **scope) == 2
  assert gpu._mosaic_walks(2, value_dim=64, **scope) == 1
  assert gpu._mosaic_walks(1, value_dim=256, **scope) == 1
  assert gpu._mosaic_walks(0, value_dim=128, **scope) == 0
  assert gpu._mosaic_walks(2, value_dim=96, **scope) == 0
  assert gpu._mosaic_walks(2, value_dim=128, **(scope | dict(interpret=True))) == 0
  for name in ("forward_walk_mosaic", "reverse_walk_mosaic"):
    with pytest.raises(ValueError, match=f"{name}=3 must be 0"):
      ChunkedLaunch(**{name: 3})


def test_mosaic_kernels_only_on_a_hopper(monkeypatch):
  """wgmma needs compute capability 9.x: another GPU keeps the Triton kernels; no GPU (a deviceless compile for
  the described H200) counts as one."""
  from maxtext.kernels.gated_delta_rule import gpu
  fake = lambda fields: lambda backend=None: [type("Gpu", (), fields)()]
  for fields, expected in (({"compute_capability": "9.0"}, True), ({"compute_capability": "8.0"}, False),
                           ({"compute_capability": "10.0"}, False), ({"compute_capability": "gfx942"}, False),
                           ({}, False)):
    gpu.wgmma_device.cache_clear()
    monkeypatch.setattr(gpu.jax, "devices", fake(fields))
    assert gpu.wgmma_device() is expected, fields

  def no_gpu(backend=None):
    raise RuntimeError("Unknown backend gpu")
  gpu.wgmma_device.cache_clear()
  monkeypatch.setattr(gpu.jax, "devices", no_gpu)
  assert gpu.wgmma_device()
  gpu.wgmma_device.cache_clear()
