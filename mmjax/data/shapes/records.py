"""The shapes world as ArrayRecord, written through a tensorflow-datasets builder (no TensorFlow).

Build, then read with random access:

  summary = prepare_shapes("/data/shapes", num_train=10_000, num_val=1_000)  # mmjax prepare shapes
  source = load_shapes("/data/shapes", "train")  # tfds.data_source("shapes/s64", data_dir=...)
  source[i]                                      # == shapes.generate_scene(i, split="train")

Files land in <out_dir>/shapes/s<image size>/1.0.0/. Records keep generation order (shuffling is
disabled), so record i of a split is scene i; the `index` field says so too. Records hold the fields
of `shapes.generate_scene`; `caption` comes back as UTF-8 bytes and `index`, `num_objects` as
Python ints, as tfds decodes them. Reading needs neither this module nor TensorFlow: tfds falls back
to the files' own feature specs when no `shapes` builder is registered.
"""

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data.shapes import world as shapes
from mmjax.progress import bar as progress_bar

DEFAULT_NUM_TRAIN = 10_000
DEFAULT_NUM_VAL = 1_000
_METADATA_KEYS = ("image_size", "seed", "num_train", "num_val")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """A config per image size: its name is `s<image size>`."""
  image_size: int = 64


def _new_config(image_size):
  return ShapesConfig(name=f"s{image_size}", image_size=image_size,
                      description=f"{image_size}x{image_size} scenes")


def builder_config(image_size):
  """The config of an image size: a registered one if it exists (tfds refuses a new config under a
  registered name), else a new one."""
  image_size = shapes.require_image_size(image_size)
  return Shapes.builder_configs.get(f"s{image_size}") or _new_config(image_size)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic scenes of 1-4 coloured shapes: rgb, depth, semseg, caption, boxes, ground truth.

  Registered as `shapes`. Any image size in [16, 1024] builds (`builder_config(size)`); the sizes of
  BUILDER_CONFIGS are also loadable by name from code. num_train, num_val and seed are constructor
  arguments, stored in `info.metadata`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release: 1-4 objects (5 shapes, 8 colours, 2 sizes) with occlusion; rgb, "
               "depth, semseg, instance, caption, det and padded ground truth.",
  }
  BUILDER_CONFIGS = [_new_config(size) for size in (32, 64, 128)]
  DEFAULT_BUILDER_CONFIG_NAME = "s64"

  def __init__(self, *, num_train=DEFAULT_NUM_TRAIN, num_val=DEFAULT_NUM_VAL, seed=0,
               progress=False, **kwargs):
    # Set before the base constructor, which builds `info` from them.
    self.num_train = shapes.require_int("num_train", num_train, 0)
    self.num_val = shapes.require_int("num_val", num_val, 0)
    self.seed = shapes.require_int("seed", seed, 0)
    self.progress = progress
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self):
    s = self.builder_config.image_size
    # Raw bytes, not numpy's int64 upcast (the default encoding). zlib shrinks the maps ~25x for
    # ~50-130 us each; the noisy rgb shrinks only 4x for ~800 us, so it stays raw.
    image = lambda dtype, doc, *channels, encoding="zlib": tfds.features.Tensor(
        shape=(s, s, *channels), dtype=dtype, encoding=encoding, doc=doc)
    objects = lambda dtype, doc, *tail: tfds.features.Tensor(
        shape=(shapes.MAX_OBJECTS, *tail), dtype=dtype, doc=doc)
    features = tfds.features.FeaturesDict({
        "index": tfds.features.Scalar(np.int64, doc="scene index within its split"),
        "rgb": image(np.uint8, "image", 3, encoding="bytes"),
        "depth": image(np.float32, "depth of the visible surface"),
        "semseg": image(np.uint8, "0 = background, 1 + shape id; names in SEMSEG_CLASSES"),
        "instance": image(np.uint8, "0 = background, 1 + object slot"),
        "caption": tfds.features.Text(doc="objects nearest first, e.g. 'a small red circle in the "
                                          "top left and a large blue square on the right'"),
        "det_boxes": tfds.features.Tensor(
            shape=(None, 4), dtype=np.float32,
            doc="visible-pixel box of each object, (xmin, ymin, xmax, ymax) in [0, 1]"),
        "det_classes": tfds.features.Tensor(shape=(None,), dtype=np.int32, doc="shape id per box"),
        "num_objects": tfds.features.Scalar(np.int32, doc="objects in the scene, 1..4"),
        "obj_shape": objects(np.int32, "shape id per slot, -1 if empty"),
        "obj_color": objects(np.int32, "colour id per slot, -1 if empty"),
        "obj_size": objects(np.int32, "size id per slot, -1 if empty"),
        "obj_position": objects(np.int32, "3x3 grid cell id per slot, -1 if empty"),
        "obj_center": objects(np.float32, "centre (x, y) in [0, 1] per slot", 2),
        "obj_depth": objects(np.float32, "depth per slot, 0 if empty"),
    })
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Synthetic multimodal scenes of 1-4 shapes (" + ", ".join(shapes.SHAPES) + ") in "
            + str(len(shapes.COLORS)) + " colours and 2 sizes, at distinct depths with occlusion. "
            "Every modality derives from the exact ground truth; objects occupy slots nearest "
            "first, in the same order as the caption's phrases and the boxes."),
        features=features,
        disable_shuffling=True,  # record i is scene i: records can be checked against the generator
        metadata=tfds.core.MetadataDict(image_size=s, seed=self.seed, num_train=self.num_train,
                                        num_val=self.num_val),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    counts = {"train": self.num_train, "validation": self.num_val}
    # tfds cannot write an empty split, so a split of 0 scenes is left out.
    return {split: self._generate_examples(split, n) for split, n in counts.items() if n}

  def _generate_examples(self, split, num_scenes):
    with progress_bar(num_scenes, f"shapes/{self.builder_config.name} {split}", unit="scenes",
                      enabled=self.progress) as shown:
      for i in range(num_scenes):
        yield i, shapes.generate_scene(i, seed=self.seed, split=split,
                                       image_size=self.builder_config.image_size)
        shown.update(1)


