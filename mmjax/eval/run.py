"""`mmjax eval`: metrics and PNG grids of the latest checkpoint, by the config's objective.

  tokenizer  reconstruction quality on the validation scenes (PSNR / depth abs-rel / mIoU, codebook
             usage) and an originals-vs-reconstructions grid
  fourm      teacher-forced validation loss and accuracy per modality, then any-to-any generation
             on `num_scenes` validation scenes of the shapes data, scored exactly
             (`mmjax.eval.fourm_eval`), one grid per task
  decoder    teacher-forced validation loss and accuracy per modality, then caption <-> rgb
             generation scored the same way (`mmjax.eval.decoder_eval`)

Writes `<out_dir>/metrics.json` ({"objective", "step", "metrics", "grids", "samples", "bounds"
(4M on shapes: every generation metric's chance level and tokenizer ceiling), ...}) and the
grids beside it; returns the same summary.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

from mmjax import modalities, progress
from mmjax.data.pipeline.demo_tokens import use_demo_tokens_if_unset
from mmjax.errors import UserError
from mmjax.eval import shapes_generation, teacher_forced
from mmjax.objectives import tokenizer as tokenizer_objective
from mmjax.tokenizers import image_metrics
from mmjax.train.loop import load_model
from mmjax.train.objective import get_objective

METRICS_FILE = "metrics.json"


def _report(message: str) -> None:
  print(f"mmjax eval: {message}", file=sys.stderr, flush=True)


def run_eval(config: ml_collections.ConfigDict, workdir: str, *, out_dir: str,
             num_scenes: int = 32, seed: int = 0, max_val_batches: int = 32,
             grid_rows: int = 6, tasks: Sequence[str] | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir`; see the module docstring. `tasks` names the
  4M generation tasks to run (e.g. "rgb->caption"); None runs every one the config supports."""
  objective = config.get("objective", "")
  start = time.perf_counter()
  if objective == "tokenizer":
    result = _eval_tokenizer(config, workdir, out_dir, grid_rows)
  elif objective in ("fourm", "decoder"):
    use_demo_tokens_if_unset(config)
    result = _eval_tokens_model(config, workdir, out_dir, num_scenes=num_scenes, seed=seed,
                                max_val_batches=max_val_batches, grid_rows=grid_rows,
                                tasks=tasks)
  else:
    raise UserError(f"mmjax eval: config objective {objective!r} has no evaluation (use a 4M, "
                    "decoder or tokenizer config)")
  summary = {"objective": objective, "workdir": workdir, "num_scenes": num_scenes, **result,
             "seconds": time.perf_counter() - start}
  if jax.process_index() == 0:
    path = epath.Path(out_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, default=str))
    summary["metrics_file"] = os.fspath(path)
  return summary


def _eval_tokenizer(config, workdir: str, out_dir: str, grid_rows: int) -> dict[str, Any]:
  model, step = load_model(config, workdir)
  modality = model.cfg.modality
  images = tokenizer_objective.validation_images(config, modality)
  _report(f"tokenizer ({modality}) of step {step}: reconstructing {len(images)} validation images")
  metrics = image_metrics.evaluate_image_tokenizer(model, images,
                                                   batch_size=config.eval.batch_size)
  grid = tokenizer_objective.save_reconstruction_grid(
      os.path.join(out_dir, f"reconstructions_{modality}.png"), model,
      images[:max(grid_rows, config.eval.grid_images)])
  return {"step": step, "metrics": {f"recon/{k}": v for k, v in metrics.items()},
          "grids": {"reconstructions": grid}}


def _eval_tokens_model(config, workdir: str, out_dir: str, *, num_scenes: int, seed: int,
                       max_val_batches: int, grid_rows: int,
                       tasks: Sequence[str] | None) -> dict[str, Any]:
  model, step = load_model(config, workdir)
  objective = get_objective(config)
  _report(f"{config.objective} model of step {step}: teacher-forced validation metrics")
  metrics = teacher_forced.validation_metrics(objective, model, max_batches=max_val_batches,
                                              seed=seed)
  result: dict[str, Any] = {"step": step, "metrics": metrics, "grids": {}, "samples": {}}
  if num_scenes > 0:
    generated = _shapes_generation(config, model, out_dir, num_scenes=num_scenes, seed=seed,
                                  grid_rows=grid_rows, task_names=tasks)
    for key in ("metrics", "grids", "samples"):
      result[key].update(generated[key])
    result["generation_seconds"] = generated["seconds"]
    result["generation_note"] = generated.get("note", "")
    if generated.get("bounds"):
      result["bounds"] = generated["bounds"]
  return result


def _shapes_generation(config, model, out_dir: str, *, num_scenes: int, seed: int,
                      grid_rows: int, task_names: Sequence[str] | None) -> dict[str, Any]:
  """Any-to-any metrics on the first `num_scenes` validation records (shapes data only), with
  every metric's chance level and tokenizer ceiling under "bounds"."""
  setup = shapes_generation.ShapesGeneration.load(
      config, modalities.from_config(config.modalities), num_scenes=num_scenes,
      task_names=task_names)
  if isinstance(setup, str):
    _report(setup)
    return {"metrics": {}, "grids": {}, "samples": {}, "seconds": {}, "note": setup}
  _report(f"generation on {len(setup.records)} validation scenes: "
          + ", ".join(t.name for t in setup.tasks))
  generated = setup.run(model, out_dir=out_dir, seed=seed, grid_rows=grid_rows,
                        report=progress.status("mmjax eval"))
  generated["bounds"] = setup.bounds()
  return generated
