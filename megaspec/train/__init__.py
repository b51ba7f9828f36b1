"""Training loop: DeepSpeed engine, data, eval, checkpoints, TensorBoard."""
