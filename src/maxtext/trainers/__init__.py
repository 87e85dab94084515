"""Training: the train step (loss, gradients, AdamW), its state and shardings, checkpoints, metrics, FLOPs."""
