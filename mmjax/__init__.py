"""mmjax: pretraining multimodal models on discrete tokens with JAX and Flax."""

__version__ = "0.1.0"
