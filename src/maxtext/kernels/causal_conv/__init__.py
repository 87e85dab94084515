"""Causal depthwise conv (+ SiLU) of the Gated DeltaNet, behind one dispatching API.

dispatch.py chooses the implementation and maps it over the mesh; reference.py is the jnp oracle and the CPU / TPU
path (float32 kernel gradient); gpu.py holds the Pallas-Triton forward and backward kernels.
"""

from maxtext.kernels.causal_conv.dispatch import causal_conv
from maxtext.kernels.causal_conv.reference import causal_conv_reference

__all__ = ["causal_conv", "causal_conv_reference"]