@contextlib.contextmanager
def _quiet_tfds(progress):
  """tfds prints to stdout (kept free for the caller's output) and warns about custom configs."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    with open(os.devnull, "w") as devnull:
      with contextlib.redirect_stdout(sys.stderr if progress else devnull):
        yield
  finally:
    absl_logger.setLevel(level)


def _stored_parameters(builder):
  # Index by key: tfds loads the stored metadata lazily on item access, not on `.get`.
  try:
    return {key: builder.info.metadata[key] for key in _METADATA_KEYS}
  except KeyError:
    return "unknown parameters"


def prepare_shapes(out_dir: str | os.PathLike, num_train: int, num_val: int, seed: int = 0,
                   image_size: int = 64, progress: bool = True) -> dict:
  """Build the shapes dataset under `out_dir` (reused if already built with the same parameters).

  Returns a summary: {"path", "splits": {split: count}, "seconds", "scenes_per_s", "reused",
  "example_caption", "image_size", "seed"}.
  """
  num_train = shapes.require_int("num_train", num_train, 0)
  num_val = shapes.require_int("num_val", num_val, 0)
  if num_train + num_val == 0:
    raise shapes.ShapesParameterError("num_train + num_val must be >= 1, got 0 scenes")
  seed = shapes.require_int("seed", seed, 0)
  config = builder_config(image_size)
  wanted = {"image_size": config.image_size, "seed": seed, "num_train": num_train,
            "num_val": num_val}

  start = time.perf_counter()
  with _quiet_tfds(progress):
    builder = Shapes(config=config, data_dir=out_dir, num_train=num_train, num_val=num_val,
                     seed=seed, progress=progress)
    reused = (builder.data_path / "dataset_info.json").exists()
    if reused:
      stored = _stored_parameters(builder)
      if stored != wanted:
        raise shapes.ShapesParameterError(
            f"out_dir {builder.data_path} already holds shapes built with {stored}, not {wanted}; "
            "remove that directory or choose another out_dir")
    else:
      # Our own bar replaces tfds's. tfds has no public getter for the setting; mmjax never
      # turns it off elsewhere, so it goes back to tfds's default (on).
      tfds.display_progress_bar(False)
      try:
        # Nothing is downloaded: a temporary download dir keeps out_dir clean.
        with tempfile.TemporaryDirectory() as download_dir:
          builder.download_and_prepare(
              download_dir=download_dir, file_format="array_record",
              download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      finally:
        tfds.display_progress_bar(True)
  seconds = time.perf_counter() - start

  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  first_split = "train" if num_train else "validation"
  return {
      "path": str(builder.data_path),
      "splits": splits,
      "seconds": seconds,
      "scenes_per_s": 0.0 if reused else sum(splits.values()) / seconds,
      "reused": reused,
      "example_caption": shapes.generate_scene(0, seed=seed, split=first_split,
                                               image_size=config.image_size)["caption"],
      "image_size": config.image_size,
      "seed": seed,
  }


def load_shapes(data_dir: str | os.PathLike, split: str, image_size: int = 64):
  """Random-access source of a built split (`len`, `source[i]` -> dict of numpy arrays)."""
  image_size = shapes.require_image_size(image_size)
  name = f"shapes/s{image_size}"
  with _quiet_tfds(progress=False):
    builder = Shapes(config=builder_config(image_size), data_dir=data_dir)
    if not (builder.data_path / "dataset_info.json").exists():
      raise shapes.ShapesParameterError(
          f"data_dir {data_dir} holds no {name} dataset; build it with "
          f"`mmjax prepare shapes --out {data_dir} --image-size {image_size}`")
    return tfds.data_source(name, data_dir=data_dir, split=split, download=False)
