"""PNG grids of images, for results people would rather look at than read."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mmjax import paths


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
  # Late: matplotlib takes a second to import; the trainers import this module for their PNGs.
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

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
  paths.save_figure(figure, path)
  plt.close(figure)
  return str(path)


def draw_boxes(rgb_HW3: np.ndarray, boxes_K4: np.ndarray,
               color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
  """A copy of an image with the outlines of normalised (xmin, ymin, xmax, ymax) boxes drawn."""
  out = np.array(rgb_HW3, np.uint8)
  h, w = out.shape[:2]
  for x0, y0, x1, y1 in np.asarray(boxes_K4, np.float64).reshape(-1, 4):
    # Pixel-edge coordinates -> the inclusive pixels on the box's border.
    c0, c1 = int(np.clip(np.floor(x0 * w), 0, w - 1)), int(np.clip(np.ceil(x1 * w) - 1, 0, w - 1))
    r0, r1 = int(np.clip(np.floor(y0 * h), 0, h - 1)), int(np.clip(np.ceil(y1 * h) - 1, 0, h - 1))
    out[r0:r1 + 1, [c0, c1]] = color
    out[[r0, r1], c0:c1 + 1] = color
  return out
