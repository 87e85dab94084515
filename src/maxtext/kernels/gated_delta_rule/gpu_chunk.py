"""Pallas GPU (Triton) kernels for the parallel part of the chunked gated delta rule: chunking.prepare_chunks fused.

One program per (key head, chunk, batch row) reads q and k once from the model layout [B, T, Hk, Dk] (no repeat
per value head), normalises them and forms k k^T and q k^T once, then for each of the G = Hv / Hk value heads of
the group forms the cumulative decays, the WY system and its inverse, and writes that head's ChunkInputs (q, k, w,
u, intra, decay) straight in the [B*Hv, N, C, D] layout gpu.py's inter-chunk kernels read. The backward is the
hand-written transpose of the same algebra: it recomputes the inverse and w, u, sums the G heads' gradients of the
shared normalised q, k in registers and writes dq, dk [B, T, Hk, Dk] once, dv [B, T, Hv, Dv], dg and dbeta
[B, T, Hv]. Per chunk of C tokens and value head (all float32 inside; chunking.py has the same math in jnp):
  gc = cumsum(g);  D_ij = exp(gc_i - gc_j) on causal same-segment pairs (masked before exp), else 0
  A = strictly_lower(beta_i (k k^T)_ij D_ij);  T = (I + A)^-1
  u = T (beta v);  w = T (beta fs k);  q_out = q fs;  k_out = k te;  intra = (q k^T) D;  decay = exp(gc_last) c_last
with fs = exp(gc) (zero where the carried state is unseen) and te = exp(gc_last - gc) (zero outside the last
segment). The cumulative sums are masked [C, C] reductions and T comes from log2(C) - 1 rounds of pairwise block
merges (chunking._inverse_by_doubling, as full masked [C, C] products): exact, unlike a Neumann product, whose
intermediate powers of A reach C(62, 31) ~ 5e17 for identical keys.

Precision (gpu.py's modes): the main dots follow `precision`; the inverse's products follow `inverse_precision`
(default: 'ieee' when precision is 'ieee', else 'tf32'). Measured end to end in interpret mode with TF32 emulated
by operand rounding (B=1, T=256, Dk=Dv=128, C=64; worst max-relative error over outputs and gradients against the
float32 reference; keys sharing a strong common direction with slow decay and beta ~0.9 make A's entries large):
  main dots  inverse   random keys  correlated keys
  ieee       ieee      2.1e-6       3.7e-6
  ieee       tf32      9.3e-6       1.2e-3
  tf32       tf32      9.8e-4       2.0e-3
  tf32       tf32x3    9.8e-4       2.8e-3
  tf32       ieee      9.8e-4       2.9e-3
  bf16       tf32      5.5e-3       1.9e-2
  bf16       ieee      5.5e-3       1.6e-2
so once the main dots round, a more exact inverse buys nothing. Compiled on an H100 (2026-11-24) the 'ieee' and
'bf16' cases of tests/kernels/test_gated_delta_rule_gpu_chunk.py passed and the unpacked 'tf32' case failed its 3e-3
tolerance (its error was not captured; not yet understood). With that, and the kernels measuring slower than XLA's
prepare_chunks (docs/benchmarks.md), the GPU path does not use them unless ChunkOptions.fused_prepare is set. In 'bf16' mode with 16-bit inputs the big outputs
(q, k, w, u, intra forward; dq, dk, dv backward) are stored in the inputs' dtype; otherwise float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.chunking import L2_NORM_EPS, ChunkInputs
from maxtext.kernels.gated_delta_rule.gpu import PRECISIONS, _TritonParams, _dot, _matmul, check_dims


@dataclasses.dataclass(frozen=True)
class PrepareLaunch:
  """Launch parameters. 8 warps: each [64, 128] float32 tile then takes 32 registers per thread."""

  num_warps: int = 8
  grad_num_warps: int = 8
  num_stages: int = 1


def supports(chunk_size: int, key_dim: int, value_dim: int) -> bool:
  """Whether Triton can tile these sizes (powers of two >= 16); other shapes keep the jnp prepare_chunks."""
  try:
    check_dims(chunk_size=chunk_size, key_dim=key_dim, value_dim=value_dim)
  except ValueError:
    return False
  return True


# ------------------------------------------------------------------------------------------- in-kernel math


def _iotas(size: int):
  return (jax.lax.broadcasted_iota(jnp.int32, (size, size), 0), jax.lax.broadcasted_iota(jnp.int32, (size, size), 1))


def _l2_normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x / |x|, 1 / |x|) row-wise, with chunking.l2_normalize's epsilon."""
  inv_norm = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + L2_NORM_EPS)
  return x * inv_norm, inv_norm


