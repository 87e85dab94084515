"""Where this jax keeps Pallas's Triton pieces: the load/store module and the compiler parameters.

jax 0.10.x and 0.11.x (the versions we support) have them in `jax.experimental.pallas.triton`; older jax had them in
`pallas.gpu` as `TritonCompilerParams`. Every Pallas-Triton kernel imports them from here.
"""

try:
  from jax.experimental.pallas import triton as plt
  from jax.experimental.pallas.triton import CompilerParams as TritonParams
except ImportError:  # older jax
  from jax.experimental.pallas import gpu as plt
  from jax.experimental.pallas.gpu import TritonCompilerParams as TritonParams

__all__ = ["TritonParams", "plt"]
