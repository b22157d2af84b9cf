"""Objective adapters for the trainer: one module per model family."""
