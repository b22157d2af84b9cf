"""A local folder of images with caption files -> samples of the raw schema (works offline).

  photos/                         or   photos/train/..., photos/validation/... (one split per
    cat.jpg   cat.txt                  sub-folder named train / validation / test)
    dog.png   dog.txt
    sub/bird.jpeg sub/bird.txt    (sub-folders other than split names are searched too)

  source = FolderSource("photos", image_size=64)
  source[i] == {"id": "cat.jpg", "index": i, "rgb": uint8 [64, 64, 3], "caption": b"a cat"}

Images (.png, .jpg, .jpeg, any case) are converted, never rejected for their shape: every mode
becomes RGB (grayscale is replicated, palette images expanded, alpha composited over white, 16-bit
scaled to 8), then the shorter side is resized to `image_size` (bicubic, antialiased) and the centre
cropped to a square. The caption is the bytes of the `.txt` file beside the image (same stem), with
surrounding whitespace stripped; it stays bytes, as tfds text fields are, so decoding (UTF-8) and
emptiness are checked where it is tokenized (`mmjax.pretokenize`), which names the file. A
missing caption file leaves `caption` out of the sample; an unreadable image raises a UserError
naming the file. The folder has no depth, semseg or boxes: those modalities are absent.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmjax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "validation", "test")


def folder_splits(root: str | os.PathLike) -> dict[str, str]:
  """{split: directory}: the train / validation / test sub-folders if any, else {"train": root}."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise UserError(f"image folder {root!r} does not exist or is not a directory")
  found = {s: os.path.join(root, s) for s in SPLITS if os.path.isdir(os.path.join(root, s))}
  return found or {"train": root}


def list_images(directory: str) -> list[str]:
  """Image paths under `directory` (recursively), relative to it, sorted: a stable sample order."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(directory):
    dirnames.sort()
    for name in filenames:
      if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
        paths.append(os.path.relpath(os.path.join(dirpath, name), directory))
  return sorted(paths)


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB; transparency is composited over white."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
    a = np.asarray(image, np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(a.max()), 1.0)
    image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
  """Shorter side -> `size` (bicubic), then the central size x size square."""
  w, h = image.size
  scale = size / min(w, h)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return image.crop((left, top, left + size, top + size))


def load_image(path: str, size: int) -> np.ndarray:
  """uint8 [size, size, 3] of an image file; UserError naming the file if it cannot be read."""
  try:
    with Image.open(path) as image:
      image.load()
      rgb = resize_center_crop(to_rgb(image), size)
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise UserError(f"image {path}: cannot be read as an image ({e})") from None
  return np.asarray(rgb, np.uint8)


class FolderSource:
  """Random-access samples of one directory of images and captions (Grain's source protocol)."""

  fields = ("rgb", "caption")  # what samples can hold: the pre-tokenizer reads this

  def __init__(self, directory: str | os.PathLike, image_size: int, *, split: str = "train"):
    self.directory = os.fspath(directory)
    if not os.path.isdir(self.directory):
      raise UserError(f"image folder {self.directory!r} does not exist or is not a directory")
    if int(image_size) < 1:
      raise UserError(f"image folder: image_size must be positive, got {image_size}")
    self.image_size = int(image_size)
    self.split = split
    self.paths = list_images(self.directory)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self.paths):
      raise IndexError(f"sample {index} out of range for {len(self.paths)} images")
    rel = self.paths[index]
    path = os.path.join(self.directory, rel)
    sample: dict[str, Any] = {"id": rel, "index": index,
                              "rgb": load_image(path, self.image_size)}
    caption = self.caption(index)
    if caption is not None:
      sample["caption"] = caption
    return sample

  def caption(self, index: int) -> bytes | None:
    """The caption of sample `index` without reading its image (None: no caption file)."""
    path = os.path.join(self.directory, os.path.splitext(self.paths[index])[0] + ".txt")
    if not os.path.isfile(path):
      return None
    with open(path, "rb") as f:
      return f.read().strip()

  def __repr__(self) -> str:
    return (f"FolderSource({self.directory!r}, image_size={self.image_size}, "
            f"{len(self.paths)} images)")


def folder_sources(root: str | os.PathLike, image_size: int) -> dict[str, FolderSource]:
  """{split: FolderSource} of a folder (see `folder_splits`)."""
  return {split: FolderSource(path, image_size, split=split)
          for split, path in folder_splits(root).items()}