def _unit_lower_inverse(a: jax.Array, rows: jax.Array, cols: jax.Array, mm) -> jax.Array:
  """(I + a)^-1 for strictly lower [C, C] a, C a power of two: merge diagonal blocks pairwise, at full size.

  With T_s the block diagonal of the inverses of the s x s diagonal blocks and L_s the lower-left s x s blocks
  of each 2s x 2s diagonal block of a: T_2s = T_s - T_s L_s T_s (inv([[A, 0], [B, D]]) has -inv(D) B inv(A)
  below). T_1 = I, so T_2 = I - L_1.
  """
  size = a.shape[0]
  apart = rows ^ cols  # < 2s: same 2s block; >= s: different s blocks
  lower = rows > cols
  t = jnp.where(rows == cols, 1.0, 0.0) - jnp.where(lower & (apart == 1), a, 0.0)
  s = 2
  while s < size:
    block = jnp.where(lower & (apart >= s) & (apart < 2 * s), a, 0.0)
    t = t - mm(t, mm(block, t))
    s *= 2
  return t


def _chunk_terms(g, beta, carried, in_last, same_segment, kk, rows, cols, inv_mm):
  """Per value head: (pair decays D, T, fs, te, decay scalar) from its gates; see the module docstring."""
  size = g.shape[0]
  causal = cols <= rows
  g_cum = jnp.sum(jnp.where(causal, g[None, :], 0.0), axis=1)  # inclusive cumsum as a masked reduction
  is_last = jax.lax.broadcasted_iota(jnp.int32, (size,), 0) == size - 1
  g_last = jnp.sum(jnp.where(is_last, g_cum, 0.0))
  mask = causal if same_segment is None else causal & same_segment
  pair_decay = jnp.exp(jnp.where(mask, g_cum[:, None] - g_cum[None, :], -jnp.inf))
  a = jnp.where(cols < rows, beta[:, None] * kk * pair_decay, 0.0)
  inverse = _unit_lower_inverse(a, rows, cols, inv_mm)
  from_start, to_end = jnp.exp(g_cum), jnp.exp(g_last - g_cum)
  decay = jnp.exp(g_last)
  if carried is not None:
    from_start, to_end = from_start * carried, to_end * in_last
    decay = decay * jnp.sum(jnp.where(is_last, carried, 0.0))
  return pair_decay, inverse, from_start, to_end, decay, causal, is_last, a


def _load_qk(q_ref, k_ref, b, tokens, hk, scale, l2norm):
  """Normalised k and normalised, scaled q of one key head's chunk, with the norms' inverses for the backward."""
  q = q_ref[b, tokens, hk, :].astype(jnp.float32)
  k = k_ref[b, tokens, hk, :].astype(jnp.float32)
  q_inv = k_inv = None
  if l2norm:
    (q, q_inv), (k, k_inv) = _l2_normalize(q), _l2_normalize(k)
  return q * scale, k, q_inv, k_inv


def _load_segments(seg_refs, b, tokens):
  if seg_refs is None:
    return None, None, None
  seg_ref, carried_ref, in_last_ref = seg_refs
  seg = seg_ref[b, tokens]
  return carried_ref[b, tokens], in_last_ref[b, tokens], seg[:, None] == seg[None, :]


# ------------------------------------------------------------------------------------------------ forward


