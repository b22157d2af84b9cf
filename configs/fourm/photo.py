"""4M on your own images and captions: rgb pixels, rgb tokens and captions, each to the others.

The source (a folder of images with same-stem .txt captions, or a tfds dataset such as
coco_captions) has no depth, semantic segmentation or boxes, so those modalities are not declared
at all: the token set (configs/tokens/photo.py) holds rgb, tok_rgb and caption. Images without a
caption file are allowed when data.missing names caption (`--config.data.missing=caption`, here
and in configs/tokens/photo.py).
Run (walk-through in data/README.md; `tokenizers=runlocal` pairs with `:runlocal` tokenizers):
  W=runs/photo; K=$W/tokenizers; P=/path/to/photos
  mmjax tokenizer train --config configs/tokenizers/photo_text.py --workdir $K/photo_text --config.data.folder=$P
  mmjax tokenizer train --config configs/tokenizers/photo_rgb.py --workdir $K/photo_rgb --config.data.folder=$P
  mmjax prepare tokens --config configs/tokens/photo.py --workdir $W --config.data.folder=$P
  mmjax verify $W
  mmjax train --config configs/fourm/photo.py --workdir $W/fourm --config.data.data_dir=$W
Variants: `tiny` (D=192, 4+4 layers) and `small` (D=384, 6+6); `runlocal` shrinks steps and
batch; `tokenizers=runlocal`: the modalities of the `:runlocal` tokenizers (32-px images, 4x4
tokens, 512 text ids).
"""

import importlib.util
import os

import ml_collections

from mmjax import config as mmconfig
from mmjax import defaults
from mmjax.generate import fourm_settings

SIZES = {
    "tiny": dict(d_model=192, num_heads=3, encoder_layers=4, decoder_layers=4),
    "small": dict(d_model=384, num_heads=6, encoder_layers=6, decoder_layers=6),
}
_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokenizer_config(name, arg):
  spec = importlib.util.spec_from_file_location(f"_photo_{name}",
                                                os.path.join(_CONFIGS, "tokenizers", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def photo_modalities(tokenizers=""):
  """rgb pixels, tok_rgb and caption as the photo tokenizers (trained with config argument
  `tokenizers`) make them: image size, token grid and vocabularies follow from their configs."""
  suffix = f":{tokenizers}" if tokenizers else ""
  rgb = _tokenizer_config("photo_rgb", tokenizers or None).model
  text = _tokenizer_config("photo_text", tokenizers or None).tokenizer
  side = rgb.image_size // rgb.patch_size
  return ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      rgb=dict(kind="image_pixels", source="rgb", image_size=rgb.image_size,
               patch_size=rgb.image_size // 8),
      tok_rgb=dict(kind="image_tokens", source="rgb", vocab_size=rgb.codebook_size,
                   grid=(side, side), tokenizer=f"configs/tokenizers/photo_rgb.py{suffix}"),
      caption=dict(kind="sequence", source="caption", vocab_size=text.vocab_size, max_length=64,
                   tokenizer=f"configs/tokenizers/photo_text.py{suffix}"),
  ))


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, variant="tiny", runlocal=False, tokenizers="")
  if arg.variant not in SIZES:
    raise ValueError(f"variant must be one of {sorted(SIZES)}, got {arg.variant!r}")
  config = ml_collections.ConfigDict()
  config.objective = "fourm"
  config.seed = 0
  config.data = defaults.image_text_data()  # training reads data.data_dir / data.name: the token set
  config.data.name = "photo"                # the token set's name (configs/tokens/photo.py)
  config.modalities = photo_modalities(arg.tokenizers)
  config.data.image_size = config.modalities.rgb.image_size  # raw images are resized to this
  config.masking = ml_collections.ConfigDict(dict(
      mixture="4m7",            # half rgb->all, half all->all
      input_alpha=0.5,          # all->all Dirichlet concentration
      keep_scheme="random",     # span-masking keep probability
      rgb_modality="",          # "": the image_pixels modality plays rgb
      mixture_weights=(),       # () = the mixture's own component weights
      num_sentinels=64,         # = the text tokenizer's sentinel count (photo_text.py)
  ))
  config.model = ml_collections.ConfigDict(dict(SIZES[arg.variant]))
  config.model.num_input_tokens = 128
  config.model.num_target_tokens = 128
  config.model.dtype = "auto"  # bfloat16 on TPU/GPU, float32 on CPU
  config.model.tie_heads = True  # each output head is its decoder token table, as the reference
                                 # trains (and as 4m.py); False: separate [D, V] heads
  config.model.update(defaults.model_target())
  config.train = defaults.train(steps=20000, batch_size=64, lr=5e-4, warmup_steps=1000)
  config.mesh = defaults.mesh()
  config.generate = fourm_settings.section(steps=8)
  if arg.runlocal:
    config.train.update(steps=20, batch_size=8, warmup_steps=2, log_every=5, checkpoint_every=10)
    config.model.update(num_input_tokens=32, num_target_tokens=32)
  return config
