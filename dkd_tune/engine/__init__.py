"""Floor 1, the engine: the training loop and what it needs (speed settings, checkpoints, devices, timing)."""
