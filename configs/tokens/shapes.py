"""Pre-tokenize the shapes data (or a local folder of images + captions) for configs/fourm/shapes.py.

Run, after preparing the raw data and training the tokenizers into <workdir>/tokenizers/<name>
(the stem of each modality's tokenizer config):
  mmjax prepare shapes --out runs/tokens/data
  mmjax tokenizer train --config configs/tokenizers/shapes_text.py --workdir runs/tokens/tokenizers/shapes_text
  mmjax tokenizer train --config configs/tokenizers/shapes_rgb.py --workdir runs/tokens/tokenizers/shapes_rgb
  (likewise shapes_depth, shapes_semseg)
  mmjax prepare tokens --config configs/tokens/shapes.py --workdir runs/tokens
A local folder (offline; no depth, semseg or boxes, so those modalities are absent):
  mmjax prepare tokens --config configs/tokens/shapes.py --config.data.name=folder \
      --config.data.folder=/path/to/photos --config.tokens.tokenizers_dir=runs/tokens/tokenizers \
      --workdir runs/photo_tokens
Writes <workdir>/mmjax_tokens/<data.name>/1.0.0/ (ArrayRecord shards + tfds metadata), readable with
tfds.data_source("mmjax_tokens/shapes", data_dir=<workdir>). Re-running skips finished shards.
`runlocal` prepares small shards quickly (smoke tests).
"""

import importlib.util
import os

import ml_collections

from mmjax import config as mmconfig


def _model_config(arg):
  """configs/fourm/shapes.py: its data and modalities sections are the ones to tokenize."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fourm",
                      "shapes.py")
  spec = importlib.util.spec_from_file_location("_fourm_shapes_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, runlocal=False, tokenizers="")
  base = _model_config(",".join(["tiny"] + ["runlocal"] * arg.runlocal
                                + [f"tokenizers={arg.tokenizers}"] * bool(arg.tokenizers)))
  config = ml_collections.ConfigDict()
  config.data = base.data  # name "shapes" (tfds at data_dir, "" = <workdir>/data) or "folder"
  config.data.folder = ""  # data.name = "folder": the folder of images + same-stem .txt captions
  config.modalities = base.modalities  # must equal the training config's, in the same order
  config.tokens = ml_collections.ConfigDict(dict(
      name="",                # dataset name under <out_dir>/mmjax_tokens/; "" = data.name
      out_dir="",             # tfds data_dir written into; "" = the workdir
      tokenizers_dir="",      # <dir>/<tokenizer config stem>/ per tokenizer; "" = <workdir>/tokenizers
      splits=("train", "validation"),  # splits to prepare (those the source lacks are skipped)
      shard_size=1024,        # raw samples per shard: the unit of resumption
      batch_size=64,          # images per jitted image-tokenizer call
      bad_samples="error",    # a bad sample: "error" names it and stops; "skip" drops and counts it
      max_reported=20,        # bad-sample messages kept in the summary and metadata
  ))
  if arg.runlocal:
    config.tokens.update(shard_size=64, batch_size=16)
  return config
