"""Models: the 4M encoder-decoder and the mixed-modal decoder, as Flax NNX modules."""
