"""Chance levels and tokenizer ceilings of the shapes generation metrics."""

import numpy as np

from mmjax.data.shapes import world as shapes
from mmjax.eval import bounds, fourm_eval


class _LookupTokenizer:
  """Decodes a record's 'token' (the scene index) to that scene's ground truth, optionally
  corrupted: a stand-in for a trained tokenizer of known quality."""

  def __init__(self, scenes, decode):
    self.scenes, self.decode = scenes, decode

  def decode_batch(self, ids):
    return [self.decode(self.scenes[int(i[0])]) for i in ids]


def _setup(n=24):
  scenes = [shapes.generate_scene(i, split="validation") for i in range(n)]
  records = [{"caption": np.array([i]), "det": np.array([i]), "tok_semseg": np.array([i])}
             for i in range(n)]
  return scenes, records


def test_a_lossless_tokenizer_reaches_the_ceiling_and_chance_stays_far_below():
  scenes, records = _setup()
  tasks = [fourm_eval.Task("rgb", "caption", "caption"), fourm_eval.Task("rgb", "det", "det"),
           fourm_eval.Task("rgb", "tok_semseg", "semseg")]
  toks = {"caption": _LookupTokenizer(scenes, lambda s: {"caption": s["caption"]}),
          "det": _LookupTokenizer(scenes, lambda s: {"det_boxes": s["det_boxes"],
                                                     "det_classes": s["det_classes"]}),
          "tok_semseg": _LookupTokenizer(scenes, lambda s: {"semseg": s["semseg"]})}
  out = bounds.bounds(records, scenes, toks, tasks)
  ceiling, chance = out["ceiling"], out["chance"]
  assert ceiling["gen/rgb->caption/attr_acc"] == 1.0 and ceiling["gen/rgb->caption/exact"] == 1.0
  assert ceiling["gen/rgb->det/f1"] == 1.0 and ceiling["gen/rgb->tok_semseg/miou"] == 1.0
  # Another scene's truth: sizes agree half the time, the rest rarely; boxes almost never.
  assert 0.1 < chance["gen/rgb->caption/attr_acc"] < 0.4
  assert chance["gen/rgb->caption/exact"] == 0.0
  assert chance["gen/rgb->det/f1"] < 0.1
  assert chance["gen/rgb->tok_semseg/miou"] < 0.4


def test_a_lossy_tokenizer_lowers_the_ceiling():
  scenes, records = _setup()
  task = fourm_eval.Task("rgb", "tok_semseg", "semseg")
  blank = _LookupTokenizer(scenes, lambda s: {"semseg": np.zeros_like(s["semseg"])})
  out = bounds.bounds(records, scenes, {"tok_semseg": blank}, [task])
  assert out["ceiling"]["gen/rgb->tok_semseg/miou"] < 0.2
