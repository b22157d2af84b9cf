"""Boxes as text: format, order, quantisation round trip, tolerance of malformed generated text."""

import re

import numpy as np
import pytest

from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError
from mmjax.tokenizers import boxes


def test_format_and_order_by_distance_to_origin():
  boxes_K4 = np.array([[0.5, 0.5, 0.75, 1.0], [0.1, 0.2, 0.3, 0.4], [0.0, 0.6, 0.2, 0.9]])
  text = boxes.boxes_to_text(boxes_K4, ["star", "circle", "red square"], bins=11)
  # distances: 0.707, 0.224, 0.6 -> circle, red square, star; q = round(x * 10)
  assert text == ("v0=1 v1=2 v2=3 v3=4 circle v0=0 v1=6 v2=2 v3=9 red square "
                  "v0=5 v1=5 v2=8 v3=10 star")
  decoded = boxes.text_to_boxes(text, bins=11)
  assert decoded.classes == ("circle", "red square", "star") and decoded.skipped == 0
  np.testing.assert_allclose(decoded.boxes[2], [0.5, 0.5, 0.8, 1.0], atol=1e-6)
  assert boxes.boxes_to_text(np.zeros((0, 4)), [], bins=11) == ""


def test_round_trip_within_quantisation_error():
  rng = np.random.default_rng(0)
  for bins in (2, 11, 1000):
    lo, hi = np.sort(rng.random((50, 2, 2)), axis=1).transpose(1, 0, 2)
    boxes_K4 = np.concatenate([lo, hi], axis=1)
    names = [f"c{k}" for k in range(50)]
    decoded = boxes.text_to_boxes(boxes.boxes_to_text(boxes_K4, names, bins), bins)
    order = [int(n[1:]) for n in decoded.classes]
    assert sorted(order) == list(range(50)) and decoded.skipped == 0
    err = np.abs(decoded.boxes - boxes_K4[order]).max()
    assert err <= 0.5 / (bins - 1) + 1e-6
    dist = np.hypot(boxes_K4[order, 0], boxes_K4[order, 1])
    assert (np.diff(dist) >= 0).all()


def test_shapes_boxes_are_exact_with_image_size_plus_one_bins():
  for i in range(30):
    scene = shapes.generate_scene(i, image_size=64)
    text = boxes.det_text(scene["det_boxes"], scene["det_classes"], shapes.SHAPES, 65)
    decoded = boxes.text_to_boxes(text, 65, class_names=shapes.SHAPES)
    order = np.argsort(np.hypot(scene["det_boxes"][:, 0], scene["det_boxes"][:, 1]), kind="stable")
    np.testing.assert_array_equal(decoded.boxes, scene["det_boxes"][order])
    assert decoded.classes == tuple(shapes.SHAPES[c] for c in scene["det_classes"][order])


@pytest.mark.parametrize("text, classes, skipped", [
    ("", (), 0),
    ("no boxes here at all", (), 0),
    ("v0=1 v1=2 v2=3 v3=4 circle", ("circle",), 0),
    ("junk v3=4 v0=1 v1=2 v2=3 v3=4 circle", ("circle",), 0),          # garbage before a box
    ("v0=1 v1=2 v2=3 circle v0=1 v1=1 v2=2 v3=2 star", ("star",), 1),  # missing v3
    ("v0=1 v2=3 v1=2 v3=4 circle", (), 1),                             # out of order
    ("v0=1 v1=2 v2=3 v3=4", (), 1),                                    # no class
    ("v0=1 v1=2 v2=3 v3=99 circle", (), 1),                            # coordinate >= bins
    ("v0=5 v1=2 v2=3 v3=4 circle", (), 1),                             # xmin > xmax
    ("v0=1 v1=2 v2=3 v3=4 circle v1=3 star v0=0 v1=0 v2=0 v3=0 big star", ("circle", "big star"), 0),
    ("v0=1 v1=2 v2=3 v3=4 hexagon v0=1 v1=1 v2=2 v3=2 star", ("star",), 1),  # unknown class
    ("v0=1 v1=2 x v2=3 v3=4 circle", (), 1),                           # a word among coordinates
    ("v0=1 v0=1 v1=2 v2=3 v3=4 circle", ("circle",), 1),               # restarted box
])
def test_malformed_boxes_are_skipped(text, classes, skipped):
  decoded = boxes.text_to_boxes(text, 10, class_names=(
      "circle", "star", "big star") if "hexagon" in text or not classes else None)
  assert decoded.classes == classes and decoded.skipped == skipped
  assert decoded.boxes.shape == (len(classes), 4) and decoded.boxes.dtype == np.float32


def test_random_garbage_and_truncations_never_crash():
  rng = np.random.default_rng(1)
  words = ([f"v{j}={b}" for j in range(4) for b in (0, 3, 9, 10, 12345)] + list(shapes.SHAPES)
           + ["v0=", "v5=1", "=", "v0=-1", "v1=x", "", "\n", "[S_0]", "🙂", "v0=3v1=4"])
  for _ in range(300):
    text = " ".join(rng.choice(words, rng.integers(0, 40)))
    decoded = boxes.text_to_boxes(text, 10, class_names=shapes.SHAPES)
    assert decoded.boxes.shape == (len(decoded.classes), 4)
    assert ((decoded.boxes >= 0) & (decoded.boxes <= 1)).all()
    assert (decoded.boxes[:, :2] <= decoded.boxes[:, 2:]).all()
  chars = rng.integers(0, 0x3000, (50, 30))
  for row in chars:
    boxes.text_to_boxes("".join(map(chr, row)), 10)
  assert boxes.text_to_boxes(None, 10).classes == ()  # not even a string
  scene = shapes.generate_scene(5)
  full = boxes.det_text(scene["det_boxes"], scene["det_classes"], shapes.SHAPES, 65)
  reference = boxes.text_to_boxes(full, 65)
  for cut in range(len(full) + 1):
    decoded = boxes.text_to_boxes(full[:cut], 65, class_names=shapes.SHAPES)
    k = len(decoded.classes)  # a truncation keeps a prefix of the boxes, never invents one
    assert decoded.classes == reference.classes[:k]
    np.testing.assert_array_equal(decoded.boxes, reference.boxes[:k])
    assert k + decoded.skipped == len(re.findall(r"v0=\d", full[:cut]))  # every begun box counted


def test_bad_boxes_are_clear_errors():
  with pytest.raises(UserError, match=r"must be \[K, 4\]"):
    boxes.boxes_to_text(np.zeros((2, 3)), ["a", "b"], 10)
  with pytest.raises(UserError, match="2 boxes but 1 class names"):
    boxes.boxes_to_text(np.zeros((2, 4)), ["a"], 10)
  with pytest.raises(UserError, match="box 1"):
    boxes.boxes_to_text(np.array([[0, 0, 1, 1], [0.5, 0, 0.2, 1]]), ["a", "b"], 10)
  with pytest.raises(UserError, match="NaN"):
    boxes.boxes_to_text(np.full((1, 4), np.nan), ["a"], 10)
  with pytest.raises(UserError, match="class name 0"):
    boxes.boxes_to_text(np.zeros((1, 4)), ["v0=3"], 10)
  with pytest.raises(UserError, match="class ids"):
    boxes.det_text(np.zeros((1, 4)), [7], shapes.SHAPES, 10)
  with pytest.raises(UserError, match="coord_bins"):
    boxes.text_to_boxes("v0=0", 1)
