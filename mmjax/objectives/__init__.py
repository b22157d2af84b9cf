"""Objective adapters for the trainer: one module per model family."""

from mmjax.objectives import decoder  # noqa: F401,E402  (registers "decoder")
from mmjax.objectives import fourm  # noqa: F401,E402  (registers "fourm")
from mmjax.objectives import tokenizer  # noqa: F401,E402  (registers "tokenizer")
