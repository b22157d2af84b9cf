"""Evaluation: any-to-any metrics on the shapes data and PNG grids of samples."""
