"""Where a generation metric can sit: its chance level and its tokenizer ceiling.

Both are scored by the same code as the model's generations (`fourm_eval.Scorer`), on the same
validation scenes, under the same metric names (`gen/<task>/<metric>`):

  ceiling  the target's ground-truth tokens (the record's own), decoded by the target's tokenizer:
           the best any model that predicts tokens can score. For rgb targets it also includes the
           analytic object detector's own errors; text and boxes measure the text tokenizer's
           round trip.
  chance   the ground truth of another scene (scene i is scored against scene i + 1's caption,
           boxes, class map, depth or image): what a model that ignores its input but produces
           perfect samples of the data scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax.eval import fourm_eval

BOUNDS_FILE = "bounds.json"


def _ground_truth(task: fourm_eval.Task, scene: Mapping[str, Any]) -> dict[str, Any]:
  """A scene's ground truth of a task's target, in the form its tokenizer decodes to."""
  if task.kind == "det":
    return {"det_boxes": scene["det_boxes"], "det_classes": scene["det_classes"]}
  field = {"caption": "caption", "semseg": "semseg", "depth": "depth", "rgb": "rgb"}[task.kind]
  return {field: scene[field]}


def bounds(records: Sequence[Mapping[str, Any]], scenes: Sequence[Mapping[str, Any]],
           tokenizers: Mapping[str, Any],
           tasks: Sequence[fourm_eval.Task]) -> dict[str, dict[str, float]]:
  """{"ceiling": metrics, "chance": metrics} of every task over the records (see the module
  docstring); `tokenizers` maps each target to its `ModalityTokenizer`."""
  out: dict[str, dict[str, float]] = {"ceiling": {}, "chance": {}}
  n = len(records)
  for task in tasks:
    ceiling, chance = fourm_eval.Scorer(task, 0), fourm_eval.Scorer(task, 0)
    ids = [np.asarray(r[task.target], np.int32) for r in records]
    for i, decoded in enumerate(tokenizers[task.target].decode_batch(ids)):
      ceiling.add(decoded, scenes[i])
      chance.add(_ground_truth(task, scenes[(i + 1) % n]), scenes[i])
    out["ceiling"].update(ceiling.metrics())
    out["chance"].update(chance.metrics())
  return out
