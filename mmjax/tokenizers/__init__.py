"""Tokenizers: text (SentencePiece), image-like (VQ / FSQ in JAX), boxes as text."""
