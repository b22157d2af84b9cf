"""Recipe: an image-caption dataset -> mmjax token shards (tfds `coco_captions` online, or a local
folder offline), in the raw schema of the shapes data so the same pipeline trains on it.

Online (downloads COCO 2017 through tensorflow-datasets, ~20 GB; building the tfds dataset may
need `pip install tensorflow` for tfds's image encoding):
  python data/coco_captions.py tfds --data-dir ~/tensorflow_datasets --workdir runs/coco_tokens \
      --tokenizers-dir runs/coco_tokenizers
  # then: tfds.data_source("mmjax_tokens/coco_captions", data_dir="runs/coco_tokens")

Offline, from a folder of images with same-stem .txt captions (sub-folders train/ validation/
make splits; otherwise everything is train). Also how to reuse COCO once exported:
  python data/coco_captions.py export --data-dir ~/tensorflow_datasets --split validation \
      --out photos/validation          # COCO -> photos/validation/<id>.jpg + <id>.txt
  python data/coco_captions.py folder --folder photos --workdir runs/photo_tokens \
      --tokenizers-dir runs/coco_tokenizers
  # the same as: mmjax prepare tokens --config configs/tokens/shapes.py --config.data.name=folder
  #   --config.data.folder=photos --config.tokens.tokenizers_dir=runs/coco_tokenizers --workdir ...

Samples: rgb (the image, resized on its shorter side and centre-cropped to data.image_size), the
first caption of each image (`--caption-index`), id = the COCO image id. COCO has no depth, semseg
or shapes boxes, so tok_depth, tok_semseg and det are absent (recorded in the metadata; the
training config lists them in data.missing). The modalities and tokenizers are those of `--config`
(default configs/tokens/shapes.py). For real photos use the photo recipe instead, whose tokenizers
train on the same source (`mmjax tokenizer train --config configs/tokenizers/photo_rgb.py`, with
data.name=coco_captions or folder; walk-through in data/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mmjax import config as mmconfig
from mmjax import pretokenize
from mmjax.data import sources
from mmjax.errors import UserError

TFDS_NAME = "coco_captions/2017"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "tokens", "shapes.py")


# A coco_captions record -> the raw schema (rgb resized and centre-cropped, caption, id).
CocoSource = sources.ImageTextSource


def coco_sources(data_dir: str, splits, image_size: int, caption_index: int = 0) -> dict:
  """Downloads and prepares coco_captions if needed (online), then {split: CocoSource}."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record")
  return {s: CocoSource(builder.as_data_source(split=s), image_size, caption_index=caption_index,
                        keys=tuple(builder.info.features.keys()))
          for s in splits if s in builder.info.splits}


def export_folder(source, out: str, limit: int | None = None) -> int:
  """Writes samples as <out>/<id>.png + <id>.txt: a local folder that `folder` mode reads."""
  os.makedirs(out, exist_ok=True)
  from PIL import Image
  n = len(source) if limit is None else min(limit, len(source))
  for i in range(n):
    sample = source[i]
    Image.fromarray(sample["rgb"]).save(os.path.join(out, f"{sample['id']}.png"))
    caption = sample.get("caption", b"")
    with open(os.path.join(out, f"{sample['id']}.txt"), "wb") as f:
      f.write(caption if isinstance(caption, bytes) else str(caption).encode("utf-8"))
  return n


def load_config(spec: str, tokenizers_dir: str, **data):
  config = mmconfig.load(spec)
  config.unlock()
  config.data.update(data)
  if tokenizers_dir:
    config.tokens.tokenizers_dir = tokenizers_dir
  return config


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("mode", choices=("tfds", "folder", "export"))
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="modalities + tokens config")
  parser.add_argument("--workdir", help="where the token shards go (tfds / folder)")
  parser.add_argument("--tokenizers-dir", default="", help="<dir>/<tokenizer config stem>/ each")
  parser.add_argument("--data-dir", default="", help="tensorflow-datasets data_dir (tfds/export)")
  parser.add_argument("--folder", default="", help="folder of images + captions (folder mode)")
  parser.add_argument("--split", default="validation", help="export: the split to export")
  parser.add_argument("--out", default="", help="export: the folder to write")
  parser.add_argument("--limit", type=int, default=None, help="export: at most this many images")
  parser.add_argument("--caption-index", type=int, default=0, help="which of an image's captions")
  parser.add_argument("--bad-samples", choices=pretokenize.BAD_SAMPLE_MODES, default="skip")
  args = parser.parse_args(argv)
  try:
    if args.mode == "folder":
      if not args.folder or not args.workdir:
        raise UserError("folder mode needs --folder and --workdir")
      config = load_config(args.config, args.tokenizers_dir, name="folder", folder=args.folder)
      config.tokens.bad_samples = args.bad_samples
      return pretokenize.run_prepare_tokens(config, args.workdir)
    config = load_config(args.config, args.tokenizers_dir, name="coco_captions")
    size = int(config.data.image_size)
    if args.mode == "export":
      if not args.out:
        raise UserError("export mode needs --out")
      source = coco_sources(args.data_dir or None, [args.split], size, args.caption_index)
      if args.split not in source:
        raise UserError(f"coco_captions has no split {args.split!r}")
      return {"exported": export_folder(source[args.split], args.out, args.limit), "out": args.out}
    if not args.workdir:
      raise UserError("tfds mode needs --workdir")
    config.tokens.bad_samples = args.bad_samples
    sources = coco_sources(args.data_dir or None, config.tokens.splits, size, args.caption_index)
    return pretokenize.run_prepare_tokens(config, args.workdir, sources=sources)
  except UserError as e:
    print(f"coco_captions: {e}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
  print(json.dumps(main(), indent=1, default=str))
