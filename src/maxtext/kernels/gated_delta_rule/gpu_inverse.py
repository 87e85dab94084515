"""The chunk's WY inverse T = (I + A)^-1 inside the Pallas-Triton kernels of gpu.py (A, gates: its docstring).

Two ways, chosen by ChunkedLaunch.inverse_block:
- None: `unit_lower_inverse` on the whole [C, C] tile, doubling the inverted diagonal blocks 2, 4, .., C/2 wide:
  for C = 64 ten dependent 64 x 64 x 64 products (2.6M multiply-adds per chunk, most of the prep kernel).
- b (16 or 32, <= C): `blocked_chunk` never forms a [C, C] tile. It builds the lower blocks A_ij (j <= i) of
  A and of the output scores P from row blocks of q and k, inverts the C/b diagonal blocks independently by the
  same doubling on [b, b] tiles, then fills the blocks below the diagonal by block forward substitution
    T_ij = -T_ii (A_ij T_jj + A_i,j+1 T_j+1,j + ... + A_i,i-1 T_i-1,j)      (j < i)
  (the rows i of (I + A) T = I below the diagonal block). For C = 64, b = 16: 4 x 6 products for the diagonal
  blocks and 16 for the substitution, all 16 x 16 x 16 (160K multiply-adds); the longest chain of dependent
  products is 6 (diagonal) + 6 (three steps of substitution down a column), each a 16^3 product instead of 64^3;
  blocks of the same distance from the diagonal are independent. A and P also skip their upper blocks.
Both are exact algebra (no Neumann series, whose powers of A overflow for repeated keys); only the rounding order
differs: with operands rounded to TF32 or bf16 (emulated on a CPU, 2026-12-01) the two inverses' errors against
float64 agree to three digits, and end to end the bf16-rounded inverse's worst gradient error was 4.5e-3 blocked16
vs 5.3e-3 whole-tile (blocked32 is the whole-tile doubling's last step, so equal). Not used: the gate-free form
(I + A) = D (I + A0) D^-1, D = diag(exp(gc)): it inverts the same [C, C] system (no fewer products) and exp(-gc)
leaves float32 once a chunk's log decays sum below -88. Speed on an H200 (docs/benchmarks.md): blocked16 with 2-warp
programs is the default. The gate-free products k k^T and q k^T are formed per key head (`key_head_products`) and
gated per value head (`gated_chunk`), so one program can serve all of a key head's value heads.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.chunking import reciprocal_l2_norm


def iotas(size: int):
  return (jax.lax.broadcasted_iota(jnp.int32, (size, size), 0), jax.lax.broadcasted_iota(jnp.int32, (size, size), 1))


def unit_lower_inverse(a: jax.Array, rows: jax.Array, cols: jax.Array, mm) -> jax.Array:
  """(I + a)^-1 for [S, S] a (only its strictly lower part is read), S a power of two, by merging diagonal blocks
  pairwise at full size.

  With T_s the block diagonal of the inverses of the s x s diagonal blocks and L_s the lower-left s x s blocks of
  each 2s x 2s diagonal block of a: T_2s = T_s - T_s L_s T_s (inv([[A, 0], [B, D]]) has -inv(D) B inv(A) below).
  T_2 = I - L_1. Exact, unlike a Neumann product, whose powers of A reach C(62, 31) ~ 5e17 for identical keys.
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


class BlockedChunk(NamedTuple):
  """One (chunk, value head, row) cut into C/b row blocks of b tokens (lists indexed by block; t, p by [i][j])."""

  tokens: list  # pl.ds of each row block's tokens
  k: list  # [b, Dk] keys, as stored
  beta: list  # [b] float32
  from_start: list  # [b] fs = exp(gc) carried
  t: list | None  # t[i][j], j <= i: [b, b] float32 blocks of T (the rest are zero), when k k^T was formed
  p: list | None  # p[i][j], j <= i: [b, b] blocks of P = s Gamma * (q k^T), when asked for

  def apply(self, rhs: list, mm) -> list:
    """T @ X by row blocks, for X given by row blocks ([b, D] each)."""
    return [mm_sum([(self.t[i][j], rhs[j]) for j in range(i + 1)], mm) for i in range(len(rhs))]

  def store(self, ref, index: tuple, blocks: list) -> None:
    """Writes [C, C] from lower blocks (t or p) into ref[index], zeros above the diagonal blocks."""
    size = blocks[0][0].shape[0]
    for i, row in enumerate(blocks):
      for j in range(len(blocks)):
        value = row[j] if j <= i else jnp.zeros((size, size), jnp.float32)
        ref[(*index, pl.ds(i * size, size), pl.ds(j * size, size))] = value.astype(ref.dtype)


class KeyHeadProducts(NamedTuple):
  """A chunk's gate-free products of one key head by row blocks, shared by the key head's value heads."""

  tokens: list  # pl.ds of each row block's tokens
  k: list  # [b, Dk] keys, as stored
  kk: list | None  # kk[i][j], j <= i: k_i k_j^T [b, b] float32, unless only the scores are asked for
  qk: list | None  # qk[i][j], j <= i: q_i k_j^T, when q_ref is given
  k_norms: list | None = None  # [b] reciprocal l2 norms of the raw keys, when they were normalised here


