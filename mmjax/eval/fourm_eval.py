"""Any-to-any generation metrics of a 4M model on validation scenes of the shapes data.

For N validation records of the pre-tokenized dataset, each task conditions on one modality and
generates another with the 4M samplers (`mmjax.generate.fourm`), decodes the tokens with the
trained tokenizers and scores the result against the scene's exact ground truth
(`mmjax.eval.shapes_metrics`):

  rgb -> caption     caption attribute accuracy (size, colour, shape, position), exact scenes
  rgb -> det         box F1 / precision / recall at IoU 0.5
  rgb -> tok_semseg  pixel accuracy and mIoU of the decoded class map
  rgb -> tok_depth   mean absolute relative error of the decoded depth
  caption -> tok_rgb attribute accuracy of the objects read off the decoded image

"rgb" is the config's raw-pixel modality (or the rgb tokens without one); tasks whose modalities the
config lacks are left out. The ground truth is the scene itself, regenerated from the record's index
and the data's seed (checked against the record's caption). Sampler settings come from
`config.generate` (`mmjax.generate.fourm_settings`; defaults without one).
Each task writes a PNG grid (input | generated | ground truth) of the first scenes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mmjax import grids
from mmjax import modalities as mod
from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError
from mmjax.eval import shapes_metrics as sm
from mmjax.generate import fourm as fourm_generate
from mmjax.generate import fourm_settings
from mmjax.tokenizers import image_metrics


@dataclasses.dataclass(frozen=True)
class Task:
  """Generate `target` from `source`; `kind` says how the output is scored."""
  source: str
  target: str
  kind: str  # "caption", "det", "semseg", "depth" or "rgb"

  @property
  def name(self) -> str:
    return f"{self.source}->{self.target}"


def _find(registry: mod.Registry, kind: str, source: str) -> str | None:
  for m in registry:
    if m.kind == kind and m.source == source:
      return m.name
  return None


def shapes_tasks(registry: mod.Registry) -> list[Task]:
  """The any-to-any tasks the registry supports (see the module docstring)."""
  rgb_in = (_find(registry, mod.IMAGE_PIXELS, "rgb")
            or _find(registry, mod.IMAGE_TOKENS, "rgb"))
  caption = _find(registry, mod.SEQUENCE, "caption")
  wanted = [(rgb_in, caption, "caption"), (rgb_in, _find(registry, mod.SEQUENCE, "det"), "det"),
            (rgb_in, _find(registry, mod.IMAGE_TOKENS, "semseg"), "semseg"),
            (rgb_in, _find(registry, mod.IMAGE_TOKENS, "depth"), "depth"),
            (caption, _find(registry, mod.IMAGE_TOKENS, "rgb"), "rgb")]
  return [Task(s, t, k) for s, t, k in wanted if s and t and s != t]


# ---------------------------------------------------------------------------------------------
# Scenes and records.


def ground_truth_scenes(records: Sequence[Mapping[str, Any]], seed: int,
                        image_size: int) -> list[dict]:
  """The shapes scene of every validation record, checked against the record's caption."""
  scenes = []
  for record in records:
    scene = shapes.generate_scene(int(record["index"]), seed=seed, split="validation",
                                  image_size=image_size)
    caption = record.get("gt_caption")
    if isinstance(caption, bytes):
      caption = caption.decode()
    if caption is not None and caption != scene["caption"]:
      raise UserError(f"validation record {int(record['index'])} does not match shapes scene "
                      f"{int(record['index'])} of seed {seed} (captions differ): set data.seed to "
                      f"the seed the shapes data was prepared with")
    scenes.append(scene)
  return scenes


