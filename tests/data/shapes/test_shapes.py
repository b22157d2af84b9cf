"""Tests of the shapes world (mmjax/data/shapes/world.py) and its builder
(mmjax/data/shapes/records.py)."""

import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data.shapes import records as shapes_tfds
from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError

ARRAY_FIELDS = ("rgb", "depth", "semseg", "instance", "det_boxes", "det_classes", "obj_shape",
                "obj_color", "obj_size", "obj_position", "obj_center", "obj_depth")


def scene_digest(scene):
  h = hashlib.sha256(scene["caption"].encode())
  for key in ARRAY_FIELDS:
    h.update(key.encode() + str(scene[key].dtype).encode() + scene[key].tobytes())
  return h.hexdigest()


def scenes(num, image_size=64, split="train", seed=0):
  return [shapes.generate_scene(i, seed=seed, split=split, image_size=image_size)
          for i in range(num)]


def silhouette(scene, k):
  """bool [S, S]: object k's full shape (occluded or not), rebuilt from the ground-truth fields."""
  s = scene["rgb"].shape[0]
  h = shapes.half_extents(s)[scene["obj_size"][k]]
  x, y = np.round(scene["obj_center"][k] * s - 0.5).astype(int)
  out = np.zeros((s, s), bool)
  out[y - h:y + h + 1, x - h:x + h + 1] = shapes.shape_mask(scene["obj_shape"][k], h)
  return out


# ----------------------------------------------------------------------------------- determinism --

def test_same_scene_is_byte_identical_and_scenes_differ():
  a, b = scenes(8), scenes(8)
  assert [scene_digest(x) for x in a] == [scene_digest(x) for x in b]
  assert len({scene_digest(x) for x in a}) == 8  # different indices differ
  val = scenes(8, split="validation")
  assert all(scene_digest(x) != scene_digest(y) for x, y in zip(a, val))  # train != validation
  other_seed = scenes(8, seed=1)
  assert all(scene_digest(x) != scene_digest(y) for x, y in zip(a, other_seed))


def test_scenes_are_identical_across_processes():
  script = (
      "import hashlib\n"
      "from mmjax.data.shapes import world as shapes\n"
      f"fields = {ARRAY_FIELDS!r}\n"
      "out = []\n"
      "for i in range(6):\n"
      "  sc = shapes.generate_scene(i, seed=7, split='validation', image_size=48)\n"
      "  h = hashlib.sha256(sc['caption'].encode())\n"
      "  for key in fields:\n"
      "    h.update(key.encode() + str(sc[key].dtype).encode() + sc[key].tobytes())\n"
      "  out.append(h.hexdigest())\n"
      "print(' '.join(out))\n")
  repo = pathlib.Path(shapes.__file__).parents[3]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env=env)
  here = [scene_digest(x) for x in scenes(6, image_size=48, split="validation", seed=7)]
  assert result.stdout.split() == here


# ---------------------------------------------------------------------------------------- schema --

@pytest.mark.parametrize("image_size", [16, 37, 64])
def test_schema(image_size):
  s = image_size
  for scene in scenes(12, image_size=s):
    n = int(scene["num_objects"])
    assert 1 <= n <= shapes.MAX_OBJECTS
    expected = {
        "rgb": (np.uint8, (s, s, 3)), "depth": (np.float32, (s, s)), "semseg": (np.uint8, (s, s)),
        "instance": (np.uint8, (s, s)), "det_boxes": (np.float32, (n, 4)),
        "det_classes": (np.int32, (n,)), "obj_shape": (np.int32, (4,)),
        "obj_color": (np.int32, (4,)),
        "obj_size": (np.int32, (4,)), "obj_position": (np.int32, (4,)),
        "obj_center": (np.float32, (4, 2)), "obj_depth": (np.float32, (4,)),
    }
    for key, (dtype, shape) in expected.items():
      assert scene[key].dtype == dtype and scene[key].shape == shape, key
    assert isinstance(scene["caption"], str)
    for key in ("obj_shape", "obj_color", "obj_size", "obj_position"):
      assert (scene[key][n:] == -1).all() and (scene[key][:n] >= 0).all()
    assert (scene["obj_depth"][n:] == 0).all() and (scene["obj_center"][n:] == 0).all()
    boxes = scene["det_boxes"]
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_vocabularies():
  assert {"circle", "square", "triangle"} < set(shapes.SHAPES) and len(shapes.SHAPES) >= 4
  assert len(shapes.COLORS) >= 6 and shapes.COLOR_RGB.shape == (len(shapes.COLORS), 3)
  assert shapes.SIZES == ("small", "large") and len(shapes.POSITIONS) == 9
  assert shapes.SEMSEG_CLASSES == ("background",) + shapes.SHAPES
  words = shapes.SHAPES + shapes.COLORS + shapes.SIZES
  assert len(set(words)) == len(words)
  for t in range(len(shapes.SHAPES)):
    for h in shapes.half_extents(64):
      mask = shapes.shape_mask(t, h)
      assert mask.shape == (2 * h + 1, 2 * h + 1) and mask[h, h] and mask.sum() > h * h


