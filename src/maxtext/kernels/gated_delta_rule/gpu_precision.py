"""Dot precision, storage dtype and tile checks shared by the Pallas-Triton gated delta rule kernels (gpu.py,
recurrent_kernels.py).

Precision modes (accumulation and carried states are float32 in every mode):
  'ieee'    float32 operands, IEEE float32 dots on the CUDA cores: exact, slowest. Default for float32 inputs.
  'tf32'    float32 operands rounded to TF32 (10-bit mantissa) on the tensor cores.
  'tf32x3'  float32 operands as TF32 hi + lo parts, 3 tensor-core passes: ~float32.
  'bf16'    every dot operand rounded to bf16, as fla does. Default for 16-bit inputs.
Interpret mode (CPU) has no TF32 and runs IEEE float32 for the TF32 modes. Storage: in 'bf16' mode with 16-bit
inputs the kernels store their big intermediates in the inputs' dtype (each is only ever read back as a bf16 dot
operand); every other mode stores float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
_TF32_ALGORITHMS = {
    "ieee": jax.lax.Precision.HIGHEST,  # Triton's default for a float32 dot would be TF32
    "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
    "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
}


def dot(a: jax.Array, b: jax.Array, *, precision: str, interpret: bool, trans_a: bool = False,
        trans_b: bool = False) -> jax.Array:
  """a @ b (optionally transposed) with float32 accumulation in one of the precision modes."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  if precision == "bf16":
    return jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims,
                               preferred_element_type=jnp.float32)
  algorithm = jax.lax.Precision.HIGHEST if interpret else _TF32_ALGORITHMS[precision]  # no TF32 on a CPU
  return jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims, precision=algorithm,
                             preferred_element_type=jnp.float32)


def matmul_mode(inputs: tuple[jax.Array, ...], precision: str | None, interpret: bool):
  """(precision, storage dtype, the kernels' dot) for these inputs (see the module docstring)."""
  dtype = jnp.result_type(*(x.dtype for x in inputs))
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise TypeError(f"gated delta rule GPU kernel: unsupported input dtype {dtype}; pass float32 or bfloat16")
  if precision is None:
    precision = "ieee" if dtype == jnp.float32 else "bf16"
  if precision not in PRECISIONS:
    raise ValueError(f"gated delta rule GPU kernel: unknown precision '{precision}'; choose one of {PRECISIONS}")
  store = dtype if precision == "bf16" else jnp.float32
  return precision, store, functools.partial(dot, precision=precision, interpret=interpret)


def check_dims(**sizes: int) -> None:
  """Triton tiles must be powers of two and dots need every dimension >= 16."""
  for name, size in sizes.items():
    if size < 16 or size & (size - 1):
      raise ValueError(f"gated delta rule GPU kernel: {name}={size} must be a power of two >= 16 "
                       "(use impl='reference' for other shapes)")
