"""PNG grids of images, for results people would rather look at than read."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def to_rgb(image: np.ndarray, kind: str = "rgb") -> np.ndarray:
  """An [H, W, 3] uint8 view of an rgb image, a depth map or a class map."""
  if kind == "rgb":
    return np.asarray(image, np.uint8)
  if kind == "depth":
    depth = np.asarray(image, np.float32)
    lo, hi = float(depth.min()), float(depth.max())
    grey = (255 * (hi - depth) / max(hi - lo, 1e-6)).astype(np.uint8)  # near = bright
    return np.repeat(grey[..., None], 3, axis=-1)
  if kind == "classes":
    # A fixed palette so a class has one colour in every grid.
    palette = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
                        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
                        (250, 190, 212)], np.uint8)
    return palette[np.asarray(image) % len(palette)]
  raise ValueError(f"unknown image kind {kind!r}; use rgb, depth or classes")


def save_grid(path: str | os.PathLike, rows: Sequence[Sequence[np.ndarray]],
              column_titles: Sequence[str] = (), row_titles: Sequence[str] = (),
              scale: int = 2) -> str:
  """Writes rows of [H, W, 3] uint8 images as one PNG with optional titles; returns the path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  num_rows, num_cols = len(rows), max(len(r) for r in rows)
  height, width = rows[0][0].shape[:2]
  inches = scale * max(height, width) / 64
  figure, axes = plt.subplots(num_rows, num_cols, squeeze=False,
                              figsize=(inches * num_cols * 1.6, inches * num_rows * 1.25))
  for r, row in enumerate(rows):
    for c in range(num_cols):
      axis = axes[r][c]
      axis.axis("off")
      if c < len(row):
        axis.imshow(row[c], interpolation="nearest")
      if r == 0 and c < len(column_titles):
        axis.set_title(column_titles[c], fontsize=8)
    if r < len(row_titles):
      axes[r][0].text(-0.05, 0.5, row_titles[r], transform=axes[r][0].transAxes, fontsize=6,
                      ha="right", va="center", wrap=True)
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return str(path)
