"""The semseg tokenizer of the shapes data: ViT VQ autoencoder, 64x64 -> 8x8 tokens.

Run:
  mmjax tokenizer train --config=configs/tokenizers/shapes_semseg.py --workdir=runs/tok_semseg
  mmjax tokenizer train --config=configs/tokenizers/shapes_semseg.py:fsq \
      --workdir=runs/tok_semseg_fsq
  mmjax tokenizer train --config=configs/tokenizers/shapes_semseg.py:runlocal --workdir=/tmp/smoke
Arguments: `vq` (default) or `fsq` quantizer; `runlocal` shrinks model, steps and data.
Measured (2026-12-03, `mmjax tokenizer train --config=configs/tokenizers/shapes_semseg.py`,
the default 4000 steps of batch 16, one after another on the 2-core machine):
  pixel acc 0.983, mIoU 0.863, 100% of the 256 codes used, perplexity 60 (target mIoU
  >= 0.95: not met)
on 1000 validation scenes. A step takes 0.11-0.12 s on an idle machine (4000 steps ~8 min);
this run took 12 min of wall time because test jobs shared the cores.
Every key is commented in mmjax/objectives/tokenizer.py (image_tokenizer_config),
mmjax/tokenizers/image.py (ImageTokenizerConfig: the model section) and mmjax/defaults.py.
"""

from mmjax.objectives.tokenizer import image_tokenizer_config


def get_config(arg=None):
  return image_tokenizer_config("semseg", arg)
