"""Pallas GPU (Triton) kernels for the inter-chunk recurrence of the chunked gated delta rule.

The contract and the jnp reference are in inter_chunk.py. Triton grids are parallel only, so each recurrence
program owns one (batch * head, value block) and walks the chunks with a fori_loop, keeping its [Dk, BV] slice of
the float32 state in registers: every product in the forward and in the state-gradient recurrence is separable
across value columns. The forward runs in two kernels: the recurrence reads only k, w and u per chunk (small
enough for Triton to prefetch the next chunk's tiles while it computes: the sequential walk is latency bound) and
stores the states and v_new it needs anyway; then a kernel parallel over chunks forms out = q h_n + intra v_new.
The backward runs in two kernels:
  1. the reverse recurrence (grid over value blocks, like the forward) writes du = dv_new and the state gradient
     dh entering each chunk from the right (dL/dh_{n+1}), both float32;
  2. a fully parallel kernel over (chunk, key block) reads h_n, dh, d_out, v_new and du and forms dq, dk, dw,
     dintra and ddecay, which all reduce over Dv, in one program each (no cross-program partial sums, and
     B*H*N programs to fill the GPU even when B*H is small).
Writing dh costs one more [B, H, N, Dk, Dv] float32 array, but splitting Dv in a single kernel would instead
write (Dv/BV) partial copies of dq, dk, dw and dintra and sum them afterwards, which moves more bytes.

Precision (`precision`; accumulation and the carried state are float32 in every mode):
  'ieee'    float32 operands, IEEE float32 dots on the CUDA cores: exact, slowest. Default for float32 inputs.
  'tf32'    float32 operands rounded to TF32 (10-bit mantissa) on the tensor cores: ~5e-4 relative end to end.
  'tf32x3'  float32 operands as TF32 hi + lo parts, 3 tensor-core passes: ~float32.
  'bf16'    every operand (inputs, h, v_new, d_out, dh, dv_new) rounded to bf16 just before its dot, as fla does:
            ~2e-3..4e-3 relative (each rounded operand alone costs ~1e-3..2e-3). Default for 16-bit inputs.
Interpret mode (CPU) has no TF32 and runs IEEE float32 for the TF32 modes.

Storage: in 'bf16' mode with 16-bit inputs the big outputs and residuals (out, states, v_new, du, dq, dk, dw,
dintra) are stored in the inputs' dtype, halving the bytes moved: every later read of them feeds a dot that rounds
its operands to bf16 anyway, so nothing is lost but the final rounding of the outputs. The state gradients dh
stay float32 (with states they give ddecay, an elementwise product summed over the whole state), as do the
final state, ddecay and dh0. Every other mode stores float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from maxtext.kernels.gated_delta_rule.inter_chunk import BackwardResult, ForwardResult

try:  # where jax 0.10.x and 0.11.x keep the Triton compiler parameters
  from jax.experimental.pallas.triton import CompilerParams as _TritonParams
except ImportError:  # older jax named them TritonCompilerParams, in pallas.gpu
  from jax.experimental.pallas.gpu import TritonCompilerParams as _TritonParams


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
  """Tile sizes and launch parameters; the defaults target an H100 with Dk = Dv = 128, C = 64.

  Warps left as None: 8 for IEEE float32 dots in the recurrences (they spill heavily at 4), 4 otherwise; 8 in the
  gradient kernel (255 registers and spills at 4 with the default tiles). Register counts from compiling the
  Triton IR for sm_90a with ptxas. On an H100 at B=1, T=16384, H=32 with TF32 dots (docs/benchmarks.md) these
  defaults were the fastest measured: block_v 16 or 64, 8 warps and the fused forward were all 3-14% slower.
  """

  block_v: int = 32  # value columns per recurrence program: B*H*Dv/block_v programs (128 at B=1, H=32)
  num_warps: int | None = None
  # Triton software pipelining of the next chunk's loads (what hides their latency in the sequential walk).
  # None: 2, except 1 for the fused forward and the state-gradient recurrence with float32 operands, whose
  # q, k, w (and intra) tiles would need ~270 KB of shared memory for 2 stages, over the H100's 227 KB.
  num_stages: int | None = None
  # The forward recurrence only carries the state (reads k, w, u); out = q h + intra v_new is a parallel kernel
  # over chunks. fuse_output=True computes out inside the recurrence instead (fewer bytes, longer steps).
  fuse_output: bool = False
  output_block_v: int = 64  # value columns per program of the parallel output kernel
  grad_block_k: int = 64  # key rows per program of the parallel gradient kernel
  grad_block_v: int = 64  # value columns per inner step of the gradient kernel (bounds register use)
  grad_num_warps: int | None = None

  def recurrence_params(self, precision: str, heavy: bool) -> _TritonParams:
    """heavy: the recurrence streams q, k, w tiles per chunk (fused forward, state gradients)."""
    warps = self.num_warps or (8 if precision == "ieee" else 4)
    stages = self.num_stages or (1 if heavy and precision != "bf16" else 2)
    return _TritonParams(num_warps=warps, num_stages=stages)

  def output_params(self) -> _TritonParams:
    return _TritonParams(num_warps=8, num_stages=1)

  def gradient_params(self) -> _TritonParams:
    return _TritonParams(num_warps=self.grad_num_warps or 8, num_stages=1)


PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
_TF32_ALGORITHMS = {
    "ieee": jax.lax.Precision.HIGHEST,  # Triton's default for a float32 dot would be TF32
    "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
    "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
}


def _dot(a: jax.Array, b: jax.Array, *, precision: str, interpret: bool, trans_a: bool = False,
         trans_b: bool = False) -> jax.Array:
  """a @ b (optionally transposed) with float32 accumulation; see the module docstring for the precisions."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  if precision == "bf16":
    return jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims,
                               preferred_element_type=jnp.float32)
  algorithm = jax.lax.Precision.HIGHEST if interpret else _TF32_ALGORITHMS[precision]  # no TF32 on a CPU
  return jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims, precision=algorithm,
                             preferred_element_type=jnp.float32)