# ----------------------------------------------------------------------------------- consistency --

def test_modalities_agree_with_ground_truth():
  for scene in scenes(40):
    n = int(scene["num_objects"])
    s = scene["rgb"].shape[0]
    inst = scene["instance"]
    assert set(np.unique(inst)) == set(range(n + 1))  # every object has visible pixels
    for k in range(n):
      vis = inst == k + 1
      assert (scene["semseg"][vis] == scene["obj_shape"][k] + 1).all()
      assert (scene["rgb"][vis] == shapes.COLOR_RGB[scene["obj_color"][k]]).all()
      assert (scene["depth"][vis] == scene["obj_depth"][k]).all()
      rows, cols = np.nonzero(vis)
      box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / s
      np.testing.assert_array_equal(scene["det_boxes"][k], box.astype(np.float32))
      assert scene["det_classes"][k] == scene["obj_shape"][k]
    bg = inst == 0
    assert (scene["semseg"][bg] == 0).all()
    # The background is light; every object colour has a dark channel.
    assert (scene["rgb"][bg] >= 194).all()
    assert (shapes.COLOR_RGB.min(1) <= 50).all()
    assert scene["depth"][bg].min() > scene["obj_depth"][:n].max()


def test_occlusion_nearer_object_wins():
  occluded_scenes = 0
  for scene in scenes(60):
    n = int(scene["num_objects"])
    depth = scene["obj_depth"][:n]
    assert (np.diff(depth) >= shapes.DEPTH_GAP - 1e-5).all()  # distinct, slots nearest first
    sil = np.stack([silhouette(scene, k) for k in range(n)])
    covered = sil.any(0)
    nearest = np.where(covered, sil.argmax(0) + 1, 0)  # the first (nearest) slot covering a pixel
    np.testing.assert_array_equal(scene["instance"], nearest)
    visible = np.array([(scene["instance"] == k + 1).sum() for k in range(n)])
    assert (visible >= shapes.MIN_VISIBLE_FRACTION * sil.sum((1, 2))).all()
    occluded_scenes += bool((visible < sil.sum((1, 2))).any())
  assert occluded_scenes >= 5  # the test above saw real occlusions


# -------------------------------------------------------------------------------------- captions --

def test_caption_round_trip():
  for image_size in (16, 64):
    for scene in scenes(50, image_size=image_size):
      objects = shapes.parse_caption(scene["caption"])
      assert objects == shapes.scene_objects(scene)
      assert shapes.format_caption(objects) == scene["caption"]
      for k, (_, _, _, position) in enumerate(objects):
        x, y = scene["obj_center"][k]
        assert shapes.POSITIONS[shapes.position_index(x, y)] == position


def test_caption_format_and_parse_errors():
  objects = [("small", "red", "circle", "top left"), ("large", "blue", "square", "right")]
  caption = shapes.format_caption(objects)
  assert caption == "a small red circle in the top left and a large blue square on the right"
  assert shapes.parse_caption(caption) == objects
  for bad in ("", "a small red circle", "a huge red circle in the center",
              caption + " and", "a small red circle in the center, "):
    with pytest.raises(ValueError):
      shapes.parse_caption(bad)


# ------------------------------------------------------------------------------------------ tfds --

