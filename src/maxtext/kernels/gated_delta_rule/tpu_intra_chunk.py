"""Pallas TPU (Mosaic) kernels for the intra-chunk algebra of the chunked gated delta rule, forward and backward.

`prepare_chunks_tpu` has the contract of chunking.prepare_chunks (its jnp twin, which JAX differentiates for the
tests): model-layout q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g, beta [B, T, Hv] (+ segment ids [B, T]) in,
ChunkInputs [B, Hv, N, C, ...] float32 out, with a custom vjp whose backward is a kernel too.

One grid step per (batch, key head, chunk): it reads the chunk of its key head once, l2-normalises q and k and
forms k k^T and q k^T once, then serves the key head's G = Hv / Hk value heads (no repeated keys): per value head
the cumulative gate sum, the pair decays, the unit lower triangular system (I + A) and its inverse, and the WY
products w, u. Cumulative sums, row/column conversions and triangular masks are iota masks and reductions; the
inverse is blocked doubling on whole [C, C] tiles (X <- X - X (A restricted to the next level's off-diagonal
blocks) X, log2(C) rounds of two matmuls: no triangular solve, as stable as blocked substitution). The backward
step recomputes the forward pieces from the inputs instead of storing them.

Layouts (the (8, 128) rule: a block's last two dims divide by (8, 128) or equal the array's): q, k, v are read in
the model layout through a free reshape to [B, T, H * D] when the head widths are multiples of 128 lanes (or
there is one key head), else from a head-major transpose [B, Hk, T, D]; g and beta (small) travel as
[B, Hk, N, G, C] and the segment masks as [B, N, 3, C]. A ragged tail is zero-padded to a whole chunk.
Inside a sharded jit these calls must sit in `jax.shard_map` (dispatch.py does so).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from maxtext.kernels.gated_delta_rule.chunking import L2_NORM_EPS, ChunkInputs, token_segment_masks

_F32 = jnp.float32
_PRECISION = jax.lax.Precision.HIGHEST  # true float32 products, as the jnp twin's einsums


def supports(chunk_size: int, key_dim: int, value_dim: int) -> bool:
  """Chunk sizes the kernels tile: powers of two, whole sublane groups (>= 8); any head dims."""
  del key_dim, value_dim
  return chunk_size >= 8 and chunk_size & (chunk_size - 1) == 0


@dataclasses.dataclass(frozen=True)
class _Static:
  chunk: int
  groups: int  # value heads per key head
  scale: float
  use_qk_l2norm: bool
  lane_blocks: bool  # q, k, v read as [B, T, H * D] column blocks (else head-major [B, Hk, T, D])
  interpret: bool


# ------------------------------------------------------------------------------------------ kernel pieces


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """2-D float32 matmul contracting dim contract[0] of a with dim contract[1] of b ((1, 0): a @ b; (0, 0):
  a^T @ b; (1, 1): a @ b^T)."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=_PRECISION, preferred_element_type=_F32)


class _Tile:
  """Iota masks of a [C, C] tile and the row <-> column conversions built from them."""

  def __init__(self, chunk: int):
    self.rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    self.cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    self.eye = self.rows == self.cols
    self.lower = self.cols <= self.rows  # inclusive
    self.chunk = chunk

  def to_col(self, row: jax.Array) -> jax.Array:
    """[1, C] -> [C, 1] (a lane reduction of the diagonal: no transpose)."""
    return jnp.sum(jnp.where(self.eye, row, 0.0), axis=1, keepdims=True)

  def to_row(self, col: jax.Array) -> jax.Array:
    """[C, 1] -> [1, C]."""
    return jnp.sum(jnp.where(self.eye, col, 0.0), axis=0, keepdims=True)

  def unit_lower_inverse(self, a: jax.Array) -> jax.Array:
    """(I + a)^-1 for strictly lower a [C, C], C a power of two: merge diagonal blocks of size h into 2h.

    With X the inverse of the block-diagonal part at size h, inv([[P, 0], [B, Q]]) = [[P^-1, 0],
    [-Q^-1 B P^-1, Q^-1]] for every 2h block at once is X - X (a on the lower-left h blocks) X.
    """
    x = self.eye.astype(_F32)
    half, shift = 1, 0
    while half < self.chunk:
      same_pair = (self.rows >> (shift + 1)) == (self.cols >> (shift + 1))
      off_diagonal = same_pair & ((self.rows >> shift) != (self.cols >> shift))
      x = x - _dot(x, _dot(jnp.where(off_diagonal, a, 0.0), x, (1, 0)), (1, 0))
      half, shift = half * 2, shift + 1
    return x


