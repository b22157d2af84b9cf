"""Pre-tokenize your own images and captions for configs/fourm/photo.py and configs/decoder/photo.py.

A folder of images with same-stem .txt captions (train/ and validation/ sub-folders make splits),
or a tfds dataset such as coco_captions; the tokenizers are those of configs/tokenizers/photo_*.py
trained on the same source into <workdir>/tokenizers/<config stem>. The source has no depth,
semseg or boxes: the modalities are rgb (pixels), tok_rgb and caption only. An image without a
caption is a bad sample unless `--config.data.missing=caption`.
Run:
  mmjax prepare tokens --config configs/tokens/photo.py --workdir runs/photo --config.data.folder=/path/to/photos
  mmjax prepare tokens --config configs/tokens/photo.py --workdir runs/coco \
      --config.data.name=coco_captions --config.data.data_dir=~/tensorflow_datasets --config.tokens.name=photo
  mmjax verify runs/photo      # every shard's size and sha256 against the metadata
Writes <workdir>/mmjax_tokens/photo/1.0.0/. `tokenizers=runlocal` pairs with `:runlocal` tokenizers;
`runlocal` writes small shards.
"""

import importlib.util
import os

import ml_collections

from mmjax import config as mmconfig


def _fourm_config(arg):
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fourm",
                      "photo.py")
  spec = importlib.util.spec_from_file_location("_fourm_photo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, runlocal=False, tokenizers="")
  base = _fourm_config(",".join(["tiny"] + [f"tokenizers={arg.tokenizers}"] * bool(arg.tokenizers)))
  config = ml_collections.ConfigDict()
  config.data = base.data
  config.data.name = "folder"  # the raw source: "folder" (data.folder) or a tfds name
  config.modalities = base.modalities  # must equal the training configs', in the same order
  config.tokens = ml_collections.ConfigDict(dict(
      name="photo",           # dataset name under <out_dir>/mmjax_tokens/ (the training data.name)
      out_dir="",             # tfds data_dir written into; "" = the workdir
      tokenizers_dir="",      # <dir>/<tokenizer config stem>/ per tokenizer; "" = <workdir>/tokenizers
      splits=("train", "validation"),  # splits to prepare (those the source lacks are skipped)
      shard_size=1024,        # raw samples per shard: the unit of resumption
      batch_size=64,          # images per jitted image-tokenizer call
      bad_samples="error",    # a bad sample: "error" names it and stops; "skip" drops and counts it
      max_reported=20,        # bad-sample messages kept in the summary and metadata
  ))
  if arg.runlocal:
    config.tokens.update(shard_size=8, batch_size=8)
  return config
