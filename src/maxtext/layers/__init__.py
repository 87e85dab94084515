"""Flax modules of the Qwen3-Next family; each takes plain sizes, dtypes and logical axis names."""
