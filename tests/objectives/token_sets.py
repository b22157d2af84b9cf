"""Helpers of the objective data tests: a text-only corpus and tampered copies of token sets."""

import json
import os
import shutil

from mmjax.data.shapes import world as shapes
from mmjax.data.tokens import records as tokens_tfds


class Captions:
  """Scenes reduced to their captions: a text corpus."""

  def __init__(self, n):
    self.base = shapes.SceneSource(n, split="train")

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    return {"caption": self.base[i]["caption"]}


def tampered(data_dir, tmp_path, name="shapes", **metadata):
  """A copy of token set `name` in tmp_path whose metadata.json has `metadata` merged in."""
  src = os.path.join(data_dir, tokens_tfds.NAME, name)
  shutil.copytree(src, os.path.join(tmp_path, tokens_tfds.NAME, name))
  path = os.path.join(tokens_tfds.dataset_dir(tmp_path, name), "metadata.json")
  meta = tokens_tfds.read_json(path)
  for key, value in metadata.items():
    meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
  with open(path, "w") as f:
    json.dump(meta, f)
  return str(tmp_path)
