"""Raw image-text sources, one definition for every stage that reads raw data: tokenizer training
(`mmjax tokenizer train`) and pre-tokenization (`mmjax prepare tokens`).

  sources, described = open_sources(config.data, workdir, ("train", "validation"))

  data.name = "shapes"   the shapes scenes (tfds at data.data_dir, "" = <workdir>/data)
  data.name = "folder"   data.folder: images with same-stem .txt captions (`mmjax.data.folder`)
  data.name = any other  a tfds dataset at data.data_dir (e.g. "coco_captions"): samples of the raw
                         schema as they are, or images + captions (`ImageTextSource`: the image
                         resized on its shorter side and centre-cropped to data.image_size, the
                         first caption)

Every source is random access (`len`, `[i]`) and says which raw fields its samples hold
(`source_fields`). `with_holdout` makes a validation split of the last samples of train for a
source that has none (a folder without sub-folders), so tokenizers report quality on held-out data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mmjax import paths
from mmjax.config import ConfigError
from mmjax.data import folder
from mmjax.errors import UserError

VALIDATION = "validation"
_IMAGE_KEYS = ("image",)
_CAPTION_KEYS = ("caption", "captions", "text")


def source_fields(source: Any) -> tuple[str, ...]:
  """The raw fields a source's samples hold: declared, from tfds features, or from sample 0."""
  fields = getattr(source, "fields", None)
  if fields is None:
    info = getattr(source, "dataset_info", None)
    fields = list(info.features.keys()) if info is not None else list(source[0]) if len(source) else []
  return tuple(fields)


class ImageTextSource:
  """Raw samples (id, rgb, caption) of a tfds dataset of images and captions (coco_captions or one
  alike): `image` resized and centre-cropped to `image_size`; the caption is `caption`, `text`, or
  the `caption_index`-th of `captions` (coco's {"text": [...]})."""

  def __init__(self, records: Any, image_size: int, *, caption_index: int = 0,
               keys: Sequence[str] | None = None):
    self.records, self.image_size, self.caption_index = records, int(image_size), caption_index
    keys = tuple(keys) if keys is not None else source_fields(records)
    self.image_key = next((k for k in _IMAGE_KEYS if k in keys), None)
    if self.image_key is None:
      raise UserError(f"the dataset has no image field (it has {', '.join(keys)}); expected one "
                      f"of {_IMAGE_KEYS} or the raw schema's rgb")
    self.caption_key = next((k for k in _CAPTION_KEYS if k in keys), None)
    self.fields = ("rgb", "caption") if self.caption_key else ("rgb",)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.to_sample(self.records[i], i)

  def to_sample(self, record: Mapping[str, Any], i: int) -> dict[str, Any]:
    from PIL import Image  # noqa: PLC0415 -- late: only image sources need it

    image = np.asarray(record[self.image_key])
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    rgb = folder.resize_center_crop(folder.to_rgb(Image.fromarray(image.astype(np.uint8))),
                                    self.image_size)
    ident = record.get("image/id", record.get("id", i))
    sample: dict[str, Any] = {"id": str(_plain(ident)), "index": i,
                              "rgb": np.asarray(rgb, np.uint8)}
    if self.caption_key:
      caption = record[self.caption_key]
      if isinstance(caption, Mapping):  # coco: captions = {"id": [...], "text": [...]}
        caption = caption["text"]
      if not isinstance(caption, (bytes, str, np.bytes_)):
        texts = list(np.asarray(caption).reshape(-1))
        caption = texts[min(self.caption_index, len(texts) - 1)] if texts else None
      if caption is not None:
        sample["caption"] = caption
    return sample


def _plain(value: Any) -> Any:
  value = np.asarray(value).reshape(-1)[0] if np.ndim(value) else value
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", "replace")
  return value.item() if hasattr(value, "item") else value


class Subset:
  """Samples [lo, hi) of a source, renumbered from 0."""

  def __init__(self, source: Any, lo: int, hi: int):
    self.source, self.lo, self.hi = source, lo, hi
    self.fields = source_fields(source)

  def __len__(self) -> int:
    return self.hi - self.lo

  def __getitem__(self, i: int) -> Any:
    if not 0 <= i < len(self):
      raise IndexError(f"sample {i} out of range for {len(self)} samples")
    return self.source[self.lo + i]


