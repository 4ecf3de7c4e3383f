"""Network definitions (Flax linen)."""
