"""A mixed-modal decoder on your own images and captions: captions and image codes, one stream.

Reads the token set of configs/tokens/photo.py (rgb, tok_rgb, caption; it uses tok_rgb and
caption). Walk-through in data/README.md.
Run:
  mmjax train --config configs/decoder/photo.py --workdir runs/photo/decoder --config.data.data_dir=runs/photo
  mmjax generate --config configs/decoder/photo.py --workdir runs/photo/decoder \
      --config.data.data_dir=runs/photo --input caption="a dog on a beach" --target tok_rgb
Variants: `tiny` (D=256, 4 layers) and the sizes of configs/decoder/shapes.py; `runlocal` shrinks
steps, batch and length; `tokenizers=runlocal` pairs with `:runlocal` tokenizers.
"""

import importlib.util
import os

import ml_collections

from mmjax import config as mmconfig
from mmjax import defaults

_CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(relative, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(_CONFIGS, relative))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, variant="tiny", sparsity="dense", runlocal=False, tokenizers="")
  shapes = _load("decoder/shapes.py", "_decoder_shapes_config").get_config(
      f"{arg.variant},sparsity={arg.sparsity}")
  mods = _load("fourm/photo.py", "_fourm_photo_config").photo_modalities(arg.tokenizers)
  config = shapes  # model, sequences, generation and training as the shapes decoder
  config.data = defaults.image_text_data()
  config.data.name = "photo"  # the token set's name (configs/tokens/photo.py)
  config.modalities = ml_collections.ConfigDict(sort_keys=False, initial_dictionary=dict(
      caption=mods.caption.to_dict(), tok_rgb=mods.tok_rgb.to_dict()))
  if arg.runlocal:
    config.model.max_length = 64
    config.train.update(steps=20, batch_size=4, warmup_steps=2, log_every=5, checkpoint_every=10)
  return config