def _matmul(inputs: tuple[jax.Array, ...], precision: str | None, interpret: bool):
  """(precision, storage dtype, the kernels' dot) for these inputs (see the module docstring)."""
  dtype = jnp.result_type(*(x.dtype for x in inputs))
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise TypeError(f"gated delta rule GPU kernel: unsupported input dtype {dtype}; pass float32 or bfloat16")
  if precision is None:
    precision = "ieee" if dtype == jnp.float32 else "bf16"
  if precision not in PRECISIONS:
    raise ValueError(f"gated delta rule GPU kernel: unknown precision '{precision}'; choose one of {PRECISIONS}")
  store = dtype if precision == "bf16" else jnp.float32
  return precision, store, functools.partial(_dot, precision=precision, interpret=interpret)


def check_dims(**sizes: int) -> None:
  """Triton tiles must be powers of two and dots need every dimension >= 16."""
  for name, size in sizes.items():
    if size < 16 or size & (size - 1):
      raise ValueError(f"gated delta rule GPU kernel: {name}={size} must be a power of two >= 16 "
                       "(use impl='reference' for other shapes)")


def _flat(x: jax.Array) -> jax.Array:
  """[B, H, ...] -> [B*H, ...] (free: a reshape of the leading axes)."""
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _struct(*shape: int, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


# ------------------------------------------------------------------------------------------------ forward


def _forward_kernel(*refs, num_chunks: int, block_v: int, mm, fused: bool):
  """One (value block, batch*head): walks the chunks carrying its [Dk, BV] float32 state slice.

  refs: (q, k, w, u, intra, decay, h0 | out, final, states, v_new) if fused, else without q, intra and out.
  """
  if fused:
    q_ref, k_ref, w_ref, u_ref, intra_ref, decay_ref, h0_ref, out_ref, final_ref, states_ref, v_new_ref = refs
  else:
    k_ref, w_ref, u_ref, decay_ref, h0_ref, final_ref, states_ref, v_new_ref = refs
  vb, bh = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(vb * block_v, block_v)

  def step(n, h):  # h: [Dk, BV] float32, the state entering chunk n
    states_ref[bh, n, :, cols] = h.astype(states_ref.dtype)
    v_new = u_ref[bh, n, :, cols].astype(jnp.float32) - mm(w_ref[bh, n], h)  # [C, BV]
    v_new_ref[bh, n, :, cols] = v_new.astype(v_new_ref.dtype)
    if fused:
      out = mm(q_ref[bh, n], h) + mm(intra_ref[bh, n], v_new)
      out_ref[bh, n, :, cols] = out.astype(out_ref.dtype)
    return decay_ref[bh, n] * h + mm(k_ref[bh, n], v_new, trans_a=True)

  final_ref[bh, :, cols] = jax.lax.fori_loop(0, num_chunks, step, h0_ref[bh, :, cols])


def _output_kernel(q_ref, intra_ref, states_ref, v_new_ref, out_ref, *, block_v: int, mm):
  """One (value block, chunk, batch*head): out = q h_n + intra v_new, from the states the recurrence stored.

  Reading h_n and v_new back as stored rounds nothing new: the dots round them to their operand precision anyway.
  """
  vb, n, bh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  cols = pl.ds(vb * block_v, block_v)
  out = mm(q_ref[bh, n], states_ref[bh, n, :, cols]) + mm(intra_ref[bh, n], v_new_ref[bh, n, :, cols])
  out_ref[bh, n, :, cols] = out.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes", "precision"))
def inter_chunk_forward_gpu(q, k, w, u, intra, decay, h0, *, interpret: bool = False,
                            block_sizes: GpuBlockSizes = GpuBlockSizes(),
                            precision: str | None = None) -> ForwardResult:
  """Pallas-Triton forward of the inter-chunk recurrence; same contract as inter_chunk.inter_chunk_forward.

  precision: 'ieee', 'tf32', 'tf32x3' or 'bf16' (see the module docstring); None: by the inputs' dtype.
  """
  batch, heads, num_chunks, chunk, key_dim = q.shape
  value_dim = u.shape[-1]
  block_v = min(block_sizes.block_v, value_dim)
  output_block_v = min(block_sizes.output_block_v, value_dim)
  check_dims(chunk_size=chunk, key_dim=key_dim, value_dim=value_dim, block_v=block_v,
              output_block_v=output_block_v)
  precision, store, mm = _matmul((q, k, w, u, intra), precision, interpret)
  fused = block_sizes.fuse_output
  bh = batch * heads
  q, k, w, u, intra = map(_flat, (q, k, w, u, intra))
  out_struct = _struct(bh, num_chunks, chunk, value_dim, dtype=store)
  carried = (_struct(bh, key_dim, value_dim), _struct(bh, num_chunks, key_dim, value_dim, dtype=store),
             _struct(bh, num_chunks, chunk, value_dim, dtype=store))  # final state, states, v_new
  results = pl.pallas_call(
      functools.partial(_forward_kernel, num_chunks=num_chunks, block_v=block_v, mm=mm, fused=fused),
      # Value blocks vary fastest so the programs sharing one head's k, w (q, intra) run together (L2 reuse).
      grid=(value_dim // block_v, bh),
      out_shape=((out_struct,) if fused else ()) + carried,
      compiler_params=block_sizes.recurrence_params(precision, heavy=fused),
      interpret=interpret,
      name="gdr_inter_chunk_fwd",
  )(*((q, k, w, u, intra) if fused else (k, w, u)), _flat(decay).astype(jnp.float32),
    _flat(h0).astype(jnp.float32))
  if fused:
    out, final_state, states, v_new = results
  else:
    final_state, states, v_new = results
    out = pl.pallas_call(
        functools.partial(_output_kernel, block_v=output_block_v, mm=mm),
        grid=(value_dim // output_block_v, num_chunks, bh),
        out_shape=out_struct,
        compiler_params=block_sizes.output_params(),
        interpret=interpret,
        name="gdr_inter_chunk_out",
    )(q, intra, states, v_new)
  unflat = lambda x: x.reshape(batch, heads, *x.shape[1:])
  return ForwardResult(unflat(out), unflat(final_state), unflat(states), unflat(v_new))


# ----------------------------------------------------------------------------------------------- backward


def _state_grad_kernel(q_ref, k_ref, w_ref, intra_ref, decay_ref, do_ref, dfinal_ref,
                       du_ref, dh_ref, dh0_ref, *, num_chunks: int, block_v: int, mm):
  """One (value block, batch*head), chunks in reverse: du = dv_new and dh = dL/dh_{n+1} per chunk, then dh0."""
  vb, bh = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(vb * block_v, block_v)

  def step(i, dh):  # dh: [Dk, BV]
    n = num_chunks - 1 - i
    dh_ref[bh, n, :, cols] = dh
    do = do_ref[bh, n, :, cols]  # [C, BV]
    dv_new = mm(intra_ref[bh, n], do, trans_a=True) + mm(k_ref[bh, n], dh)  # [C, BV]
    du_ref[bh, n, :, cols] = dv_new.astype(du_ref.dtype)
    return decay_ref[bh, n] * dh + mm(q_ref[bh, n], do, trans_a=True) - mm(w_ref[bh, n], dv_new, trans_a=True)

  dh0_ref[bh, :, cols] = jax.lax.fori_loop(0, num_chunks, step, dfinal_ref[bh, :, cols])


def _chunk_grad_kernel(states_ref, dh_ref, v_new_ref, do_ref, du_ref,
                       dq_ref, dk_ref, dw_ref, dintra_ref, ddecay_ref, *, block_k: int, block_v: int, mm):
  """One (key block, chunk, batch*head): the gradients that reduce over Dv, accumulated over value blocks."""
  kb, n, bh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = pl.ds(kb * block_k, block_k)
  chunk, value_dim = do_ref.shape[2:]
  value_blocks = [pl.ds(j * block_v, block_v) for j in range(value_dim // block_v)]  # <= 8: unrolled
  dq = dk = dw = jnp.zeros((chunk, block_k), jnp.float32)
  ddecay = jnp.zeros((), jnp.float32)
  for cols in value_blocks:
    h, dh = states_ref[bh, n, rows, cols], dh_ref[bh, n, rows, cols]  # [BK, BV]
    do, du = do_ref[bh, n, :, cols], du_ref[bh, n, :, cols]  # [C, BV]
    dq += mm(do, h, trans_b=True)
    dw -= mm(du, h, trans_b=True)
    dk += mm(v_new_ref[bh, n, :, cols], dh, trans_b=True)
    # float32 products: no operand rounding in the decay gradient beyond the states' storage.
    ddecay += jnp.sum(h.astype(jnp.float32) * dh.astype(jnp.float32))
  dq_ref[bh, n, :, rows] = dq.astype(dq_ref.dtype)
  dk_ref[bh, n, :, rows] = dk.astype(dk_ref.dtype)
  dw_ref[bh, n, :, rows] = dw.astype(dw_ref.dtype)
  ddecay_ref[kb, bh, n] = ddecay  # this key block's share, summed by the caller

  @pl.when(kb == 0)  # dintra = do @ v_new^T involves no key dim: the first key block's program writes it
  def _():
    dintra = jnp.zeros((chunk, chunk), jnp.float32)
    for cols in value_blocks:
      dintra += mm(do_ref[bh, n, :, cols], v_new_ref[bh, n, :, cols], trans_b=True)
    dintra_ref[bh, n] = dintra.astype(dintra_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes", "precision"))
def inter_chunk_backward_gpu(q, k, w, intra, decay, states, v_new, d_out, d_final_state, *,
                             interpret: bool = False, block_sizes: GpuBlockSizes = GpuBlockSizes(),
                             precision: str | None = None) -> BackwardResult:
  """Pallas-Triton backward of the inter-chunk recurrence; same contract as inter_chunk.inter_chunk_backward.

  precision: as for inter_chunk_forward_gpu (pass the same).
  """
  batch, heads, num_chunks, chunk, key_dim = q.shape
  value_dim = d_out.shape[-1]
  block_v = min(block_sizes.block_v, value_dim)
  block_k = min(block_sizes.grad_block_k, key_dim)
  grad_block_v = min(block_sizes.grad_block_v, value_dim)
  check_dims(chunk_size=chunk, key_dim=key_dim, value_dim=value_dim, block_v=block_v, grad_block_k=block_k,
              grad_block_v=grad_block_v)
  precision, store, mm = _matmul((q, k, w, intra), precision, interpret)
  bh = batch * heads
  q, k, w, intra, states, v_new, d_out = map(_flat, (q, k, w, intra, states, v_new, d_out))

  du, dh, dh0 = pl.pallas_call(
      functools.partial(_state_grad_kernel, num_chunks=num_chunks, block_v=block_v, mm=mm),
      grid=(value_dim // block_v, bh),
      out_shape=(_struct(bh, num_chunks, chunk, value_dim, dtype=store), _struct(bh, num_chunks, key_dim, value_dim),
                 _struct(bh, key_dim, value_dim)),
      compiler_params=block_sizes.recurrence_params(precision, heavy=True),
      interpret=interpret,
      name="gdr_inter_chunk_bwd_state",
  )(q, k, w, intra, _flat(decay).astype(jnp.float32), d_out, _flat(d_final_state).astype(jnp.float32))

  num_key_blocks = key_dim // block_k
  dq, dk, dw, dintra, ddecay = pl.pallas_call(
      functools.partial(_chunk_grad_kernel, block_k=block_k, block_v=grad_block_v, mm=mm),
      # Key blocks vary fastest: the programs of one chunk read the same d_out, v_new and du together.
      grid=(num_key_blocks, num_chunks, bh),
      out_shape=(*[_struct(bh, num_chunks, chunk, key_dim, dtype=store)] * 3,  # dq, dk, dw
                 _struct(bh, num_chunks, chunk, chunk, dtype=store), _struct(num_key_blocks, bh, num_chunks)),
      compiler_params=block_sizes.gradient_params(),
      interpret=interpret,
      name="gdr_inter_chunk_bwd_grads",
  )(states, dh, v_new, d_out, du)

  unflat = lambda x: x.reshape(batch, heads, *x.shape[1:])
  return BackwardResult(unflat(dq), unflat(dk), unflat(dw), unflat(du), unflat(dintra),
                        unflat(ddecay.sum(axis=0)), unflat(dh0))
