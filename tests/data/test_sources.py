"""Raw image-text sources shared by tokenizer training and `mmjax prepare tokens`: a folder
without splits holds out its last images, tfds image-caption records become the raw schema, and a
source that cannot be opened is one line naming it."""

import numpy as np
import pytest

from mmjax.config import ConfigError
from mmjax.data import sources
from mmjax.data.shapes import records as shapes_records
from mmjax.data.shapes import world
from mmjax.errors import UserError
from tests.data.photo_folder import render, write_folder


def test_folder_without_validation_holds_out_its_last_images(tmp_path):
  root = write_folder(str(tmp_path / "photos"), num_train=6, num_val=0)
  found, described = sources.open_sources({"name": "folder", "folder": root, "image_size": 32},
                                          None, ("train", "validation"))
  assert list(found) == ["train"] and described["kind"] == "folder"
  split = sources.with_holdout(found, 2)
  assert len(split["train"]) == 4 and len(split["validation"]) == 2
  assert split["validation"][0]["id"] == found["train"][4]["id"]
  assert split["validation"][1]["rgb"].shape == (32, 32, 3)
  assert split["validation"].fields == ("rgb", "caption")
  assert found["train"].caption(0) == render(0)[1].encode()  # captions read without the image
  with pytest.raises(IndexError):
    split["validation"][2]
  assert sources.with_holdout(split, 2) == split  # a validation split is used as it is
  with pytest.raises(UserError, match="too few to hold some out"):
    sources.with_holdout({"train": sources.Subset(found["train"], 0, 1)}, 2)


def test_image_caption_records_become_the_raw_schema():
  rng = np.random.default_rng(0)
  records = [{"image": rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "image/id": np.int64(7),
              "captions": {"id": np.array([1, 2]), "text": np.array([b"a cat", b"a dog"])}},
             {"image": rng.integers(0, 256, (50, 30, 1), dtype=np.uint8), "image/id": np.int64(8),
              "captions": {"id": np.array([], np.int64), "text": np.array([], object)}}]
  source = sources.ImageTextSource(records, 16, caption_index=1)
  assert source.fields == ("rgb", "caption")
  first, grey = source[0], source[1]
  assert first["id"] == "7" and first["caption"] == b"a dog" and first["rgb"].shape == (16, 16, 3)
  assert "caption" not in grey and grey["rgb"].shape == (16, 16, 3)
  assert (grey["rgb"][..., 0] == grey["rgb"][..., 2]).all()  # grey replicated to RGB
  with pytest.raises(UserError, match="no image field"):
    sources.ImageTextSource([{"text": "x"}], 16)


def test_sources_that_cannot_be_opened_are_one_line(tmp_path):
  with pytest.raises(ConfigError, match="data.folder is empty"):
    sources.open_sources({"name": "folder", "folder": ""}, None, ("train",))
  with pytest.raises(UserError, match="does not exist"):
    sources.open_sources({"name": "folder", "folder": str(tmp_path / "nope")}, None, ("train",))
  with pytest.raises(UserError, match=r"^data.name 'no_such_dataset_xyz': no tfds dataset") as e:
    sources.open_sources({"name": "no_such_dataset_xyz", "data_dir": str(tmp_path)}, None,
                         ("train",))
  assert "\n" not in str(e.value)


def test_shapes_with_at_most_k_objects_keep_their_scene_indices(tmp_path):
  shapes_records.prepare_shapes(tmp_path, num_train=40, num_val=8, image_size=16, progress=False)
  data = {"name": "shapes", "data_dir": str(tmp_path), "image_size": 16}
  every, _ = sources.open_sources(data, None, ("train",))
  few, described = sources.open_sources(dict(data, max_objects=2), None, ("train",))
  assert described["max_objects"] == 2
  expected = [i for i in range(40)
              if world.generate_scene(i, image_size=16)["num_objects"] <= 2]
  assert 0 < len(expected) < 40 and len(every["train"]) == 40
  assert [int(few["train"][i]["index"]) for i in range(len(few["train"]))] == expected
