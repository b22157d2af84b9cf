"""Exact shapes metrics: ground truth scores perfectly, known errors score what they should."""

import numpy as np
import pytest

from mmjax.data.shapes import world as shapes
from mmjax.eval import shapes_metrics as sm
from mmjax.tokenizers import boxes


@pytest.fixture(scope="module")
def scenes():
  return [shapes.generate_scene(i, split="validation") for i in range(24)]


def test_true_caption_scores_one(scenes):
  total = sm.ObjectScores()
  for scene in scenes:
    total += sm.score_caption(scene["caption"], scene)
  rates = total.rates("caption")
  assert rates["caption/attr_acc"] == 1.0 and rates["caption/exact"] == 1.0
  assert rates["caption/scenes"] == len(scenes)


def test_caption_errors_are_counted_per_attribute():
  true = [("small", "red", "circle", "top left"), ("large", "blue", "star", "center")]
  caption = shapes.format_caption([("large", "blue", "star", "center"),   # order swapped
                                   ("small", "green", "circle", "top left")])  # colour wrong
  rates = sm.score_objects(sm.caption_objects(caption), true).rates("c")
  assert rates["c/color_acc"] == 0.5 and rates["c/shape_acc"] == 1.0
  assert rates["c/attr_acc"] == 7 / 8 and rates["c/exact"] == 0.0 and rates["c/count_acc"] == 1.0
  # An extra object: every attribute of the extra slot is wrong.
  extra = sm.score_objects(true + [("small", "red", "square", "bottom")], true).rates("c")
  assert extra["c/attr_acc"] == pytest.approx(2 / 3) and extra["c/count_acc"] == 0.0


def test_unreadable_caption_scores_zero():
  scene = {"num_objects": 1, "obj_size": [0], "obj_color": [0], "obj_shape": [0],
           "obj_position": [0]}
  rates = sm.score_caption("a red circle somewhere", scene).rates("c")
  assert rates["c/parsed"] == 0.0 and rates["c/attr_acc"] == 0.0 and rates["c/scenes"] == 1.0
  assert sm.caption_objects(b"\xff\xfe") is None


def test_image_objects_read_true_scenes(scenes):
  total = sm.ObjectScores()
  for scene in scenes:
    total += sm.score_image(scene["rgb"], scene)
  # Objects of one colour that touch merge into one region; everything else is read exactly.
  assert total.rates("img")["img/attr_acc"] > 0.9
  single = [s for s in scenes if s["num_objects"] == 1]
  assert single and all(sm.score_image(s["rgb"], s).exact for s in single)


def test_image_objects_of_a_blank_or_wrong_image():
  scene = shapes.generate_scene(3, split="validation")
  blank = np.full_like(scene["rgb"], 230)
  assert sm.image_objects(blank) == []
  assert sm.score_image(blank, scene).rates("i")["i/attr_acc"] == 0.0
  recoloured = scene["rgb"].copy()
  fg = sm.color_map(recoloured) > 0
  recoloured[fg] = shapes.COLOR_RGB[(scene["obj_color"][0] + 1) % len(shapes.COLORS)]
  assert sm.score_image(recoloured, scene).rates("i")["i/color_acc"] < 1.0


def test_true_det_text_gives_f1_one(scenes):
  total = sm.BoxCounts()
  for scene in scenes:
    text = boxes.det_text(scene["det_boxes"], scene["det_classes"], shapes.SHAPES, 65)
    decoded = boxes.text_to_boxes(text, 65, shapes.SHAPES)
    classes = [shapes.SHAPES.index(c) for c in decoded.classes]
    total += sm.score_boxes(decoded.boxes, classes, scene)
  assert total.rates("det") == {"det/f1": 1.0, "det/precision": 1.0, "det/recall": 1.0}


def test_box_matching_counts():
  true = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
  pred = np.array([[0.0, 0.0, 0.5, 0.4],    # IoU 0.8, right class: TP
                   [0.5, 0.5, 1.0, 1.0],    # exact box, wrong class: FP
                   [0.0, 0.0, 0.5, 0.5]])   # duplicate of a matched box: FP
  counts = sm.match_boxes(pred, [0, 2, 0], true, [0, 1])
  assert (counts.tp, counts.fp, counts.fn) == (1, 2, 1)
  assert counts.rates("d")["d/f1"] == pytest.approx(2 / 5)
  assert sm.box_iou(true, true + [0.25, 0, 0.25, 0])[0, 0] == pytest.approx(1 / 3)
  empty = sm.match_boxes(np.zeros((0, 4)), [], true, [0, 1])
  assert (empty.tp, empty.fn) == (0, 2) and empty.rates("d")["d/f1"] == 0.0


def test_semseg_miou(scenes):
  confusion = sum(sm.semseg_confusion(s["semseg"], s) for s in scenes)
  assert sm.semseg_rates(confusion, "seg") == {"seg/pixel_acc": 1.0, "seg/miou": 1.0}
  scene = scenes[0]
  all_background = sm.semseg_rates(sm.semseg_confusion(np.zeros_like(scene["semseg"]), scene),
                                   "seg")
  fg = float(np.mean(scene["semseg"] == 0))
  assert all_background["seg/pixel_acc"] == pytest.approx(fg)
  # Background IoU = its pixel share; every present shape class 0.
  present = len(np.unique(scene["semseg"]))
  assert all_background["seg/miou"] == pytest.approx(fg / present)
