"""Paths of workdirs, data dirs and tokenizer dirs: local folders or URLs (gs://bucket/run).

Everything that reads or writes them goes through `etils.epath`, which Orbax, TFDS and Grain use
too, so a `gs://` workdir works wherever a local one does (with gcsfs installed: pip install
'mmjax[gcs]'). Never `os.path.abspath` a URL: it becomes the local folder `<cwd>/gs:/bucket/run`.
"""

from __future__ import annotations

import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a URL as given, a local path made absolute (Orbax requires that)."""
  p = epath.Path(path)
  return p if is_url(p) else p.expanduser().resolve()


def write_png(path: str | os.PathLike, image_HWC) -> str:
  """Writes a uint8 [H, W(, 3)] image as a PNG at `path` (local or URL); returns the path."""
  import numpy as np  # noqa: PLC0415 -- only the writers need these
  from PIL import Image  # noqa: PLC0415

  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  with target.open("wb") as f:
    Image.fromarray(np.asarray(image_HWC, np.uint8)).save(f, format="PNG")
  return os.fspath(path)


def save_figure(figure, path: str | os.PathLike, *, dpi: int = 100) -> str:
  """Saves a matplotlib figure as a PNG at `path` (local or URL); returns the path."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  with target.open("wb") as f:
    figure.savefig(f, format="png", dpi=dpi)
  return os.fspath(path)
