"""Pallas kernels for the token-by-token gated delta rule (decode: T = 1, or a few tokens), forward only.

Same contract as reference.recurrent_gated_delta_rule_reference. One program per (batch, value head) (on GPU
also per block of value columns): it loads its [Dk, Dv] (or [Dk, BV]) float32 state once, runs the T steps in
registers, writes each step's output row and the new state once. The state output aliases the state input, so
a caller that donates the cache updates it in place. Grouped value heads read key head h // group through the
index (no repeated q, k); the l2-norm and the Dk**-0.5 scale of q and k are fused in the kernel.

Each step is a matrix-vector product, done as an elementwise multiply and a reduction over Dk in float32 (IEEE,
like the reference's HIGHEST einsums): at decode sizes the MXU / tensor cores would idle on one-row dots, and the
kernel's cost is moving the state, not the arithmetic. Token vectors are handled as q, k columns [Dk, 1] and
v, o rows [1, Dv], so one step function serves both backends.
The T steps are unrolled at trace time (static slices, which Mosaic needs): meant for decode and speculative
verification (T up to ~16); prefill belongs to the chunked form.

TPU (Mosaic): blocks keep the arrays' full trailing dims (the (8, 128) rule; a head dim squeezed out of
[B, T, H, D] is refused) by reading q, k, v and writing o as [B, H, T, D]: a bitcast for T = 1, a transpose of a
few tokens otherwise, never of the state. The kernel turns q, k into columns with an in-register transpose;
feeding them as [B, H, D, T] instead would pad each [D, T] block to 128 lanes in HBM, as large as a state tile.
With value heads innermost in the grid, consecutive programs of one group map to the same key block, which the
pipeline does not fetch again. Checked with a deviceless v5p compile (see tpu_aot_check.py for the recipe).
GPU (Triton): refs are whole arrays indexed per token in the model's layout, so there is no wrapper work; Triton
needs power-of-two tiles, hence Dk, Dv and the value block must be powers of two >= 16 (T is looped: any T).
Inside a sharded jit these calls must sit in `jax.shard_map`, like tpu.py's (interpret mode there needs
check_vma=False, as tests/kernels/test_gated_delta_rule_tpu.py explains; compiled kernels run with it on).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from maxtext.kernels.gated_delta_rule.chunking import L2_NORM_EPS, check_shapes
from maxtext.kernels.gated_delta_rule.gpu_precision import check_dims
from maxtext.kernels.gated_delta_rule.reference import _initial_state

_F32 = jnp.float32
_STATE_INPUT = 5  # position of the state among the kernels' inputs (q, k, v, g, beta, state), aliased to output 1


def _unit_columns(x: jax.Array, use_qk_l2norm: bool) -> jax.Array:
  """x [Dk, n] float32 with each column scaled to unit l2 norm (as chunking.l2_normalize), or x unchanged."""
  if not use_qk_l2norm:
    return x
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=0, keepdims=True) + L2_NORM_EPS)


def _step(state, q_col, k_col, v_row, g, beta):
  """One token on a [Dk, BV] float32 state; q_col, k_col [Dk, 1] (normalised, q scaled), v_row [1, BV].

  Returns (new state [Dk, BV], output row [1, BV]). g and beta are scalars or [1, 1].
  """
  state = state * jnp.exp(g)
  predicted = jnp.sum(k_col * state, axis=0, keepdims=True)  # S^T k: [1, BV]
  delta = (v_row - predicted) * beta
  state = state + k_col * delta  # rank-1 update k delta^T
  return state, jnp.sum(q_col * state, axis=0, keepdims=True)


def _struct(like: jax.Array, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  """A result that varies over the same shard_map axes as `like` (needed under check_vma=True)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


# ----------------------------------------------------------------------------------------------------- TPU


def _tpu_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, state_ref, o_ref, new_state_ref, *, use_qk_l2norm: bool):
  """One (batch, value head). q, k [T, Dk]; v, o [T, Dv]; g, beta [T, 1]; state [Dk, Dv] float32."""
  key_dim = q_ref.shape[1]
  # Tokens as columns [Dk, T]: the step reduces over Dk, the state's sublane axis.
  q_cols = _unit_columns(q_ref[...].astype(_F32).T, use_qk_l2norm) * key_dim**-0.5
  k_cols = _unit_columns(k_ref[...].astype(_F32).T, use_qk_l2norm)
  v, g, beta = v_ref[...].astype(_F32), g_ref[...].astype(_F32), beta_ref[...].astype(_F32)
  state = state_ref[...]
  for t in range(q_ref.shape[0]):  # T is small and static: unrolled, so every slice below is static
    token = slice(t, t + 1)
    state, o_row = _step(state, q_cols[:, token], k_cols[:, token], v[token], g[token], beta[token])
    o_ref[token, :] = o_row.astype(o_ref.dtype)
  new_state_ref[...] = state