def _forward_kernel(*refs, chunk: int, groups: int, value_heads: int, scale: float, l2norm: bool,
                    segmented: bool, mm, inv_mm):
  """One (key head, chunk, batch row): the ChunkInputs of the group's value heads."""
  q_ref, k_ref, v_ref, g_ref, beta_ref, *rest = refs
  seg_refs, rest = (tuple(rest[:3]), rest[3:]) if segmented else (None, rest)
  q_out, k_out, w_out, u_out, intra_out, decay_out = rest
  hk, n, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tokens = pl.ds(n * chunk, chunk)
  q, k, _, _ = _load_qk(q_ref, k_ref, b, tokens, hk, scale, l2norm)
  carried, in_last, same_segment = _load_segments(seg_refs, b, tokens)
  rows, cols = _iotas(chunk)
  kk = mm(k, k, trans_b=True)  # [C, C], shared by the group
  qk = mm(q, k, trans_b=True)
  for member in range(groups):  # static: G value heads per key head
    h = hk * groups + member
    bh = b * value_heads + h
    g = g_ref[b, tokens, h].astype(jnp.float32)
    beta = beta_ref[b, tokens, h].astype(jnp.float32)
    pair_decay, inverse, from_start, to_end, decay, *_ = _chunk_terms(
        g, beta, carried, in_last, same_segment, kk, rows, cols, inv_mm)
    v = v_ref[b, tokens, h, :].astype(jnp.float32)
    u_out[bh, n] = mm(inverse, beta[:, None] * v).astype(u_out.dtype)
    w_out[bh, n] = mm(inverse, (beta * from_start)[:, None] * k).astype(w_out.dtype)
    q_out[bh, n] = (q * from_start[:, None]).astype(q_out.dtype)
    k_out[bh, n] = (k * to_end[:, None]).astype(k_out.dtype)
    intra_out[bh, n] = (qk * pair_decay).astype(intra_out.dtype)
    decay_out[bh, n] = decay


# ----------------------------------------------------------------------------------------------- backward


def _backward_kernel(*refs, chunk: int, groups: int, value_heads: int, scale: float, l2norm: bool,
                     segmented: bool, mm, inv_mm):
  """One (key head, chunk, batch row): the transpose of _forward_kernel, the group's dq, dk summed in registers."""
  q_ref, k_ref, v_ref, g_ref, beta_ref, *rest = refs
  seg_refs, rest = (tuple(rest[:3]), rest[3:]) if segmented else (None, rest)
  dq_in, dk_in, dw_in, du_in, dintra_in, ddecay_in, dq_out, dk_out, dv_out, dg_out, dbeta_out = rest
  hk, n, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tokens = pl.ds(n * chunk, chunk)
  q, k, q_inv, k_inv = _load_qk(q_ref, k_ref, b, tokens, hk, scale, l2norm)
  carried, in_last, same_segment = _load_segments(seg_refs, b, tokens)
  rows, cols = _iotas(chunk)
  kk = mm(k, k, trans_b=True)
  qk = mm(q, k, trans_b=True)
  dq = jnp.zeros(q.shape, jnp.float32)  # w.r.t. the scaled, normalised q, summed over the group
  dk = jnp.zeros(k.shape, jnp.float32)  # w.r.t. the normalised k
  for member in range(groups):
    h = hk * groups + member
    bh = b * value_heads + h
    g = g_ref[b, tokens, h].astype(jnp.float32)
    beta = beta_ref[b, tokens, h].astype(jnp.float32)
    pair_decay, inverse, from_start, to_end, decay, causal, is_last, _ = _chunk_terms(
        g, beta, carried, in_last, same_segment, kk, rows, cols, inv_mm)
    v = v_ref[b, tokens, h, :].astype(jnp.float32)
    k_scale = beta * from_start
    u = mm(inverse, beta[:, None] * v)
    w = mm(inverse, k_scale[:, None] * k)
    # u = T (beta v), w = T (beta fs k):  d(rhs) = T^T d(out);  dA = -T^T dT T^T = -(d_rhs_v u^T + d_rhs_k w^T).
    d_bv = mm(inverse, du_in[bh, n], trans_a=True)
    d_bk = mm(inverse, dw_in[bh, n], trans_a=True)
    d_a = -jnp.where(cols < rows, mm(d_bv, u, trans_b=True) + mm(d_bk, w, trans_b=True), 0.0)
    dv_out[b, tokens, h, :] = (beta[:, None] * d_bv).astype(dv_out.dtype)
    k_dbk = jnp.sum(k * d_bk, axis=1)
    d_beta = jnp.sum(v * d_bv, axis=1) + from_start * k_dbk + jnp.sum(d_a * kk * pair_decay, axis=1)
    dk += k_scale[:, None] * d_bk
    d_from_start = beta * k_dbk
    # A = beta_i kk_ij D_ij: through kk = k k^T into k, through D into the cumulative gates.
    d_kk = d_a * beta[:, None] * pair_decay
    dk += mm(d_kk, k) + mm(d_kk, k, trans_a=True)
    d_pair = d_a * beta[:, None] * kk
    # intra = (q k^T) D.
    d_intra = dintra_in[bh, n].astype(jnp.float32)
    d_qk = d_intra * pair_decay
    dq += mm(d_qk, k)
    dk += mm(d_qk, q, trans_a=True)
    d_pair += d_intra * qk
    # q_out = q fs, k_out = k te.
    d_q_out = dq_in[bh, n].astype(jnp.float32)
    d_k_out = dk_in[bh, n].astype(jnp.float32)
    dq += d_q_out * from_start[:, None]
    d_from_start += jnp.sum(d_q_out * q, axis=1)
    dk += d_k_out * to_end[:, None]
    d_to_end = jnp.sum(d_k_out * k, axis=1)
    # Into the cumulative gates: D_ij = exp(gc_i - gc_j), fs = exp(gc), te = exp(gc_last - gc), decay.
    e = d_pair * pair_decay
    d_g_cum = jnp.sum(e, axis=1) - jnp.sum(e, axis=0) + d_from_start * from_start - d_to_end * to_end
    d_g_last = ddecay_in[bh, n] * decay + jnp.sum(d_to_end * to_end)
    d_g_cum += jnp.where(is_last, d_g_last, 0.0)
    dg_out[b, tokens, h] = jnp.sum(jnp.where(causal, d_g_cum[:, None], 0.0), axis=0)  # reverse cumsum
    dbeta_out[b, tokens, h] = d_beta
  dq = dq * scale
  if l2norm:  # x_n = x r, r = rsqrt(|x|^2 + eps): dx = r (dx_n - x_n <x_n, dx_n>)
    q_n = q * (1.0 / scale)
    dq = q_inv * (dq - q_n * jnp.sum(q_n * dq, axis=1, keepdims=True))
    dk = k_inv * (dk - k * jnp.sum(k * dk, axis=1, keepdims=True))
  dq_out[b, tokens, hk, :] = dq.astype(dq_out.dtype)
  dk_out[b, tokens, hk, :] = dk.astype(dk_out.dtype)