def assert_record_is_scene(record, scene):
  assert record["caption"].decode() == scene["caption"]
  assert int(record["index"]) == int(scene["index"])
  assert int(record["num_objects"]) == int(scene["num_objects"])
  for key in ARRAY_FIELDS:
    assert record[key].dtype == scene[key].dtype, key
    np.testing.assert_array_equal(record[key], scene[key], err_msg=key)


@pytest.mark.parametrize("image_size", [64, 24])  # a registered config, and one built on demand
def test_tfds_build_and_read_round_trip(tmp_path, image_size):
  summary = shapes_tfds.prepare_shapes(tmp_path, num_train=16, num_val=8, seed=3,
                                       image_size=image_size, progress=False)
  assert summary["splits"] == {"train": 16, "validation": 8} and not summary["reused"]
  assert summary["path"].endswith(f"shapes/s{image_size}/1.0.0")
  assert shapes.parse_caption(summary["example_caption"])
  for split, num in summary["splits"].items():
    source = tfds.data_source(f"shapes/s{image_size}", data_dir=tmp_path, split=split,
                              download=False)
    assert len(source) == num
    for i in range(num):
      assert_record_is_scene(source[i], shapes.generate_scene(i, seed=3, split=split,
                                                              image_size=image_size))
  loaded = shapes_tfds.load_shapes(tmp_path, "validation", image_size=image_size)
  assert_record_is_scene(loaded[5], shapes.generate_scene(5, seed=3, split="validation",
                                                          image_size=image_size))
  again = shapes_tfds.prepare_shapes(tmp_path, 16, 8, seed=3, image_size=image_size, progress=False)
  assert again["reused"] and again["splits"] == summary["splits"]
  with pytest.raises(ValueError, match="already holds"):
    shapes_tfds.prepare_shapes(tmp_path, 16, 8, seed=4, image_size=image_size, progress=False)


def test_tfds_info(tmp_path):
  shapes_tfds.prepare_shapes(tmp_path, 4, 0, image_size=32, progress=False)
  builder = tfds.builder("shapes/s32", data_dir=tmp_path)
  assert str(builder.info.version) == "1.0.0" and builder.info.release_notes
  assert builder.info.description and builder.info.disable_shuffling
  assert set(builder.info.splits) == {"train"}
  assert builder.info.features["rgb"].shape == (32, 32, 3)
  assert "tensorflow" not in sys.modules  # built and read without TensorFlow


# --------------------------------------------------------------------------------- bad arguments --

@pytest.mark.parametrize("kwargs, name", [
    (dict(num_train=-1), "num_train"),
    (dict(num_val=-5), "num_val"),
    (dict(num_train=0, num_val=0), "num_train"),
    (dict(image_size=8), "image_size"),
    (dict(image_size=15), "image_size"),
    (dict(image_size=64.0), "image_size"),
    (dict(seed=-1), "seed"),
    (dict(num_train="10"), "num_train"),
])
def test_prepare_rejects_bad_parameters(tmp_path, kwargs, name):
  args = dict(out_dir=tmp_path, num_train=4, num_val=2, progress=False) | kwargs
  with pytest.raises(ValueError, match=name) as info:
    shapes_tfds.prepare_shapes(**args)
  assert isinstance(info.value, UserError)
  assert not list(tmp_path.iterdir())  # nothing written


def test_generation_rejects_bad_parameters(tmp_path):
  for kwargs, name in [(dict(index=-1), "index"), (dict(index=0, split="dev"), "split"),
                       (dict(index=0, image_size=4), "image_size"),
                       (dict(index=True), "index")]:
    with pytest.raises(ValueError, match=name):
      shapes.generate_scene(**kwargs)
  with pytest.raises(ValueError, match="data_dir"):
    shapes_tfds.load_shapes(tmp_path, "train")
  with pytest.raises(ValueError, match="num_scenes"):
    shapes.SceneSource(-1)


def test_scene_source_and_benchmark():
  source = shapes.SceneSource(5, seed=2, split="validation", image_size=32)
  assert len(source) == 5
  assert scene_digest(source[4]) == scene_digest(
      shapes.generate_scene(4, seed=2, split="validation", image_size=32))
  with pytest.raises(IndexError):
    source[5]
  result = shapes.benchmark_generation(4, image_size=32)
  assert result["num_scenes"] == 4 and result["scenes_per_s"] > 0