def _normalized(x: jax.Array, use_qk_l2norm: bool) -> tuple[jax.Array, jax.Array]:
  """(x / |x| per row, 1 / |x|) as chunking.l2_normalize, or (x, ones)."""
  if not use_qk_l2norm:
    return x, jnp.ones((x.shape[0], 1), _F32)
  inv_norm = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + L2_NORM_EPS)
  return x * inv_norm, inv_norm


@dataclasses.dataclass
class _Gates:
  """One value head's per-chunk gate terms; columns [C, 1], matrices [C, C], scalars [1, 1]."""

  beta: jax.Array  # column
  decay: jax.Array  # pair decays exp(gc_i - gc_s) on causal same-segment pairs, else 0
  from_start: jax.Array  # column exp(gc_i), 0 where the carried state is unseen
  to_end: jax.Array  # column exp(gc_last - gc_i), 0 outside the chunk's last segment
  chunk_decay: jax.Array  # scalar exp(gc_last), 0 when the chunk's last token does not continue the carried state


def _gates(tile: _Tile, g_row: jax.Array, beta_row: jax.Array, seg) -> _Gates:
  """g_row, beta_row [1, C]; seg: None or (segment id, carried, in last segment) rows [1, C] (floats)."""
  g_cum = jnp.sum(jnp.where(tile.lower, g_row, 0.0), axis=1, keepdims=True)  # [C, 1] inclusive cumsum
  g_last = jnp.sum(g_row, axis=1, keepdims=True)  # [1, 1]
  pairs = tile.lower
  if seg is not None:
    pairs = pairs & (tile.to_col(seg[0]) == seg[0])
  decay = jnp.exp(jnp.where(pairs, g_cum - tile.to_row(g_cum), -jnp.inf))
  from_start, to_end, chunk_decay = jnp.exp(g_cum), jnp.exp(g_last - g_cum), jnp.exp(g_last)
  if seg is not None:
    from_start = from_start * tile.to_col(seg[1])
    to_end = to_end * tile.to_col(seg[2])
    last_lane = jax.lax.broadcasted_iota(jnp.int32, g_row.shape, 1) == tile.chunk - 1
    chunk_decay = chunk_decay * jnp.sum(jnp.where(last_lane, seg[1], 0.0), axis=1, keepdims=True)
  return _Gates(tile.to_col(beta_row), decay, from_start, to_end, chunk_decay)


def _load_shared(static: _Static, q_ref, k_ref, g_ref, beta_ref, seg_ref):
  """The key head's normalised q (unscaled), k, their inverse norms, and the gate / segment rows."""
  q, q_inv_norm = _normalized(q_ref[...].astype(_F32), static.use_qk_l2norm)
  k, k_inv_norm = _normalized(k_ref[...].astype(_F32), static.use_qk_l2norm)
  seg = None if seg_ref is None else tuple(seg_ref[i : i + 1, :] for i in range(3))
  g, beta = g_ref[...].astype(_F32), beta_ref[...].astype(_F32)  # [G, C]
  return q, q_inv_norm, k, k_inv_norm, g, beta, seg


def _value_columns(v_ref, head: int, value_dim: int) -> jax.Array:
  return v_ref[:, head * value_dim : (head + 1) * value_dim].astype(_F32)


# ------------------------------------------------------------------------------------------------ kernels


