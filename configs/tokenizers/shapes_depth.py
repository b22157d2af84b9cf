"""The depth tokenizer of the shapes data: ViT VQ autoencoder, 64x64 -> 8x8 tokens.

Run:
  mmjax tokenizer train --config=configs/tokenizers/shapes_depth.py --workdir=runs/tok_depth
  mmjax tokenizer train --config=configs/tokenizers/shapes_depth.py:fsq --workdir=runs/tok_depth_fsq
  mmjax tokenizer train --config=configs/tokenizers/shapes_depth.py:runlocal --workdir=/tmp/smoke
Arguments: `vq` (default) or `fsq` quantizer; `runlocal` shrinks model, steps and data.
Measured (2026-12-03, `mmjax tokenizer train --config=configs/tokenizers/shapes_depth.py`,
the default 4000 steps of batch 16, one after another on the 2-core machine):
  abs-rel 0.024, 99.9% of the 1024 codes used, perplexity 554 (target <= 0.05: met)
on 1000 validation scenes. A step takes 0.11-0.12 s on an idle machine (4000 steps ~8 min);
this run took 21 min of wall time because test jobs shared the cores.
Every key is commented in mmjax/objectives/tokenizer.py (image_tokenizer_config),
mmjax/tokenizers/image.py (ImageTokenizerConfig: the model section) and mmjax/defaults.py.
"""

from mmjax.objectives.tokenizer import image_tokenizer_config


def get_config(arg=None):
  return image_tokenizer_config("depth", arg)
