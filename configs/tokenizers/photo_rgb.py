"""The rgb tokenizer of your own images: ViT VQ autoencoder, 128x128 -> 8x8 tokens (16-px patches).

Trains on the source `mmjax prepare tokens` reads (configs/tokens/photo.py): a folder of images
with same-stem .txt captions, or a tfds dataset such as coco_captions. Images are resized on their
shorter side and centre-cropped to 128 px on the host; the last data.num_val images (or the
validation split) are held out and the PSNR / codebook use on them land in tokenizer_eval.json,
originals above reconstructions in reconstructions.png.
Run:
  mmjax tokenizer train --config configs/tokenizers/photo_rgb.py --workdir runs/photo/tokenizers/photo_rgb \
      --config.data.folder=/path/to/photos
  mmjax tokenizer train --config configs/tokenizers/photo_rgb.py --workdir runs/coco/tokenizers/photo_rgb \
      --config.data.name=coco_captions --config.data.data_dir=~/tensorflow_datasets
Arguments: `vq` (default) or `fsq`; `runlocal`: 32-px images, 4x4 tokens, a narrow model, 20
steps (smoke tests; the photo configs of tokens/fourm/decoder take it as `tokenizers=runlocal`).
"""

from mmjax import config as mmconfig
from mmjax import defaults
from mmjax.objectives.tokenizer import image_tokenizer_config

# image side, patch (one token per patch), codes: the modality's grid and vocabulary follow.
SIZES = {False: dict(image_size=128, patch_size=16, codebook_size=1024),
         True: dict(image_size=32, patch_size=8, codebook_size=64)}


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, quantizer="vq", runlocal=False)
  config = image_tokenizer_config("rgb", f"{arg.quantizer}{',runlocal' if arg.runlocal else ''}")
  size = SIZES[arg.runlocal]
  config.data = defaults.image_text_data(image_size=size["image_size"])
  config.model.update(image_size=size["image_size"], patch_size=size["patch_size"])
  if arg.quantizer == "vq":
    config.model.codebook_size = size["codebook_size"]
  config.train.update(steps=8000, checkpoint_every=1000)  # photos need more steps than shapes
  if arg.runlocal:
    config.data.num_val = 4
    config.model.update(width=32, num_heads=2)
    config.train.update(steps=20, batch_size=8, warmup_steps=2, log_every=5, checkpoint_every=10)
    config.eval.update(batch_size=8, grid_images=4)
  return config