def _forward_kernel(static: _Static, has_segments: bool, *refs):
  """One (batch, key head, chunk): ChunkInputs of its G value heads."""
  q_ref, k_ref, v_ref, g_ref, beta_ref, *refs = refs
  seg_ref = refs.pop(0) if has_segments else None
  q_out_ref, k_out_ref, w_ref, u_ref, intra_ref, decay_ref = refs
  tile = _Tile(static.chunk)
  q, _, k, _, g, beta, seg = _load_shared(static, q_ref, k_ref, g_ref, beta_ref, seg_ref)
  q = q * static.scale
  kk, qk = _dot(k, k, (1, 1)), _dot(q, k, (1, 1))  # [C, C], shared by the group
  value_dim = v_ref.shape[-1] // static.groups
  strictly_lower = tile.cols < tile.rows
  for head in range(static.groups):
    gates = _gates(tile, g[head : head + 1], beta[head : head + 1], seg)
    a = jnp.where(strictly_lower, gates.beta * kk * gates.decay, 0.0)
    inverse = tile.unit_lower_inverse(a)
    v = _value_columns(v_ref, head, value_dim)
    u_ref[head] = _dot(inverse, gates.beta * v, (1, 0))
    w_ref[head] = _dot(inverse, (gates.beta * gates.from_start) * k, (1, 0))
    q_out_ref[head] = q * gates.from_start
    k_out_ref[head] = k * gates.to_end
    intra_ref[head] = qk * gates.decay
    decay_ref[head] = gates.chunk_decay


def _backward_kernel(static: _Static, has_segments: bool, *refs):
  """One (batch, key head, chunk): gradients of q, k, v, g, beta from the ChunkInputs' cotangents."""
  q_ref, k_ref, v_ref, g_ref, beta_ref, *refs = refs
  seg_ref = refs.pop(0) if has_segments else None
  dq_out_ref, dk_out_ref, dw_ref, du_ref, dintra_ref, ddecay_ref, dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref = refs
  tile = _Tile(static.chunk)
  q_unit, q_inv_norm, k, k_inv_norm, g, beta, seg = _load_shared(static, q_ref, k_ref, g_ref, beta_ref, seg_ref)
  q = q_unit * static.scale
  kk, qk = _dot(k, k, (1, 1)), _dot(q, k, (1, 1))
  value_dim = v_ref.shape[-1] // static.groups
  strictly_lower = tile.cols < tile.rows
  dq, dk = jnp.zeros_like(q), jnp.zeros_like(k)  # w.r.t. the normalised (q: and scaled) rows
  dkk, dqk = jnp.zeros_like(kk), jnp.zeros_like(qk)
  for head in range(static.groups):
    gates = _gates(tile, g[head : head + 1], beta[head : head + 1], seg)
    a = jnp.where(strictly_lower, gates.beta * kk * gates.decay, 0.0)
    inverse = tile.unit_lower_inverse(a)
    v = _value_columns(v_ref, head, value_dim)
    du, dw = du_ref[head].astype(_F32), dw_ref[head].astype(_F32)
    dq_out, dk_out, dintra = dq_out_ref[head].astype(_F32), dk_out_ref[head].astype(_F32), dintra_ref[head]
    beta_from_start = gates.beta * gates.from_start
    # u = T (beta v), w = T (beta from_start k) with T = (I + A)^-1: dT = du (beta v)^T + dw (...)^T and
    # dA = -T^T dT T^T on A's strictly lower support.
    d_rhs_v, d_rhs_k = _dot(inverse, du, (0, 0)), _dot(inverse, dw, (0, 0))
    d_inverse = _dot(du, gates.beta * v, (1, 1)) + _dot(dw, beta_from_start * k, (1, 1))
    da = -_dot(_dot(inverse, d_inverse, (0, 0)), inverse, (1, 1))
    da = jnp.where(strictly_lower, da, 0.0)
    dkk = dkk + da * gates.beta * gates.decay
    dqk = dqk + dintra * gates.decay
    d_pair_decay = da * gates.beta * kk + dintra * qk
    k_dot_d_rhs = jnp.sum(d_rhs_k * k, axis=1, keepdims=True)
    dbeta = (jnp.sum(da * kk * gates.decay, axis=1, keepdims=True) + jnp.sum(d_rhs_v * v, axis=1, keepdims=True)
             + gates.from_start * k_dot_d_rhs)
    d_from_start = gates.beta * k_dot_d_rhs + jnp.sum(dq_out * q, axis=1, keepdims=True)
    d_to_end = jnp.sum(dk_out * k, axis=1, keepdims=True)
    dq = dq + gates.from_start * dq_out
    dk = dk + beta_from_start * d_rhs_k + gates.to_end * dk_out
    dv_ref[:, head * value_dim : (head + 1) * value_dim] = (gates.beta * d_rhs_v).astype(dv_ref.dtype)
    # Gate sums: decay_is = exp(gc_i - gc_s), from_start = exp(gc_i), to_end = exp(gc_last - gc_i),
    # chunk_decay = exp(gc_last); gc_i = sum_{t <= i} g_t, so dg_t = sum_{i >= t} dgc_i (+ dgc_last for all t).
    e = d_pair_decay * gates.decay
    d_cum = (jnp.sum(e, axis=1, keepdims=True) - tile.to_col(jnp.sum(e, axis=0, keepdims=True))
             + d_from_start * gates.from_start - d_to_end * gates.to_end)
    d_last = (jnp.sum(d_to_end * gates.to_end, axis=0, keepdims=True)
              + ddecay_ref[head].astype(_F32) * gates.chunk_decay)
    dg_ref[head : head + 1, :] = jnp.sum(jnp.where(tile.lower, d_cum, 0.0), axis=0, keepdims=True) + d_last
    dbeta_ref[head : head + 1, :] = tile.to_row(dbeta)
  # k k^T and q k^T, shared by the group.
  dk = dk + _dot(dkk, k, (1, 0)) + _dot(dkk, k, (0, 0)) + _dot(dqk, q, (0, 0))
  dq = (dq + _dot(dqk, k, (1, 0))) * static.scale
  dq_ref[...] = _through_norm(dq, q_unit, q_inv_norm, static.use_qk_l2norm).astype(dq_ref.dtype)
  dk_ref[...] = _through_norm(dk, k, k_inv_norm, static.use_qk_l2norm).astype(dk_ref.dtype)


