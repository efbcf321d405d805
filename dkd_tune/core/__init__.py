"""Floor 0, the core: losses and the loss modes, recipes, errors, atomic files, the checkpoint format, progress (torch only)."""