# ------------------------------------------------------------------------------------------------ wrappers


def _segments(segment_ids: jax.Array | None, length: int, chunk: int):
  """(segment id, carried, in_last_segment) per token, [B, T_padded] (chunking._segment_masks), or None.

  Padding continues the last segment (padded tokens have beta = 0 and k = 0, so they change nothing).
  """
  if segment_ids is None:
    return None
  batch = segment_ids.shape[0]
  padded = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, (-length) % chunk)], mode="edge")
  seg = padded.reshape(batch, -1, chunk)  # [B, N, C]
  previous_last = jnp.concatenate([seg[:, :1, :1], seg[:, :-1, -1:]], axis=1)  # segment of the carried state
  flat = lambda x: x.reshape(batch, -1)
  return (flat(seg), flat((seg == previous_last).astype(jnp.float32)),
          flat((seg == seg[..., -1:]).astype(jnp.float32)))


def _setup(q, k, v, chunk, scale, precision, inverse_precision, interpret):
  batch, length, key_heads, key_dim = q.shape
  value_heads, value_dim = v.shape[2:]
  check_dims(chunk_size=chunk, key_dim=key_dim, value_dim=value_dim)
  precision, store, mm = _matmul((q, k, v), precision, interpret)
  if inverse_precision is None:
    inverse_precision = "ieee" if precision == "ieee" else "tf32"  # see the module docstring
  if inverse_precision not in PRECISIONS:
    raise ValueError(f"gated delta rule GPU kernel: unknown inverse_precision '{inverse_precision}'; "
                     f"choose one of {PRECISIONS}")
  inv_mm = functools.partial(_dot, precision=inverse_precision, interpret=interpret)
  static = dict(chunk=chunk, groups=value_heads // key_heads, value_heads=value_heads,
                scale=float(key_dim**-0.5 if scale is None else scale), mm=mm, inv_mm=inv_mm)
  return static, store, -(-length // chunk)


def _pad_time(xs, length: int, chunk: int):
  pad = (-length) % chunk
  if not pad:
    return xs
  return tuple(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in xs)


@functools.partial(jax.jit, static_argnames=("chunk_size", "use_qk_l2norm", "scale", "precision",
                                             "inverse_precision", "interpret", "launch"))
def prepare_chunks_gpu(q, k, v, g, beta, segment_ids=None, *, chunk_size: int = 64, use_qk_l2norm: bool = True,
                       scale: float | None = None, precision: str | None = None,
                       inverse_precision: str | None = None, interpret: bool = False,
                       launch: PrepareLaunch = PrepareLaunch()) -> ChunkInputs:
  """chunking.prepare_chunks as one Pallas-Triton kernel (same layouts and ChunkInputs, see the module docstring).

  precision: gpu.py's modes (None: by the inputs' dtype); raises ValueError for sizes Triton cannot tile.
  """
  batch, length, key_heads, key_dim = q.shape
  value_heads, value_dim = v.shape[2:]
  static, store, num_chunks = _setup(q, k, v, chunk_size, scale, precision, inverse_precision, interpret)
  segments = _segments(segment_ids, length, chunk_size)
  bh = batch * value_heads
  struct = lambda *shape, dtype=store: jax.ShapeDtypeStruct(shape, dtype)
  q_out, k_out, w, u, intra, decay = pl.pallas_call(
      functools.partial(_forward_kernel, l2norm=use_qk_l2norm, segmented=segments is not None, **static),
      grid=(key_heads, num_chunks, batch),  # key heads fastest: neighbouring programs read neighbouring rows
      out_shape=(struct(bh, num_chunks, chunk_size, key_dim), struct(bh, num_chunks, chunk_size, key_dim),
                 struct(bh, num_chunks, chunk_size, key_dim), struct(bh, num_chunks, chunk_size, value_dim),
                 struct(bh, num_chunks, chunk_size, chunk_size), struct(bh, num_chunks, dtype=jnp.float32)),
      compiler_params=_TritonParams(num_warps=launch.num_warps, num_stages=launch.num_stages),
      interpret=interpret,
      name="gdr_prepare_fwd",
  )(*_pad_time((q, k, v, g, beta), length, chunk_size), *(segments or ()))
  unflat = lambda x: x.reshape(batch, value_heads, *x.shape[1:])
  return ChunkInputs(*(unflat(x) for x in (q_out, k_out, w, u, intra, decay)))


@functools.partial(jax.jit, static_argnames=("chunk_size", "use_qk_l2norm", "scale", "precision",
                                             "inverse_precision", "interpret", "launch"))
def prepare_chunks_gpu_backward(q, k, v, g, beta, segment_ids, d_chunks: ChunkInputs, *, chunk_size: int = 64,
                                use_qk_l2norm: bool = True, scale: float | None = None,
                                precision: str | None = None, inverse_precision: str | None = None,
                                interpret: bool = False, launch: PrepareLaunch = PrepareLaunch()):
  """The vjp of prepare_chunks_gpu: cotangents of its ChunkInputs -> (dq, dk, dv, dg, dbeta) in the inputs' dtypes."""
  batch, length, key_heads, key_dim = q.shape
  value_heads, value_dim = v.shape[2:]
  static, store, num_chunks = _setup(q, k, v, chunk_size, scale, precision, inverse_precision, interpret)
  segments = _segments(segment_ids, length, chunk_size)
  padded = num_chunks * chunk_size
  flat = lambda x: x.reshape(batch * value_heads, *x.shape[2:])
  struct = lambda *shape, dtype=store: jax.ShapeDtypeStruct(shape, dtype)
  dq, dk, dv, dg, dbeta = pl.pallas_call(
      functools.partial(_backward_kernel, l2norm=use_qk_l2norm, segmented=segments is not None, **static),
      grid=(key_heads, num_chunks, batch),
      out_shape=(struct(batch, padded, key_heads, key_dim), struct(batch, padded, key_heads, key_dim),
                 struct(batch, padded, value_heads, value_dim), struct(batch, padded, value_heads, dtype=jnp.float32),
                 struct(batch, padded, value_heads, dtype=jnp.float32)),
      compiler_params=_TritonParams(num_warps=launch.grad_num_warps, num_stages=launch.num_stages),
      interpret=interpret,
      name="gdr_prepare_bwd",
  )(*_pad_time((q, k, v, g, beta), length, chunk_size), *(segments or ()),
    *(flat(x) for x in (d_chunks.q, d_chunks.k, d_chunks.w, d_chunks.u, d_chunks.intra)),
    flat(d_chunks.decay).astype(jnp.float32))
  cut = lambda x, like: x[:, :length].astype(like.dtype)
  return cut(dq, q), cut(dk, k), cut(dv, v), cut(dg, g), cut(dbeta, beta)
