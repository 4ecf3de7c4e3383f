"""Checkpoint files -> Flax param trees, one module per model family."""
