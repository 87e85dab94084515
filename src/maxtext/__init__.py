"""JAX/Flax stack for the Qwen3-Next model family."""
