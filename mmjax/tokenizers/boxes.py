"""Boxes as text (specs/fourm.md): `v0=xmin v1=ymin v2=xmax v3=ymax class` per box.

Coordinates are normalised to [0, 1] and quantised to `bins` levels, q = round(x * (bins - 1)), so
0 and 1 are exact and the round-trip error is at most 1 / (2 (bins - 1)); with bins = S + 1 the
pixel-edge boxes of an S-pixel image round-trip exactly. Boxes are ordered by the distance of
(xmin, ymin) to the origin (ties keep their input order). Decoding is for generated text: it never
raises on malformed input, it skips the broken boxes and counts them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from mmjax.errors import UserError

_COORD_RE = re.compile(r"^v([0-3])=(\d{1,9})$")


class DecodedBoxes(NamedTuple):
  boxes: np.ndarray          # float32 [K, 4] xmin, ymin, xmax, ymax in [0, 1]
  classes: tuple[str, ...]   # K class names
  skipped: int               # malformed boxes that were dropped


def quantize(coords: np.ndarray, bins: int) -> np.ndarray:
  """int32 bins of normalised coordinates (clipped to [0, 1])."""
  return np.rint(np.clip(coords, 0.0, 1.0) * (bins - 1)).astype(np.int32)


def dequantize(q: np.ndarray, bins: int) -> np.ndarray:
  return (np.asarray(q, np.float32) / np.float32(bins - 1)).astype(np.float32)


def _check_bins(bins: int) -> None:
  if bins < 2:
    raise UserError(f"boxes as text: coord_bins must be >= 2, got {bins}")


def boxes_to_text(boxes_K4: np.ndarray, classes: Sequence[str], bins: int) -> str:
  """`v0=.. v1=.. v2=.. v3=.. class` per box, nearest (xmin, ymin) to the origin first."""
  _check_bins(bins)
  boxes_K4 = np.asarray(boxes_K4, np.float64)
  if boxes_K4.ndim != 2 or boxes_K4.shape[1] != 4:
    raise UserError(f"boxes as text: boxes must be [K, 4], got shape {boxes_K4.shape}")
  if len(classes) != len(boxes_K4):
    raise UserError(f"boxes as text: {len(boxes_K4)} boxes but {len(classes)} class names")
  if not np.isfinite(boxes_K4).all():
    raise UserError("boxes as text: boxes hold NaN or infinite coordinates")
  bad = (boxes_K4 < 0).any(1) | (boxes_K4 > 1).any(1) | (boxes_K4[:, 2] < boxes_K4[:, 0]) | (
      boxes_K4[:, 3] < boxes_K4[:, 1])
  if bad.any():
    k = int(np.argmax(bad))
    raise UserError(f"boxes as text: box {k} {boxes_K4[k].tolist()} is not a normalised "
                    f"(xmin, ymin, xmax, ymax) box in [0, 1]")
  for k, name in enumerate(classes):
    if not isinstance(name, str) or not name.strip() or _COORD_RE.match(name.split()[0]):
      raise UserError(f"boxes as text: class name {k} ({name!r}) is empty or looks like a "
                      f"coordinate")
  order = np.argsort(np.hypot(boxes_K4[:, 0], boxes_K4[:, 1]), kind="stable")
  q_K4 = quantize(boxes_K4, bins)
  return " ".join(f"v0={q[0]} v1={q[1]} v2={q[2]} v3={q[3]} {' '.join(classes[k].split())}"
                  for k, q in zip(order, q_K4[order]))


def det_text(boxes_K4: np.ndarray, class_ids_K: np.ndarray, class_names: Sequence[str],
             bins: int) -> str:
  """Boxes with integer classes (indices into `class_names`, e.g. shapes.SHAPES) as text."""
  class_ids_K = np.asarray(class_ids_K).reshape(-1)
  if class_ids_K.size and (class_ids_K.min() < 0 or class_ids_K.max() >= len(class_names)):
    raise UserError(f"boxes as text: class ids {class_ids_K.tolist()} outside "
                    f"[0, {len(class_names)})")
  return boxes_to_text(boxes_K4, [class_names[i] for i in class_ids_K], bins)


def text_to_boxes(text: str, bins: int, class_names: Sequence[str] | None = None) -> DecodedBoxes:
  """Parses generated text back into boxes; malformed boxes are skipped and counted.

  A box is the four coordinate words v0, v1, v2, v3 in that order, each in [0, bins), with
  xmin <= xmax and ymin <= ymax, followed by one or more class words up to the next coordinate
  word. With `class_names`, the class must be one of them. Anything else is skipped up to the next
  `v0=`.
  """
  _check_bins(bins)
  known = None if class_names is None else set(class_names)
  words = text.split() if isinstance(text, str) else []
  boxes, classes, skipped = [], [], 0
  started = False         # inside a box (a v0= was seen and the box is not finished)
  coords: list[int] = []  # coordinates of the box being read
  name: list[str] = []    # its class words
  broken = False          # the box being read is malformed

  def finish() -> None:
    nonlocal skipped
    label = " ".join(name)
    if (not broken and len(coords) == 4 and name and coords[0] <= coords[2]
        and coords[1] <= coords[3] and (known is None or label in known)):
      boxes.append(coords[:])
      classes.append(label)
    else:
      skipped += 1

  for word in words:
    match = _COORD_RE.match(word)
    j, value = (int(match.group(1)), int(match.group(2))) if match else (-1, -1)
    if j == 0:  # a new box begins
      if started:
        finish()
      started, coords, name, broken = True, [], [], False
    elif not started:
      continue  # garbage between boxes
    elif match and name:  # a coordinate after the class: the box ended, garbage follows
      finish()
      started = False
      continue
    elif not match:
      if len(coords) == 4:
        name.append(word)
      else:
        broken = True  # a word where a coordinate belongs
      continue
    if len(coords) != j or value >= bins:
      broken = True  # out of order, repeated or out of range
    coords.append(value)
  if started:
    finish()
  boxes_K4 = dequantize(np.asarray(boxes, np.int32).reshape(-1, 4), bins)
  return DecodedBoxes(boxes_K4, tuple(classes), skipped)
