"""Exact any-to-any metrics on the shapes world, against each scene's ground truth (numpy, host).

Every prediction is first read back into the scene's terms, then compared with the truth:

  caption -> objects   `shapes.parse_caption`: (size, colour, shape, position) per object
  rgb     -> objects   `image_objects`: pixels classified by the palette, connected regions of one
                       colour, each fitted with the best shape template (size, shape, centre)
  det     -> boxes     `mmjax.tokenizers.boxes.text_to_boxes` (via the det modality tokenizer)
  semseg  -> classes   the decoded class map itself

Scores (`ObjectScores`, `BoxCounts`, confusion matrices) are sums, so they add over scenes and the
rates are taken once at the end: micro averages, which weigh every object (pixel, box) equally.

  attribute accuracy  predicted and true objects are matched one to one (the matching with the
                      most agreeing attributes); an attribute is right for a matched pair that
                      agrees on it; accuracy = right / max(#true, #predicted), so missing and extra
                      objects count as wrong. `exact`: scenes whose object multisets are equal.
  box F1 @ IoU 0.5    a predicted box is a true positive if it has the class of an unmatched true
                      box with IoU >= 0.5 (greedy by IoU); F1 = 2 TP / (2 TP + FP + FN).
  mIoU                over the semseg classes present in truth or prediction (image_metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
from scipy import ndimage

from mmjax.data.shapes import world as shapes
from mmjax.tokenizers import image_metrics

ATTRIBUTES = ("size", "color", "shape", "position")
Object = tuple[str, str, str, str]  # (size, colour, shape, position) names, as parse_caption

NUM_SEMSEG_CLASSES = len(shapes.SEMSEG_CLASSES)
# Pixels farther than this (Euclidean, grey levels) from every object colour count as background
# unless they are far darker than the background (decoded images blur colours).
_COLOR_RADIUS = 90.0
_BACKGROUND_MIN = 170  # the background has every channel >= 194; object colours one <= 50
_MIN_REGION_FRACTION = 0.35  # of the small shape's template area: smaller regions are noise


# ---------------------------------------------------------------------------------------------
# Objects: matching and attribute accuracy.


@dataclasses.dataclass
class ObjectScores:
  """Sums over scenes of object-level agreement (add with `+=`)."""
  scenes: int = 0
  parsed: int = 0            # predictions that could be read as objects at all
  exact: int = 0             # scenes whose predicted objects equal the truth (as multisets)
  count_right: int = 0       # scenes with the right number of objects
  slots: int = 0             # sum over scenes of max(#true, #predicted)
  right: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(ATTRIBUTES, 0))
  objects_right: int = 0     # matched pairs that agree on every attribute

  def __iadd__(self, other: ObjectScores) -> Self:
    for f in ("scenes", "parsed", "exact", "count_right", "slots", "objects_right"):
      setattr(self, f, getattr(self, f) + getattr(other, f))
    for a in ATTRIBUTES:
      self.right[a] += other.right[a]
    return self

  def rates(self, prefix: str) -> dict[str, float]:
    """`<prefix>/attr_acc` (mean over the four attributes), per attribute, object and scene rates."""
    slots, scenes = max(self.slots, 1), max(self.scenes, 1)
    out = {f"{prefix}/{a}_acc": self.right[a] / slots for a in ATTRIBUTES}
    out[f"{prefix}/attr_acc"] = sum(self.right.values()) / (len(ATTRIBUTES) * slots)
    out[f"{prefix}/object_acc"] = self.objects_right / slots
    out[f"{prefix}/exact"] = self.exact / scenes
    out[f"{prefix}/count_acc"] = self.count_right / scenes
    out[f"{prefix}/parsed"] = self.parsed / scenes
    out[f"{prefix}/scenes"] = float(self.scenes)
    return out


def _agreement(p: Object, t: Object) -> int:
  return sum(a == b for a, b in zip(p, t))


def match_objects(pred: Sequence[Object], true: Sequence[Object]) -> list[tuple[int, int]]:
  """(pred index, true index) pairs of the one-to-one matching with the most agreeing
  attributes (scenes hold at most 4 objects: every assignment is tried; ties keep list order)."""
  if not pred or not true:
    return []
  small, large, swap = (pred, true, False) if len(pred) <= len(true) else (true, pred, True)
  best, best_score = None, -1
  for chosen in itertools.permutations(range(len(large)), len(small)):
    score = sum(_agreement(small[i], large[j]) for i, j in enumerate(chosen))
    if score > best_score:
      best, best_score = chosen, score
  pairs = [(i, j) for i, j in enumerate(best)]
  return [(j, i) for i, j in pairs] if swap else pairs


def score_objects(pred: Sequence[Object] | None, true: Sequence[Object]) -> ObjectScores:
  """Scores of one scene; `pred` None means the prediction could not be read (all wrong)."""
  true = [tuple(o) for o in true]
  out = ObjectScores(scenes=1, slots=len(true))
  if pred is None:
    return out
  pred = [tuple(o) for o in pred]
  out.parsed = 1
  out.slots = max(len(true), len(pred))
  out.count_right = int(len(pred) == len(true))
  out.exact = int(sorted(pred) == sorted(true))
  for i, j in match_objects(pred, true):
    for a, p, t in zip(ATTRIBUTES, pred[i], true[j]):
      out.right[a] += int(p == t)
    out.objects_right += int(pred[i] == true[j])
  return out


def caption_objects(caption: str | bytes) -> list[Object] | None:
  """The objects a (generated) caption states, or None if it is not a shapes caption."""
  try:
    return shapes.parse_caption(caption)
  except (ValueError, UnicodeDecodeError):
    return None


def score_caption(caption: str | bytes, scene: Mapping[str, Any]) -> ObjectScores:
  """A predicted caption against the scene's objects."""
  return score_objects(caption_objects(caption), shapes.scene_objects(scene))


