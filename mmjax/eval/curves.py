"""Learning curves: the generation metrics every K training steps, and their plot.

`config.eval.every_steps` = K > 0 (the section: `mmjax.defaults.training_eval`) makes `mmjax train`
(and the demo) run the shapes generation metrics of `mmjax eval` on `config.eval.num_scenes`
validation scenes every K steps and at the end
(`TrainingEval`, called by the training loop with the current model). The metrics go to the run's
metrics.jsonl and TensorBoard like the losses; the chance level and tokenizer ceiling of every
metric (`mmjax.eval.bounds`) go to `<workdir>/bounds.json` once; at the end `curves.png` shows each
headline metric against steps, with its chance and ceiling as horizontal lines, beside the loss.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax
from etils import epath

from mmjax import modalities, paths
from mmjax.config import ConfigError
from mmjax.eval import shapes_generation
from mmjax.train.metrics import read_jsonl

BOUNDS_FILE = "bounds.json"
CURVES_FILE = "curves.png"
# The metric of each task kind that the curves show, and whether higher is better.
HEADLINE = ("attr_acc", "f1", "miou", "abs_rel")


class TrainingEval:
  """The training loop's evaluation hook: `every_steps`, `__call__(step, model) -> metrics` and
  `finish() -> path of curves.png`."""

  def __init__(self, config, workdir: str):
    section = config.eval
    self.config, self.workdir = config, workdir
    self.every_steps = int(section.every_steps)
    self.num_scenes = int(section.num_scenes)
    self.grid_rows = int(section.get("grid_rows", 4))
    tasks = [t.strip() for t in str(section.get("tasks", "")).split(",") if t.strip()]
    self.task_names = tasks or None
    self._setup = None

  def __call__(self, step: int, model) -> dict[str, float]:
    if self._setup is None:
      self._setup = shapes_generation.ShapesGeneration.load(
          self.config, modalities.from_config(self.config.modalities),
          num_scenes=self.num_scenes, task_names=self.task_names)
      if isinstance(self._setup, str):
        print(f"mmjax train: {self._setup}", file=sys.stderr, flush=True)
      else:
        (epath.Path(self.workdir) / BOUNDS_FILE).write_text(
            json.dumps(self._setup.bounds(), indent=1))
    if isinstance(self._setup, str):
      return {}
    out_dir = epath.Path(self.workdir) / "eval" / f"step_{step}"
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = self._setup.run(model, out_dir=os.fspath(out_dir), grid_rows=self.grid_rows)
    return {k: float(v) for k, v in generated["metrics"].items() if not k.endswith("/scenes")}

  def finish(self) -> str | None:
    return plot_curves(self.workdir)


def make_training_eval(config, workdir: str) -> TrainingEval | None:
  """The hook `config.eval.every_steps` asks for, or None (off, or not a 4M config)."""
  section = config.get("eval")
  if (config.get("objective") not in ("fourm", "decoder") or section is None
      or not section.get("every_steps")):
    return None
  if jax.process_count() > 1:
    raise ConfigError("config key 'eval.every_steps': evaluation during training runs on one "
                      "process only; set it to 0 and run `mmjax eval` on the checkpoints")
  return TrainingEval(config, workdir)


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
  return [(r["step"], r[key]) for r in records
          if isinstance(r.get(key), float) and math.isfinite(r[key])]


def plot_curves(workdir: str) -> str | None:
  """`<workdir>/curves.png`: the loss, then each headline generation metric against steps with
  its chance level and tokenizer ceiling (from bounds.json) as lines; None without metrics."""
  records = read_jsonl(epath.Path(workdir) / "metrics.jsonl")
  keys = sorted({k for r in records for k in r
                 if k.startswith("gen/") and k.rsplit("/", 1)[-1] in HEADLINE})
  if not keys:
    return None
  bounds_path = epath.Path(workdir) / BOUNDS_FILE
  bounds = (json.loads(bounds_path.read_text()) if bounds_path.is_file()
            else {"ceiling": {}, "chance": {}})
  # Late: matplotlib takes a second to import and only the plot needs it.
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  cols = min(3, len(keys) + 1)
  rows = -(-(len(keys) + 1) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  flat = axes.reshape(-1)
  for key in ("loss", "eval/loss"):
    points = _series(records, key)
    if points:
      flat[0].plot(*zip(*points), label=key, marker="o" if key.startswith("eval") else None)
  flat[0].set_yscale("log")
  flat[0].set_title("loss")
  flat[0].legend(fontsize=7)
  for ax, key in zip(flat[1:], keys):
    points = _series(records, key)
    if points:
      ax.plot(*zip(*points), marker="o", label="model")
    for name, style in (("ceiling", "--"), ("chance", ":")):
      value = bounds.get(name, {}).get(key)
      if value is not None:
        ax.axhline(value, linestyle=style, color="grey" if name == "chance" else "green",
                   label=f"{name} {value:.3g}")
    ax.set_title(key.removeprefix("gen/"), fontsize=9)
    ax.legend(fontsize=7)
  for ax in flat:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in flat[len(keys) + 1:]:
    ax.axis("off")
  fig.tight_layout()
  out = paths.save_figure(fig, epath.Path(workdir) / CURVES_FILE, dpi=90)
  plt.close(fig)
  return out
