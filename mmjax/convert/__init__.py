"""Converters between released checkpoint layouts (ml-4m 4M, Hugging Face Chameleon) and mmjax."""