# ---------------------------------------------------------------------------------------------
# Objects seen in an image (the attributes of a generated rgb image).


@functools.lru_cache(maxsize=4)
def _templates(image_size: int) -> tuple[list[tuple[int, int]], np.ndarray, int]:
  """(shape id, size id) of every shape template at this image size, the rFFTs of the templates
  (centred in K x K, flipped, padded to the full correlation size) and K."""
  halves = shapes.half_extents(image_size)
  k = 2 * max(halves) + 1
  ids, kernels = [], []
  for t in range(len(shapes.SHAPES)):
    for z, h in enumerate(halves):
      kernel = np.zeros((k, k), np.float64)
      start = k // 2 - h
      kernel[start:start + 2 * h + 1, start:start + 2 * h + 1] = shapes.shape_mask(t, h)
      ids.append((t, z))
      kernels.append(kernel[::-1, ::-1])
  n = image_size + k - 1
  return ids, np.fft.rfft2(np.stack(kernels), s=(n, n)), k


def color_map(rgb_HW3: np.ndarray) -> np.ndarray:
  """int [H, W]: 1 + index into shapes.COLORS of each pixel's nearest object colour, 0 for
  background (light pixels, or pixels far from every object colour)."""
  rgb = np.asarray(rgb_HW3, np.float32)
  dist_HWC = np.linalg.norm(rgb[..., None, :] - shapes.COLOR_RGB.astype(np.float32), axis=-1)
  nearest = dist_HWC.argmin(-1)
  foreground = (dist_HWC.min(-1) <= _COLOR_RADIUS) & (rgb.min(-1) < _BACKGROUND_MIN)
  return np.where(foreground, nearest + 1, 0)


