"""Gated delta rule: chunked (training, prefill) and recurrent (decode) forms behind one dispatching API.

dispatch.py chooses the implementation (a registry with `supports` predicates) and maps it over the mesh;
chunked.py composes one shard; reference.py is the jnp oracle and CPU path; tpu.py, gpu.py and
recurrent_kernels.py hold the Pallas kernels.
"""

from maxtext.kernels.gated_delta_rule.chunked import ChunkOptions, run_chunked
from maxtext.kernels.gated_delta_rule.chunking import l2_normalize
from maxtext.kernels.gated_delta_rule.dispatch import chunk_gated_delta_rule, recurrent_gated_delta_rule
from maxtext.kernels.gated_delta_rule.reference import (
    chunk_gated_delta_rule_reference,
    recurrent_gated_delta_rule_reference,
)

__all__ = [
    "ChunkOptions",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_reference",
    "l2_normalize",
    "recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule_reference",
    "run_chunked",
]
