"""Samplers: 4M (MaskGIT, ROAR, autoregressive, chained, guidance) and the mixed-modal decoder."""