def _correlate_all(x_HW: np.ndarray) -> np.ndarray:
  """[T, H, W]: sum of x under template T centred at each pixel (one batched FFT)."""
  size = x_HW.shape[0]
  _, kernels_f, k = _templates(size)
  n = size + k - 1
  full = np.fft.irfft2(np.fft.rfft2(x_HW, s=(n, n))[None] * kernels_f, s=(n, n))
  return full[:, k // 2:k // 2 + size, k // 2:k // 2 + size]


def _fit_shape(region: np.ndarray, background: np.ndarray) -> tuple[float, int, int, tuple]:
  """(score, shape, size, (x, y)) of the template that best explains a region: template pixels
  on the region count for it, on background against it, on other colours (occluders) not at all;
  region pixels outside the template count against it."""
  ids, _, _ = _templates(region.shape[0])
  hit, miss = _correlate_all(region), _correlate_all(background)
  area = float(region.sum())
  score_THW = hit / np.maximum(hit + miss + (area - hit), 1.0)
  t, y, x = np.unravel_index(int(score_THW.argmax()), score_THW.shape)
  return float(score_THW[t, y, x]), ids[t][0], ids[t][1], (int(x), int(y))


def image_objects(rgb_HW3: np.ndarray) -> list[Object]:
  """The objects an rgb image shows: one per connected region of one palette colour that is
  large enough, with the size, shape and centre of its best-fitting template."""

  colors = color_map(rgb_HW3)
  size = colors.shape[0]
  min_area = _MIN_REGION_FRACTION * float(shapes.shape_mask(0, shapes.half_extents(size)[0]).sum())
  background = (colors == 0).astype(np.float32)
  found = []
  for c in np.unique(colors[colors > 0]):
    labels, count = ndimage.label(colors == c)
    for k in range(1, count + 1):
      region = labels == k
      if region.sum() < min_area:
        continue
      _, t, z, (x, y) = _fit_shape(region.astype(np.float32), background)
      position = shapes.POSITIONS[shapes.position_index((x + 0.5) / size, (y + 0.5) / size)]
      found.append((shapes.SIZES[z], shapes.COLORS[c - 1], shapes.SHAPES[t], position))
  return found


def score_image(rgb_HW3: np.ndarray, scene: Mapping[str, Any]) -> ObjectScores:
  """A (generated) rgb image against the scene's objects."""
  return score_objects(image_objects(rgb_HW3), shapes.scene_objects(scene))


# ---------------------------------------------------------------------------------------------
# Boxes.


@dataclasses.dataclass
class BoxCounts:
  """True positives, false positives, false negatives summed over scenes."""
  tp: int = 0
  fp: int = 0
  fn: int = 0

  def __iadd__(self, other: BoxCounts) -> Self:
    self.tp, self.fp, self.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
    return self

  def rates(self, prefix: str) -> dict[str, float]:
    return {f"{prefix}/f1": 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1),
            f"{prefix}/precision": self.tp / max(self.tp + self.fp, 1),
            f"{prefix}/recall": self.tp / max(self.tp + self.fn, 1)}


def box_iou(a_K4: np.ndarray, b_L4: np.ndarray) -> np.ndarray:
  """[K, L] IoU of (xmin, ymin, xmax, ymax) boxes."""
  a, b = np.asarray(a_K4, np.float64).reshape(-1, 4), np.asarray(b_L4, np.float64).reshape(-1, 4)
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0.0, None), axis=-1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0.0, None), axis=-1)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_boxes(pred_boxes: np.ndarray, pred_classes: np.ndarray, true_boxes: np.ndarray,
                true_classes: np.ndarray, iou_threshold: float = 0.5) -> BoxCounts:
  """Greedy matching by IoU of same-class boxes, each true box matched at most once."""
  pred_classes = np.asarray(pred_classes).reshape(-1)
  true_classes = np.asarray(true_classes).reshape(-1)
  iou = box_iou(pred_boxes, true_boxes)
  iou = np.where(pred_classes[:, None] == true_classes[None, :], iou, 0.0)
  tp = 0
  while iou.size and iou.max() >= iou_threshold:
    i, j = np.unravel_index(int(iou.argmax()), iou.shape)
    iou[i, :], iou[:, j] = 0.0, 0.0
    tp += 1
  return BoxCounts(tp=tp, fp=len(pred_classes) - tp, fn=len(true_classes) - tp)


def score_boxes(pred_boxes: np.ndarray, pred_classes: np.ndarray,
                scene: Mapping[str, Any]) -> BoxCounts:
  """Predicted boxes (class ids index shapes.SHAPES) against the scene's boxes."""
  return match_boxes(pred_boxes, pred_classes, scene["det_boxes"], scene["det_classes"])


# ---------------------------------------------------------------------------------------------
# Segmentation.


def semseg_confusion(pred_HW: np.ndarray, scene: Mapping[str, Any]) -> np.ndarray:
  """[C, C] confusion (true, predicted) of a class map against the scene's semseg."""
  pred = np.clip(np.asarray(pred_HW, np.int64), 0, NUM_SEMSEG_CLASSES - 1)
  return image_metrics.confusion_matrix(pred, scene["semseg"], NUM_SEMSEG_CLASSES)


def semseg_rates(confusion: np.ndarray, prefix: str) -> dict[str, float]:
  return {f"{prefix}/{k}": v for k, v in image_metrics.semseg_scores(confusion).items()}