@functools.partial(jax.jit, static_argnames=("use_qk_l2norm", "interpret"))
def recurrent_gated_delta_rule_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    use_qk_l2norm: bool = True,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Pallas TPU token recurrence. Returns (o [B, T, Hv, Dv] in v's dtype, final state [B, Hv, Dk, Dv] f32)."""
  check_shapes(q, k, v, g, beta, initial_state, None)
  batch, length, key_heads, key_dim = q.shape
  value_heads, value_dim = v.shape[2:]
  group = value_heads // key_heads
  state = _initial_state(initial_state, batch, value_heads, key_dim, value_dim)
  # [B, T, H, ...] -> [B, H, T, ...]: a bitcast when T = 1.
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  key_spec = pl.BlockSpec((None, None, length, key_dim), lambda b, h: (b, h // group, 0, 0))
  value_spec = pl.BlockSpec((None, None, length, value_dim), lambda b, h: (b, h, 0, 0))
  scalar_spec = pl.BlockSpec((None, None, length, 1), lambda b, h: (b, h, 0, 0))
  state_spec = pl.BlockSpec((None, None, key_dim, value_dim), lambda b, h: (b, h, 0, 0))
  out, final_state = pl.pallas_call(
      functools.partial(_tpu_kernel, use_qk_l2norm=use_qk_l2norm),
      grid=(batch, value_heads),
      in_specs=[key_spec, key_spec, value_spec, scalar_spec, scalar_spec, state_spec],
      out_specs=[value_spec, state_spec],
      out_shape=[_struct(q, (batch, value_heads, length, value_dim), v.dtype), _struct(q, state.shape, _F32)],
      input_output_aliases={_STATE_INPUT: 1},
      # Every (batch, head) owns its state: both axes may be split across cores.
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
      name="gdr_recurrent_tpu",
  )(heads_first(q), heads_first(k), heads_first(v), heads_first(g)[..., None], heads_first(beta)[..., None], state)
  return heads_first(out), final_state


# ----------------------------------------------------------------------------------------------------- GPU


_GPU_UNROLL_MAX = 8  # tokens a GPU program unrolls; longer inputs loop


def _gpu_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, state_ref, o_ref, new_state_ref, *, group: int,
                block_v: int, use_qk_l2norm: bool):
  """One (value block, value head, batch) on whole-array refs in the model's layout (see the wrapper)."""
  vb, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length, key_dim = q_ref.shape[1], q_ref.shape[3]
  scale = key_dim**-0.5
  kh = h // group
  cols = pl.ds(vb * block_v, block_v)

  def token(t, state):
    # Every value block normalises the full q, k rows again: Dk flops, cheaper than sharing them.
    q_col = _unit_columns(q_ref[b, t, kh, :].astype(_F32)[:, None], use_qk_l2norm) * scale
    k_col = _unit_columns(k_ref[b, t, kh, :].astype(_F32)[:, None], use_qk_l2norm)
    v_row = v_ref[b, t, h, cols].astype(_F32)[None, :]
    g, beta = g_ref[b, t, h].astype(_F32), beta_ref[b, t, h].astype(_F32)
    state, o_row = _step(state, q_col, k_col, v_row, g, beta)
    o_ref[b, t, h, cols] = o_row[0].astype(o_ref.dtype)
    return state

  state = state_ref[b, h, :, cols]  # [Dk, BV] float32
  if length <= _GPU_UNROLL_MAX:  # decode and speculative verification: unrolled, no loop overhead
    for t in range(length):
      state = token(t, state)
  else:
    # A continuous-batching prompt chunk (64 tokens): unrolled, Triton compiled the 2.5B model's serving step for
    # 2 minutes; a loop compiles once, with the same arithmetic per token.
    state = jax.lax.fori_loop(0, length, token, state)
  new_state_ref[b, h, :, cols] = state


@functools.partial(jax.jit, static_argnames=("use_qk_l2norm", "interpret", "block_v"))
def recurrent_gated_delta_rule_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    use_qk_l2norm: bool = True,
    interpret: bool = False,
    block_v: int = 32,
) -> tuple[jax.Array, jax.Array]:
  """Pallas Triton token recurrence. Returns (o [B, T, Hv, Dv] in v's dtype, final state [B, Hv, Dk, Dv] f32).

  block_v: value columns per program (capped at Dv). Decode batches can be small, so splitting Dv gives the GPU
  B * Hv * Dv / block_v programs instead of B * Hv; 32 keeps a [128, 32] float32 state slice in registers.
  """
  check_shapes(q, k, v, g, beta, initial_state, None)
  batch, _, key_heads, key_dim = q.shape
  value_heads, value_dim = v.shape[2:]
  block_v = min(block_v, value_dim)
  check_dims(key_dim=key_dim, value_dim=value_dim, block_v=block_v)
  state = _initial_state(initial_state, batch, value_heads, key_dim, value_dim)
  kernel = functools.partial(_gpu_kernel, group=value_heads // key_heads, block_v=block_v,
                             use_qk_l2norm=use_qk_l2norm)
  return pl.pallas_call(
      kernel,
      # Value blocks vary fastest: the programs of one head read the same q, k row together.
      grid=(value_dim // block_v, value_heads, batch),
      out_shape=(_struct(q, v.shape, v.dtype), _struct(q, state.shape, _F32)),
      input_output_aliases={_STATE_INPUT: 1},
      # Triton parameters also select the Triton lowering (jax's GPU default is Mosaic GPU). A [128, 32] float32
      # state slice is 32 registers per thread at 4 warps; the tokens are unrolled, nothing to pipeline.
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="gdr_recurrent_gpu",
  )(q, k, v, g, beta, state)