def _through_norm(dy: jax.Array, y: jax.Array, inv_norm: jax.Array, use_qk_l2norm: bool) -> jax.Array:
  """x's gradient from y = x / |x|'s: (dy - y (y . dy)) / |x|."""
  if not use_qk_l2norm:
    return dy
  return (dy - y * jnp.sum(y * dy, axis=1, keepdims=True)) * inv_norm


# ------------------------------------------------------------------------------------------------ layouts


def _pad_tokens(x: jax.Array, chunk: int) -> jax.Array:
  """Zero-pad [B, T, ...] to whole chunks: padded tokens have k = 0 and beta = 0, so they change nothing."""
  pad = (-x.shape[1]) % chunk
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _token_blocks(x: jax.Array, static: _Static) -> tuple[jax.Array, pl.BlockSpec]:
  """[B, Tp, Hk, W] -> (the array the kernel reads, a [C, W] block per (batch, key head, chunk))."""
  batch, length, heads, width = x.shape
  if static.lane_blocks:
    return x.reshape(batch, length, heads * width), pl.BlockSpec((None, static.chunk, width), lambda b, h, n: (b, n, h))
  return jnp.swapaxes(x, 1, 2), pl.BlockSpec((None, None, static.chunk, width), lambda b, h, n: (b, h, n, 0))


def _token_shape(shape: tuple[int, ...], static: _Static) -> tuple[int, ...]:
  batch, length, heads, width = shape
  return (batch, length, heads * width) if static.lane_blocks else (batch, heads, length, width)


def _from_token_blocks(x: jax.Array, shape: tuple[int, ...], static: _Static) -> jax.Array:
  """Inverse of _token_blocks: back to [B, Tp, Hk, W]."""
  return x.reshape(shape) if static.lane_blocks else jnp.swapaxes(x, 1, 2)


