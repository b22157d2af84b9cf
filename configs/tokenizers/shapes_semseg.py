"""The semseg tokenizer of the shapes data: ViT VQ autoencoder, 64x64 -> 8x8 tokens.

Run:
  mmjax tokenizer train --config=configs/tokenizers/shapes_semseg.py --workdir=runs/tok_semseg
  mmjax tokenizer train --config=configs/tokenizers/shapes_semseg.py:fsq \
      --workdir=runs/tok_semseg_fsq
  mmjax tokenizer train --config=configs/tokenizers/shapes_semseg.py:runlocal --workdir=/tmp/smoke
Arguments: `vq` (default) or `fsq` quantizer; `runlocal` shrinks model, steps and data.
Every key is commented in mmjax/objectives/tokenizer.py (image_tokenizer_config),
mmjax/tokenizers/image.py (ImageTokenizerConfig: the model section) and mmjax/defaults.py.
"""

from mmjax.objectives.tokenizer import image_tokenizer_config


def get_config(arg=None):
  return image_tokenizer_config("semseg", arg)
