"""The depth tokenizer of the shapes data: ViT VQ autoencoder, 64x64 -> 8x8 tokens.

Run:
  mmjax tokenizer train --config=configs/tokenizers/shapes_depth.py --workdir=runs/tok_depth
  mmjax tokenizer train --config=configs/tokenizers/shapes_depth.py:fsq --workdir=runs/tok_depth_fsq
  mmjax tokenizer train --config=configs/tokenizers/shapes_depth.py:runlocal --workdir=/tmp/smoke
Arguments: `vq` (default) or `fsq` quantizer; `runlocal` shrinks model, steps and data.
Every key is commented in mmjax/objectives/tokenizer.py (image_tokenizer_config),
mmjax/tokenizers/image.py (ImageTokenizerConfig: the model section) and mmjax/defaults.py.
"""

from mmjax.objectives.tokenizer import image_tokenizer_config


def get_config(arg=None):
  return image_tokenizer_config("depth", arg)