def _condition(sampler, layout, registry: mod.Registry, name: str,
               records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """The encoder input of a batch with modality `name` known (from the records)."""
  ctx = layout.empty(len(records))
  m = registry[name]
  if m.kind == mod.IMAGE_PIXELS:
    return layout.with_pixels(ctx, name, np.stack([np.asarray(r[name]) for r in records]))
  if m.is_sequence:
    ids = [np.asarray(r[name], np.int64).tolist() for r in records]
    return layout.with_tokens(ctx, name, *sampler.sequence_input(name, ids))
  return layout.with_tokens(ctx, name, np.stack([np.asarray(r[name], np.int32) for r in records]))


# ---------------------------------------------------------------------------------------------
# Scoring and drawing of each output kind.


class Scorer:
  """Accumulates one task's scores; `rows` keeps what the grid shows of the first scenes."""

  def __init__(self, task: Task, grid_rows: int):
    self.task, self.grid_rows = task, grid_rows
    self.objects, self.boxes = sm.ObjectScores(), sm.BoxCounts()
    self.confusion = np.zeros((sm.NUM_SEMSEG_CLASSES,) * 2, np.int64)
    self.abs_rel: list[float] = []
    self.rows: list[list[np.ndarray]] = []
    self.titles: list[str] = []
    self.samples: list[str] = []

  def add(self, decoded: Mapping[str, Any], scene: Mapping[str, Any]) -> None:
    kind, keep = self.task.kind, len(self.rows) < self.grid_rows
    rgb = scene["rgb"]
    if kind == "caption":
      text = decoded["caption"]
      self.objects += sm.score_caption(text, scene)
      self.samples.append(text)
      row, title = [rgb], f"gen: {printable(text)}\ntrue: {scene['caption']}"
    elif kind == "det":
      classes = np.asarray(decoded["det_classes"]).reshape(-1)
      self.boxes += sm.score_boxes(decoded["det_boxes"], classes, scene)
      names = [shapes.SHAPES[c] for c in classes]
      self.samples.append(", ".join(names))
      row = [rgb, grids.draw_boxes(rgb, decoded["det_boxes"]),
             grids.draw_boxes(rgb, scene["det_boxes"])]
      title = "gen: " + (", ".join(names) or "(no boxes)")
    elif kind == "semseg":
      self.confusion += sm.semseg_confusion(decoded["semseg"], scene)
      row = [rgb, grids.to_rgb(decoded["semseg"], "classes"),
             grids.to_rgb(scene["semseg"], "classes")]
      title = ""
    elif kind == "depth":
      self.abs_rel.append(image_metrics.depth_abs_rel(decoded["depth"], scene["depth"]))
      both = grids.to_rgb(np.concatenate([decoded["depth"], scene["depth"]], axis=1), "depth")
      width = scene["depth"].shape[1]
      row, title = [rgb, both[:, :width], both[:, width:]], ""
    else:
      self.objects += sm.score_image(decoded["rgb"], scene)
      row, title = [decoded["rgb"], rgb], scene["caption"]
    if keep:
      self.rows.append(row)
      self.titles.append(title)

  def metrics(self) -> dict[str, float]:
    prefix, kind = f"gen/{self.task.name}", self.task.kind
    if kind in ("caption", "rgb"):
      return self.objects.rates(prefix)
    if kind == "det":
      return self.boxes.rates(prefix)
    if kind == "semseg":
      return sm.semseg_rates(self.confusion, prefix)
    return {f"{prefix}/abs_rel": float(np.mean(self.abs_rel)) if self.abs_rel else 0.0}

  def save_grid(self, out_dir: str) -> str | None:
    if not self.rows:
      return None
    columns = {"caption": ("input rgb",), "det": ("input rgb", "generated boxes", "true boxes"),
               "semseg": ("input rgb", "generated", "ground truth"),
               "depth": ("input rgb", "generated", "ground truth"),
               "rgb": ("generated", "ground truth")}[self.task.kind]
    name = self.task.name.replace("->", "_to_")
    return grids.save_grid(os.path.join(out_dir, f"{name}.png"), self.rows,
                           column_titles=columns, row_titles=self.titles)


# ---------------------------------------------------------------------------------------------
# The evaluation.


def printable(text: str, limit: int = 120) -> str:
  """Generated text for a plot title: control characters shown as '?', cut at `limit`."""
  text = "".join(c if c.isprintable() else "?" for c in text)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _batches(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield list(range(start, min(start + batch_size, n)))


def generation_metrics(model, registry: mod.Registry, records: Sequence[Mapping[str, Any]],
                       scenes: Sequence[Mapping[str, Any]], tokenizers: Mapping[str, Any], *,
                       num_sentinels: int, generate_config: Mapping[str, Any] | None,
                       out_dir: str, seed: int = 0, batch_size: int = 16, grid_rows: int = 6,
                       tasks: Sequence[Task] | None = None,
                       report: Callable[[str, bool], None] | None = None) -> dict[str, Any]:
  """Runs every task over the records; returns {"metrics", "grids", "samples", "seconds"}.

  `tokenizers`: modality name -> `ModalityTokenizer` of every target (decoding, vocab limits).
  Every batch has `batch_size` rows (the last one padded by repetition): one compile per task.
  `report(message, task_done)` hears of every batch.
  """

  tasks = shapes_tasks(registry) if tasks is None else list(tasks)
  limits = {t.target: tokenizers[t.target].vocab_size for t in tasks}
  sampler = fourm_generate.FourMSampler(model, num_sentinels=num_sentinels, vocab_limits=limits)
  known = [m.name for m in registry]
  settings = fourm_settings.target_settings(generate_config or {}, [t.target for t in tasks],
                                            known)
  batch_size = max(1, min(batch_size, len(records)))
  rng = jax.random.key(seed)
  out: dict[str, Any] = {"metrics": {}, "grids": {}, "samples": {}, "seconds": {}}
  for task in tasks:
    start = time.perf_counter()
    layout = fourm_generate.EncoderLayout(registry, (task.source, task.target))
    scorer = Scorer(task, grid_rows)
    for indices in _batches(len(records), batch_size):
      rows = indices + [indices[-1]] * (batch_size - len(indices))
      ctx = _condition(sampler, layout, registry, task.source, [records[i] for i in rows])
      rng, key = jax.random.split(rng)
      if registry[task.target].is_sequence:
        result = sampler.sequence(layout, ctx, task.target, settings[task.target], key)
        decoded = tokenizers[task.target].decode_batch(
            [np.asarray(r, np.int32) for r in result.ids[:len(indices)]])
      else:
        result = sampler.image(layout, ctx, task.target, settings[task.target], key)
        decoded = tokenizers[task.target].decode_batch(list(result.tokens[:len(indices)]))
      for i, d in zip(indices, decoded):
        scorer.add(d, scenes[i])
      if report:
        report(f"{task.name}: {indices[-1] + 1}/{len(records)} scenes "
               f"({time.perf_counter() - start:.0f} s)", indices[-1] + 1 == len(records))
    out["metrics"].update(scorer.metrics())
    out["grids"][task.name] = scorer.save_grid(out_dir)
    if scorer.samples:
      out["samples"][task.name] = scorer.samples[:grid_rows]
    out["seconds"][task.name] = time.perf_counter() - start
  return out
