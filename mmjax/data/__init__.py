"""Data: the synthetic shapes world, record builders, and the input pipeline."""
