"""Kernels: each op is a folder with a pure-jnp reference, its fast lowerings and one dispatching entry point."""