def key_head_products(q_ref, k_ref, b, hk, n, *, chunk: int, block: int, mm, with_kk: bool = True,
                      normalize_to=None) -> KeyHeadProducts:
  """Row b's chunk n of key head hk: its keys and the lower blocks of k k^T (with_kk; for T) and q k^T (when q_ref
  is given; for P), no gates. normalize_to (a dtype): k_ref holds the raw keys, l2-normalised here in float32 and
  rounded to it, as gpu.kernel_qk would (the products then use them; their reciprocal norms are kept)."""
  count = chunk // block
  tokens = [pl.ds(n * chunk + i * block, block) for i in range(count)]
  k = [k_ref[b, span, hk, :] for span in tokens]
  k_norms = None
  if normalize_to is not None:
    raw = [x.astype(jnp.float32) for x in k]
    k_norms = [reciprocal_l2_norm(x) for x in raw]
    k = [(x * r[:, None]).astype(normalize_to) for x, r in zip(raw, k_norms)]
  kk = [[mm(k[i], k[j], trans_b=True) for j in range(i + 1)] for i in range(count)] if with_kk else None
  qk = None
  if q_ref is not None:
    q = [q_ref[b, span, hk, :] for span in tokens]
    qk = [[mm(q[i], k[j], trans_b=True) for j in range(i + 1)] for i in range(count)]
  return KeyHeadProducts(tokens, k, kk, qk, k_norms)


def gated_chunk(products: KeyHeadProducts, gc_ref, beta_ref, seg_refs, b, h, *, inv_mm,
                scale: float | None = None) -> BlockedChunk:
  """Value head h's BlockedChunk from its key head's products: pair decays, betas, A and the inverse T (when the
  products hold k k^T), P (when they hold q k^T).

  Pair decays per block pair as gpu_kernels._gates forms them for the whole chunk: exp(gc_i - gc_j) on causal
  same-segment pairs, masked before exp.
  """
  tokens = products.tokens
  count = len(tokens)
  gc = [gc_ref[b, h, span] for span in tokens]
  beta = [beta_ref[b, h, span] for span in tokens]
  from_start = [jnp.exp(x) for x in gc]
  if seg_refs is not None:
    seg = [seg_refs.ids[b, span] for span in tokens]
    from_start = [fs * seg_refs.carried[b, span] for fs, span in zip(from_start, tokens)]
  rows, cols = iotas(products.k[0].shape[0])
  a = [[None] * count for _ in range(count)] if products.kk is not None else None
  p = [[None] * count for _ in range(count)] if products.qk is not None else None
  for i in range(count):
    for j in range(i + 1):
      mask = (rows >= cols) if i == j else None
      if seg_refs is not None:
        same = seg[i][:, None] == seg[j][None, :]
        mask = same if mask is None else mask & same
      log_gamma = gc[i][:, None] - gc[j][None, :]
      gamma = jnp.exp(log_gamma if mask is None else jnp.where(mask, log_gamma, -jnp.inf))
      if a is not None:
        a[i][j] = beta[i][:, None] * products.kk[i][j] * gamma  # diagonal blocks: only below is read
      if p is not None:
        p[i][j] = products.qk[i][j] * (scale * gamma)
  t = None if a is None else block_lower_inverse(a, inv_mm)
  return BlockedChunk(tokens, products.k, beta, from_start, t, p)


def blocked_chunk(q_ref, k_ref, gc_ref, beta_ref, seg_refs, *, chunk: int, groups: int, block: int, mm, inv_mm,
                  scale: float | None = None) -> BlockedChunk:
  """This program's (chunk n, value head h, row b) with T by blocks (module docstring); P too when q_ref is given."""
  n, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  products = key_head_products(q_ref, k_ref, b, h // groups, n, chunk=chunk, block=block, mm=mm)
  return gated_chunk(products, gc_ref, beta_ref, seg_refs, b, h, inv_mm=inv_mm, scale=scale)


def block_lower_inverse(a: list, mm) -> list:
  """The lower blocks t[i][j] (j <= i) of (I + A)^-1 from A's lower blocks a[i][j] ([b, b]; of the diagonal
  blocks only the strictly lower part is read): diagonal blocks by doubling, then block forward substitution."""
  count = len(a)
  rows, cols = iotas(a[0][0].shape[0])
  t = [[None] * count for _ in range(count)]
  for i in range(count):
    t[i][i] = unit_lower_inverse(a[i][i], rows, cols, mm)
  for distance in range(1, count):  # each step's blocks need only the previous steps'
    for j in range(count - distance):
      i = j + distance
      t[i][j] = -mm(t[i][i], mm_sum([(a[i][m], t[m][j]) for m in range(j, i)], mm))
  return t


def mm_sum(pairs: list, mm) -> jax.Array:
  """sum of x @ y over (x, y) pairs."""
  total = mm(*pairs[0])
  for x, y in pairs[1:]:
    total = total + mm(x, y)
  return total
