"""Gated delta rule: chunked (training, prefill) and recurrent (decode) forms behind one dispatching API."""

from __future__ import annotations

import jax

from maxtext.kernels import dispatch
from maxtext.kernels.gated_delta_rule.reference import (
    chunk_gated_delta_rule_reference,
    l2_normalize,
    recurrent_gated_delta_rule_reference,
)

# Fast lowerings per backend, best first; the reference runs everywhere.
_AVAILABLE: dict[str, tuple[str, ...]] = {"cpu": ("reference",), "gpu": ("reference",), "tpu": ("reference",)}


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
  """Chunked gated delta rule; see reference.py for layouts. Returns (o, final_state)."""
  dispatch.choose("gated_delta_rule", impl, _AVAILABLE)
  return chunk_gated_delta_rule_reference(
      q, k, v, g, beta, initial_state, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm
  )


def recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    use_qk_l2norm: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Token-by-token gated delta rule for decoding a few tokens from a carried state."""
  return recurrent_gated_delta_rule_reference(q, k, v, g, beta, initial_state, use_qk_l2norm=use_qk_l2norm)


__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_reference",
    "l2_normalize",
    "recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule_reference",
]
