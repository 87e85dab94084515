"""Post-training on top of the trainer: RL (rl/)."""