class AtMostObjects:
  """The shapes scenes of a source that hold at most `max_objects` objects, renumbered from 0;
  each keeps its scene `index`, so evaluation regenerates the same scenes."""

  def __init__(self, source: Any, max_objects: int):
    self.source = source
    self.fields = source_fields(source)
    self.keep = [i for i in range(len(source))
                 if int(np.asarray(source[i]["num_objects"])) <= max_objects]

  def __len__(self) -> int:
    return len(self.keep)

  def __getitem__(self, i: int) -> Any:
    return self.source[self.keep[i]]


def with_holdout(sources: Mapping[str, Any], num_heldout: int) -> dict[str, Any]:
  """`sources`, and where they have no validation split, the last `num_heldout` train samples as
  one (taken out of train): reconstruction quality is then measured on unseen images."""
  out = {s: src for s, src in sources.items() if len(src)}  # an empty split is no split
  if VALIDATION in out or "train" not in out:
    return out
  train = out["train"]
  n = min(int(num_heldout), len(train) // 2)
  if n < 1:
    raise UserError(f"the source has {len(train)} training samples and no validation split: too "
                    f"few to hold some out for measuring quality")
  out["train"], out[VALIDATION] = Subset(train, 0, len(train) - n), Subset(train, len(train) - n,
                                                                           len(train))
  return out


@contextlib.contextmanager
def _quiet_absl():
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def open_sources(data: Mapping[str, Any], workdir: str | None,
                 splits: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
  """({split: random-access source} of a config's data section, a description for metadata)."""
  name = data.get("name", "shapes")
  size = int(data.get("image_size", 64))
  if name == "folder":
    root = data.get("folder", "")
    if not root:
      raise ConfigError("data.folder is empty: give the folder of images and captions")
    found = folder.folder_sources(root, size)
    return ({s: found[s] for s in splits if s in found},
            {"kind": "folder", "folder": os.fspath(paths.resolve(root)), "image_size": size})
  # Late: tensorflow_datasets takes seconds to import; a folder needs none of it.
  import tensorflow_datasets as tfds  # noqa: PLC0415

  from mmjax.data.shapes import records as shapes_records  # noqa: PLC0415
  # "" = <workdir>/data; without a workdir (tokenizer training) tfds' default directory.
  data_dir = data.get("data_dir", "") or (os.path.join(workdir, "data") if workdir else None)
  if name == "shapes":
    info = epath.Path(data_dir) / "shapes" / f"s{size}" / "1.0.0" / "dataset_info.json"
    if not info.is_file():
      raise UserError(f"{data_dir} holds no shapes/s{size} dataset; build it with "
                      f"`mmjax prepare shapes --out {data_dir}`")
    have = {s["name"] for s in json.loads(info.read_text()).get("splits", [])}
    loaded = {s: shapes_records.load_shapes(data_dir, s, size) for s in splits if s in have}
    max_objects = int(data.get("max_objects", 0))
    if max_objects:
      loaded = {s: AtMostObjects(src, max_objects) for s, src in loaded.items()}
    return loaded, {"kind": "tfds", "name": f"shapes/s{size}", "max_objects": max_objects,
                    "data_dir": os.fspath(paths.resolve(data_dir)), "seed": int(data.get("seed", 0))}
  with _quiet_absl():  # tfds' warnings about datasets it builds from files
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      have = set(builder.info.splits)
    except Exception as e:  # noqa: BLE001 -- unknown name, unreadable directory: one line
      raise UserError(f"data.name {name!r}: no tfds dataset of that name at {data_dir} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    keys = tuple(builder.info.features.keys())
    sources, failed = {}, ""
    for s in splits:
      if have and s not in have:
        continue
      try:  # a builder's info may list no splits yet read them (tfds.testing.mock_data)
        records = tfds.data_source(name, data_dir=data_dir, split=s, download=False)
      except Exception as e:  # noqa: BLE001 -- not prepared: said below, in one line
        failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        continue
      sources[s] = (records if "rgb" in keys
                    else ImageTextSource(records, size, caption_index=int(
                        data.get("caption_index", 0)), keys=keys))
  if not sources:
    raise UserError(f"tfds dataset {name!r} at {data_dir} has none of the splits "
                    f"{list(splits)} prepared ({failed or 'it lists ' + str(sorted(have))}); "
                    f"prepare it with tfds first (e.g. `tfds build {name} --data_dir {data_dir} "
                    f"--file_format array_record`)")
  return sources, {"kind": "tfds", "name": name, "data_dir": os.fspath(paths.resolve(data_dir)),
                   "image_size": size}
