"""What the backward pass keeps of each decoder layer or block: the `remat_policy` key.

- 'full': nothing; the backward recomputes the block from its input.
- 'minimal': the outputs of matmuls without batch dimensions.
- 'none': everything the backward needs. Unscanned, that is what JAX's autodiff keeps, and XLA then folds the
  cheap elementwise steps (dtype conversions, gates, norms' scaling) into the backward's fusions instead of
  storing them. Scanned, XLA cannot: every value the scan body hands to the backward is written into a stacked
  `[num_blocks, ...]` buffer, float32 upcasts included. So scanned 'none' keeps what unscanned XLA keeps, every
  output of a non-elementwise op (matmuls, kernels, gathers, reductions), and recomputes the elementwise ones
  inside the backward loop. On the 2.5B bench config this took the scanned step's temporaries (deviceless H200
  compile, jax 0.11.2, 4 x 4096 tokens) from 61.1 GB to 39.4 GB, against 35.2 GB unscanned (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import linen as nn

# Primitives whose outputs are cheap to recompute from their inputs: elementwise arithmetic, comparisons, dtype
# conversions and pure data movement. Named, not imported, so that the set reads the same on every jax version.
ELEMENTWISE_PRIMITIVES = frozenset({
    "abs", "add", "and", "atan2", "bitcast_convert_type", "broadcast_in_dim", "cbrt", "ceil", "clamp", "concatenate",
    "convert_element_type", "copy", "cos", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2",
    "expm1", "floor", "ge", "gt", "integer_pow", "iota", "is_finite", "le", "log", "log1p",
    "logistic", "lt", "max", "min", "mul", "ne", "neg", "not", "or", "pad", "pow", "reduce_precision", "rem",
    "reshape", "round", "rsqrt", "select_n", "sign", "sin", "slice", "sqrt", "square", "squeeze", "sub", "tan",
    "tanh", "transpose", "xor",
})


def save_all_but_elementwise(primitive: Any, *_, **__) -> bool:
  """A jax.checkpoint policy: keep every output except those of ELEMENTWISE_PRIMITIVES."""
  return primitive.name not in ELEMENTWISE_PRIMITIVES


POLICIES: dict[str, Callable[..., bool]] = {
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def rematerialised(module_cls: type[nn.Module], policy: str | None, scanned: bool,
                   prevent_cse: bool) -> type[nn.Module]:
  """`module_cls` with the backward's keep/recompute choice of `policy` (see the module docstring); None: no
  backward pass (decoding), the module as it is."""
  if policy is None:
    return module_cls
  if policy == "none":
    if not scanned:
      return module_cls
    return nn.remat(module_cls, policy=save_all_but_elementwise, prevent_cse=prevent_cse)
  return nn.remat(module_cls, policy=POLICIES[policy], prevent_cse=prevent_cse)