def _gate_rows(x: jax.Array, key_heads: int, chunk: int) -> jax.Array:
  """[B, Tp, Hv] -> [B, Hk, N, G, C] float32: a chunk's gates of a key head's value heads as rows."""
  batch, length, value_heads = x.shape
  x = x.astype(_F32).reshape(batch, length // chunk, chunk, key_heads, value_heads // key_heads)
  return x.transpose(0, 3, 1, 4, 2)


def _from_gate_rows(x: jax.Array) -> jax.Array:
  batch, key_heads, num_chunks, groups, chunk = x.shape
  return x.transpose(0, 2, 4, 1, 3).reshape(batch, num_chunks * chunk, key_heads * groups)


def _segment_rows(segment_ids: jax.Array, chunk: int) -> jax.Array:
  """[B, T] ids -> [B, N, 3, C] float32 rows: segment id, carried, in the chunk's last segment."""
  seg, carried, in_last = token_segment_masks(segment_ids, chunk)
  seg = seg - seg[:, :1, :1]  # small exact floats whatever the ids' range
  return jnp.stack([seg.astype(_F32), carried.astype(_F32), in_last.astype(_F32)], axis=2)


def _like(like: jax.Array, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  """A result varying over the same shard_map axes as `like` (needed under check_vma=True)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _chunk_spec(groups: int, rows: int, cols: int) -> pl.BlockSpec:
  """A key head's G value heads' [rows, cols] tiles of a [B, Hv, N, rows, cols] array."""
  return pl.BlockSpec((None, groups, None, rows, cols), lambda b, h, n: (b, h, n, 0, 0))


def _cost(static: _Static, batch: int, key_heads: int, num_chunks: int, key_dim: int, value_dim: int,
          backward: bool, bytes_accessed: int) -> pl.CostEstimate:
  """Matmul flops and exps of a call, for XLA's cost analysis (it cannot see inside a custom call)."""
  c, steps = static.chunk, batch * key_heads * num_chunks
  inverse = 4 * c**3 * (c.bit_length() - 1)  # two [C, C] products per doubling round
  shared = 4 * c * c * key_dim  # k k^T, q k^T
  if backward:  # the inverse again, T^T du, T^T dw, dT, dA; and four [C, C] x [C, Dk] products for dq, dk
    per_head = inverse + 4 * c * c * (key_dim + value_dim) + 4 * c**3
    shared += 8 * c * c * key_dim
  else:  # the inverse, u and w
    per_head = inverse + 2 * c * c * (key_dim + value_dim)
  flops = steps * (shared + static.groups * per_head)
  return pl.CostEstimate(flops=flops, transcendentals=steps * static.groups * (c * c + 3 * c),
                         bytes_accessed=bytes_accessed)


def _nbytes(*arrays) -> int:
  return sum(x.size * x.dtype.itemsize for x in arrays)


# ------------------------------------------------------------------------------------------ forward / vjp


def _forward(static: _Static, q, k, v, g, beta, segments) -> ChunkInputs:
  batch, _, key_heads, key_dim = q.shape
  value_heads, value_dim = v.shape[2:]
  c, groups = static.chunk, static.groups
  q, k, v, g, beta = (_pad_tokens(x, c) for x in (q, k, v, g, beta))
  num_chunks = q.shape[1] // c
  v = v.reshape(*v.shape[:2], key_heads, groups * value_dim)
  (q_in, key_spec), (k_in, _), (v_in, value_spec) = (_token_blocks(x, static) for x in (q, k, v))
  gate_spec = pl.BlockSpec((None, None, None, groups, c), lambda b, h, n: (b, h, n, 0, 0))
  inputs = [q_in, k_in, v_in, _gate_rows(g, key_heads, c), _gate_rows(beta, key_heads, c)]
  in_specs = [key_spec, key_spec, value_spec, gate_spec, gate_spec]
  if segments is not None:
    inputs.append(segments)
    in_specs.append(pl.BlockSpec((None, None, 3, c), lambda b, h, n: (b, n, 0, 0)))
  shape = lambda d: (batch, value_heads, num_chunks, c, d)
  out_shapes = [shape(key_dim)] * 3 + [shape(value_dim), shape(c), (batch, value_heads, num_chunks, 1, 1)]
  out_specs = [_chunk_spec(groups, c, key_dim)] * 3 + [
      _chunk_spec(groups, c, value_dim), _chunk_spec(groups, c, c), _chunk_spec(groups, 1, 1)]
  out_shape = [_like(q_in, s, _F32) for s in out_shapes]
  q_out, k_out, w, u, intra, decay = pl.pallas_call(
      functools.partial(_forward_kernel, static, segments is not None),
      out_shape=out_shape, grid=(batch, key_heads, num_chunks), in_specs=in_specs, out_specs=out_specs,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
      cost_estimate=_cost(static, batch, key_heads, num_chunks, key_dim, value_dim, False,
                          _nbytes(*inputs) + sum(4 * math.prod(s) for s in out_shapes)),
      interpret=static.interpret, name="gdr_intra_chunk_fwd",
  )(*inputs)
  return ChunkInputs(q_out, k_out, w, u, intra, decay.reshape(batch, value_heads, num_chunks))


def _backward(static: _Static, residuals, cotangents: ChunkInputs):
  q, k, v, g, beta, segments = residuals
  batch, length, key_heads, key_dim = q.shape
  value_heads, value_dim = v.shape[2:]
  c, groups = static.chunk, static.groups
  q, k, v, g, beta = (_pad_tokens(x, c) for x in (q, k, v, g, beta))
  padded, num_chunks = q.shape[1], q.shape[1] // c
  v = v.reshape(batch, padded, key_heads, groups * value_dim)
  (q_in, key_spec), (k_in, _), (v_in, value_spec) = (_token_blocks(x, static) for x in (q, k, v))
  gate_spec = pl.BlockSpec((None, None, None, groups, c), lambda b, h, n: (b, h, n, 0, 0))
  inputs = [q_in, k_in, v_in, _gate_rows(g, key_heads, c), _gate_rows(beta, key_heads, c)]
  in_specs = [key_spec, key_spec, value_spec, gate_spec, gate_spec]
  if segments is not None:
    inputs.append(segments)
    in_specs.append(pl.BlockSpec((None, None, 3, c), lambda b, h, n: (b, n, 0, 0)))
  d = cotangents
  inputs += [d.q, d.k, d.w, d.u, d.intra, d.decay.reshape(batch, value_heads, num_chunks, 1, 1)]
  in_specs += [_chunk_spec(groups, c, key_dim)] * 3 + [
      _chunk_spec(groups, c, value_dim), _chunk_spec(groups, c, c), _chunk_spec(groups, 1, 1)]
  out_shapes = [(batch, padded, key_heads, key_dim)] * 2 + [(batch, padded, key_heads, groups * value_dim)]
  out_shape = [_like(q_in, _token_shape(s, static), _F32) for s in out_shapes]
  out_shape += [_like(q_in, (batch, key_heads, num_chunks, groups, c), _F32)] * 2
  out_specs = [key_spec, key_spec, value_spec, gate_spec, gate_spec]
  dq, dk, dv, dg, dbeta = pl.pallas_call(
      functools.partial(_backward_kernel, static, segments is not None),
      out_shape=out_shape, grid=(batch, key_heads, num_chunks), in_specs=in_specs, out_specs=out_specs,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
      cost_estimate=_cost(static, batch, key_heads, num_chunks, key_dim, value_dim, True,
                          _nbytes(*inputs) + sum(4 * math.prod(s.shape) for s in out_shape)),
      interpret=static.interpret, name="gdr_intra_chunk_bwd",
  )(*inputs)
  dq, dk, dv = (_from_token_blocks(x, s, static)[:, :length] for x, s in zip((dq, dk, dv), out_shapes))
  dv = dv.reshape(batch, length, value_heads, value_dim)
  return dq, dk, dv, _from_gate_rows(dg)[:, :length], _from_gate_rows(dbeta)[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _prepare(static: _Static, q, k, v, g, beta, segments) -> ChunkInputs:
  return _forward(static, q, k, v, g, beta, segments)


def _prepare_forward(static: _Static, q, k, v, g, beta, segments):
  return _forward(static, q, k, v, g, beta, segments), (q, k, v, g, beta, segments)


def _prepare_backward(static: _Static, residuals, cotangents: ChunkInputs):
  grads = _backward(static, residuals, cotangents)
  return (*(grad.astype(x.dtype) for grad, x in zip(grads, residuals)), None)


_prepare.defvjp(_prepare_forward, _prepare_backward)


def prepare_chunks_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    interpret: bool = False,
) -> ChunkInputs:
  """Pallas TPU twin of chunking.prepare_chunks (same arguments and result), differentiable."""
  if not supports(chunk_size, q.shape[-1], v.shape[-1]):
    raise ValueError(f"gated delta rule TPU chunk kernels: chunk_size={chunk_size} must be a power of two >= 8")
  key_heads, key_dim = q.shape[2:]
  groups, value_dim = v.shape[2] // key_heads, v.shape[-1]
  static = _Static(
      chunk=chunk_size, groups=groups, scale=float(key_dim**-0.5 if scale is None else scale),
      use_qk_l2norm=use_qk_l2norm, interpret=interpret,
      lane_blocks=key_heads == 1 or (key_dim % 128 == 0 and groups * value_dim % 128 == 0),
  )
  segments = None if segment_ids is None else _segment_rows(segment_ids, chunk_size)
  return _prepare(static, q, k, v, g, beta, segments)
