"""`mmjax demo`: the whole pipeline on the embedded shapes data, on CPU, in minutes.

The stages, and the commands each one equals (W = --workdir, T = W/tokens):

  1 data        mmjax prepare shapes --out W/data --num-train N --num-val M
  2 text        mmjax tokenizer train --config configs/tokenizers/shapes_text.py
                    --workdir T/tokenizers/shapes_text
  3 image toks  mmjax tokenizer train
                    --config configs/tokenizers/shapes_{rgb,depth,semseg}.py:runlocal
                    --workdir T/tokenizers/shapes_{rgb,...} --config.train.steps=S
                    (S: 2000 for rgb, 1000 for depth and semseg)
  4 tokens      mmjax prepare tokens --config configs/tokens/shapes.py:tokenizers=runlocal
                    --config.data.data_dir=W/data --config.data.max_objects=2 --workdir T
  5 4M          mmjax train --config configs/fourm/shapes.py:tiny,tokenizers=runlocal
                    --config.data.data_dir=T --workdir W/fourm (the overrides of `fourm_config`;
                    eval.every_steps writes learning curves, W/fourm/curves.png)
  6 eval        mmjax eval (same config) --workdir W/fourm: metrics + grids in W/fourm/eval, with
                    every metric's chance level and tokenizer ceiling
  7 sample      mmjax generate ... --workdir W/fourm --input caption="..." --target tok_rgb
                    --target det (chained: the caption gives rgb tokens, both give boxes)
  report        W/report.md: the metrics table (model, chance, ceiling), stage times, the PNGs

`--model decoder` runs stages 5-7 with the tiny mixed-modal decoder (configs/decoder/shapes.py)
in W/decoder instead, and writes W/report_decoder.md; stages 1-4 are shared.

Every stage skips work that is done (finished tokenizers, shards and checkpoints are reused; a
training run resumes), so re-running the demo continues where it stopped. `quick` settings shrink
everything for a smoke test.

Why these sizes (measured on 200 validation scenes): the caption->rgb metric can never exceed what
the rgb tokenizer's reconstructions of the true images score. After the former 300 steps of the
runlocal rgb tokenizer that ceiling was 0.33 attribute accuracy, next to a chance level of 0.24
(so no model could show caption->rgb learning); after 2000 steps (89 s at a load average of ~8)
it is 0.81 with 1024 codes (0.70 with the 128 it has now), above the full-size tokenizer's after
1000 steps (0.79, 8x the compute per step).
Depth and semseg tokenizers at 1000 steps: ceilings abs-rel 0.053 and mIoU 0.77 (0.086 and 0.60
at 300 steps).

The models see scenes of at most 2 objects (data.max_objects; the tokenizers train on all): in the
runs the README lists, a 4M tiny model reads their captions at attribute accuracy 0.40-0.42 after
750-1000 steps (chance 0.24) and the decoder at 0.51 after 800; on 1-4-object scenes 4M reached
0.40 only at step 900. The rgb tokenizer has 128 codes (runlocal): with 1024 the background's noise
took 480 codes and kept 4M's rgb-token accuracy at 0.004. The decoder's caption->rgb reaches 0.35
(chance 0.24, ceiling 0.73); 4M's stays at chance within a thousand steps (README, "Does it learn?").
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

from mmjax import config as mmconfig
from mmjax import grids, pretokenize
from mmjax.data.shapes import records as shapes_records
from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError
from mmjax.eval import curves
from mmjax.eval import run as eval_run
from mmjax.generate import run as generate_run
from mmjax.objectives import text_tokenizer, tokenizer
from mmjax.tokenizers.modality import TRAINED_INFO, resolve_config_path
from mmjax.train import loop

IMAGE_TOKENIZERS = ("rgb", "depth", "semseg")
MODELS = {"fourm": "4M", "decoder": "decoder"}  # --model: its label in stage names
TOKENIZER_ARG = "runlocal"  # the small image tokenizers; their config argument


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """Sizes of the demo's stages (chosen by measurement: see the module docstring)."""
  num_train: int = 5000         # shapes scenes in the train split (all train the tokenizers)
  num_val: int = 300            # and in the validation split
  max_objects: int = 2          # the models see the scenes with at most this many objects
  text_scenes: int = 2000       # scenes whose captions and boxes train the text tokenizer
  tokenizer_steps: int = 1000   # steps of the depth and semseg tokenizers (runlocal size)
  rgb_tokenizer_steps: int = 2000  # the rgb tokenizer's: it bounds caption->rgb (300 steps: 0.33)
  fourm_steps: int = 1000       # steps of the 4M tiny model
  fourm_batch: int = 16
  fourm_lr: float = 1e-3
  # Components of "4m21" (all->all at alpha 0.01, 0.1, 1, 10; rgb->all; caption biased): one
  # third each of all->all at 1, rgb->all and caption->all. Adding a caption->tok_rgb direction
  # ("all2all+rgb2all+caption->tok_rgb") did worse on 2-object scenes at step 500: caption->rgb
  # 0.03 against 0.14, rgb->caption 0.27 against 0.31.
  mixture: str = "4m21"
  mixture_weights: tuple[float, ...] = (0, 0, 1, 0, 1, 1)
  eval_every: int = 250         # validation loss and learning-curve points during training
  curve_scenes: int = 32        # validation scenes of each learning-curve point
  curve_tasks: str = "rgb->caption,caption->tok_rgb"  # tasks of the learning curves
  eval_scenes: int = 32         # validation scenes of the final any-to-any generation metrics
  eval_tasks: tuple[str, ...] | None = None  # generation tasks to score; None = all
  model: str = "fourm"          # "fourm" or "decoder" (the mixed-modal decoder on the same tokens)
  decoder_steps: int = 800      # steps of the tiny decoder
  decoder_batch: int = 8        # packed rows of 256 tokens (~2.7 records each)
  decoder_lr: float = 1e-3
  quick: bool = False           # smoke-test sizes (seconds of work; metrics meaningless)
  reference: bool = False       # 4M trains with configs/fourm/shapes.py:reference's own sizes

  @classmethod
  def quick_settings(cls) -> DemoSettings:
    # 96 validation scenes, about half of them with at most 2 objects: the decoder packs those
    # into enough rows for one batch of 8.
    return cls(num_train=96, num_val=96, text_scenes=200, tokenizer_steps=2,
               rgb_tokenizer_steps=2, fourm_steps=2, fourm_batch=8, eval_every=2,
               curve_scenes=2, curve_tasks="rgb->caption", eval_scenes=2,
               eval_tasks=("rgb->caption", "caption->tok_rgb"), decoder_steps=2,
               decoder_batch=8, quick=True)

  @classmethod
  def reference_settings(cls) -> DemoSettings:
    """The reference run: 4x the scenes, tokenizers trained 2-3x longer, and 4M with the sizes of
    configs/fourm/shapes.py:reference (the fourm_* and curve fields here are not used)."""
    return cls(num_train=20000, num_val=1000, tokenizer_steps=3000, rgb_tokenizer_steps=4000,
               eval_scenes=200, reference=True)


def _say(message: str) -> None:
  print(f"mmjax demo: {message}", flush=True)


def _config(spec: str, overrides: dict[str, Any]):
  path, sep, arg = spec.partition(":")
  return mmconfig.load(resolve_config_path(path) + sep + arg,
                       [f"--config.{k}={v}" for k, v in overrides.items()])


class _Stages:
  """Runs stages in order, timing each and collecting the summary."""

  def __init__(self):
    self.timings: dict[str, float] = {}
    self.figures: dict[str, Any] = {}
    self.pngs: dict[str, str] = {}

  def run(self, name: str, fn, *args, **kwargs):
    _say(f"[{len(self.timings) + 1}] {name}")
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    self.timings[name] = time.perf_counter() - start
    return result


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _prepare_shapes(data_dir: str, s: DemoSettings) -> dict[str, Any]:
  try:
    return shapes_records.prepare_shapes(data_dir, num_train=s.num_train, num_val=s.num_val,
                                         seed=0, image_size=64, progress=True)
  except ValueError as e:
    raise UserError(f"demo: {e}") from None


def _text_tokenizer(workdir: str, s: DemoSettings) -> dict[str, Any]:
  report = _read_json(os.path.join(workdir, "text_tokenizer.json"))
  if report and os.path.isfile(os.path.join(workdir, "text.model")):
    _say(f"text tokenizer in {workdir} exists; skipped")
    return report

  config = _config("configs/tokenizers/shapes_text.py",
                   {"num_train_scenes": s.text_scenes, "num_val_scenes": min(200, s.text_scenes)})
  return text_tokenizer.run_text_tokenizer_train(config, workdir)


def _image_tokenizer(modality: str, workdir: str, s: DemoSettings) -> dict[str, Any]:
  steps = s.rgb_tokenizer_steps if modality == "rgb" else s.tokenizer_steps
  config = _config(f"configs/tokenizers/shapes_{modality}.py:{TOKENIZER_ARG}",
                   {"train.steps": steps, "data.num_train": s.num_train,
                    "train.checkpoint_every": steps, "train.log_every": max(1, steps // 5)})
  report = _read_json(os.path.join(workdir, "tokenizer_eval.json"))
  if report and report.get("steps") == steps:
    _say(f"{modality} tokenizer in {workdir} exists; skipped")
    if not os.path.isfile(os.path.join(workdir, TRAINED_INFO)):  # trained before it was recorded
      tokenizer.run_write_info(config, workdir)
    return report
  return tokenizer.run_image_tokenizer_train(config, workdir)["tokenizer_eval"]


def fourm_config(workdir: str, s: DemoSettings):
  """The demo's 4M config (4M tiny on the demo's tokens)."""
  tokens = os.path.join(workdir, "tokens")
  if s.reference:
    return _config(f"configs/fourm/shapes.py:tiny,reference,tokenizers={TOKENIZER_ARG}",
                   {"data.data_dir": tokens})
  return _config(f"configs/fourm/shapes.py:tiny,tokenizers={TOKENIZER_ARG}", {
      "data.data_dir": tokens,
      "train.steps": s.fourm_steps, "train.batch_size": s.fourm_batch, "train.lr": s.fourm_lr,
      "train.warmup_steps": max(1, s.fourm_steps // 10), "train.eval_every": s.eval_every,
      "train.checkpoint_every": s.eval_every, "train.log_every": max(1, s.fourm_steps // 20),
      "train.eval_batches": 2, "masking.mixture": s.mixture,
      "masking.mixture_weights": tuple(s.mixture_weights),
      "eval.every_steps": s.eval_every, "eval.num_scenes": s.curve_scenes,
      "eval.tasks": s.curve_tasks})


def decoder_config(workdir: str, s: DemoSettings):
  """The demo's decoder config (the tiny mixed-modal decoder on the demo's tokens)."""
  return _config(f"configs/decoder/shapes.py:tiny,tokenizers={TOKENIZER_ARG}", {
      "data.data_dir": os.path.join(workdir, "tokens"),
      "train.steps": s.decoder_steps, "train.batch_size": s.decoder_batch,
      "train.lr": s.decoder_lr, "train.warmup_steps": max(1, s.decoder_steps // 10),
      "train.eval_every": s.eval_every, "train.checkpoint_every": s.eval_every,
      "train.log_every": max(1, s.decoder_steps // 20), "train.eval_batches": 2,
      "eval.every_steps": s.eval_every, "eval.num_scenes": s.curve_scenes,
      "eval.tasks": s.curve_tasks.replace("rgb->caption", "tok_rgb->caption")})


def _decoder_tasks(tasks):
  """The demo's task names for the decoder, whose image input is the rgb tokens."""
  return None if tasks is None else tuple(t.replace("rgb->caption", "tok_rgb->caption")
                                          for t in tasks)


def _train_losses(metrics_file: str) -> tuple[float | None, float | None]:
  """The first and last training loss in a metrics.jsonl."""
  losses = []
  if os.path.isfile(metrics_file):
    with open(metrics_file) as f:
      for line in f:
        row = json.loads(line)
        if "loss" in row:
          losses.append(row["loss"])
  return (losses[0], losses[-1]) if losses else (None, None)


def _evaluate(config, fourm_dir: str, s: DemoSettings) -> dict[str, Any]:
  out_dir = os.path.join(fourm_dir, "eval")
  previous = _read_json(os.path.join(out_dir, eval_run.METRICS_FILE))
  steps = int(config.train.steps)
  if previous and previous.get("step") == steps and previous.get(
      "num_scenes") == s.eval_scenes:
    _say(f"evaluation of step {steps} in {out_dir} exists; skipped")
    return previous
  tasks = _decoder_tasks(s.eval_tasks) if config.objective == "decoder" else s.eval_tasks
  summary = eval_run.run_eval(config, fourm_dir, out_dir=out_dir, num_scenes=s.eval_scenes,
                              grid_rows=min(6, s.eval_scenes), tasks=tasks)
  return summary


SAMPLE_CAPTION = "a large red circle in the center and a small blue square in the top left"


def _sample(config, fourm_dir: str, s: DemoSettings) -> dict[str, Any]:
  """caption -> rgb tokens -> boxes (chained), as `mmjax generate` does."""

  out_dir = os.path.join(fourm_dir, "sample")
  previous = _read_json(os.path.join(out_dir, "summary.json"))
  if previous and previous.get("step") == int(config.train.steps):
    _say(f"sample of step {config.train.steps} in {out_dir} exists; skipped")
    return previous
  targets = ["tok_rgb"] if config.objective == "decoder" else ["tok_rgb", "det"]
  return generate_run.run_generate(config, fourm_dir, {"caption": SAMPLE_CAPTION}, targets,
                                   out_dir=out_dir, seed=0)


def run_demo(workdir: str, settings: DemoSettings) -> dict[str, Any]:
  """Runs (or resumes) every stage; prints progress and a summary; returns the summary."""

  start = time.perf_counter()
  s = settings
  stages = _Stages()
  data_dir = os.path.join(workdir, "data")
  tokens_dir = os.path.join(workdir, "tokens")
  tokenizers_dir = os.path.join(tokens_dir, "tokenizers")
  if s.model not in MODELS:
    raise UserError(f"demo: --model must be one of {', '.join(MODELS)}, got {s.model!r}")
  label = MODELS[s.model]
  fourm_dir = os.path.join(workdir, s.model)  # the trained model's workdir

  shapes_summary = stages.run("shapes data", _prepare_shapes, data_dir, s)
  stages.figures["scenes"] = shapes_summary["splits"]
  stages.pngs["shapes preview"] = _preview(workdir, s.max_objects)

  text = stages.run("text tokenizer", _text_tokenizer,
                    os.path.join(tokenizers_dir, "shapes_text"), s)
  stages.figures["text tokenizer"] = {k: text.get(k) for k in (
      "vocab_size", "caption_round_trip", "det_round_trip")}
  for modality in IMAGE_TOKENIZERS:
    report = stages.run(f"{modality} tokenizer", _image_tokenizer, modality,
                        os.path.join(tokenizers_dir, f"shapes_{modality}"), s)
    stages.figures[f"{modality} tokenizer"] = {
        k: v for k, v in report.items() if k in ("psnr", "depth_abs_rel", "miou", "codes_used")}
    stages.pngs[f"{modality} reconstructions"] = os.path.join(
        tokenizers_dir, f"shapes_{modality}", "reconstructions.png")

  tokens_config = _config(f"configs/tokens/shapes.py:tokenizers={TOKENIZER_ARG}",
                          {"data.data_dir": data_dir, "data.max_objects": s.max_objects})
  tokens = stages.run("pre-tokenize", pretokenize.run_prepare_tokens, tokens_config, tokens_dir)
  stages.figures["tokens"] = {split: v["records"] for split, v in tokens["splits"].items()}

  config = (decoder_config if s.model == "decoder" else fourm_config)(workdir, s)
  trained = stages.run(f"{label} training", loop.run_train, config, fourm_dir,
                       evaluator=curves.make_training_eval(config, fourm_dir))
  first, last = _train_losses(os.path.join(fourm_dir, "metrics.jsonl"))
  stages.figures[label] = {"steps": trained.get("step"), "loss_first": first, "loss_last": last,
                           **{k: v for k, v in (trained.get("eval") or {}).items()
                              if k in ("eval/loss",)}}
  stages.pngs[f"{label} loss curve"] = trained.get("plot")
  stages.pngs[f"{label} learning curves"] = trained.get("curves") or _existing(
      os.path.join(fourm_dir, curves.CURVES_FILE))

  evaluated = stages.run("evaluation", _evaluate, config, fourm_dir, s)
  stages.figures["eval"] = {k: round(v, 4) for k, v in evaluated["metrics"].items()
                            if k.endswith(("/loss", "attr_acc", "/f1", "/miou", "/abs_rel"))}
  for task, path in (evaluated.get("grids") or {}).items():
    if path:
      stages.pngs[f"generated {task}"] = path
  for task, texts in (evaluated.get("samples") or {}).items():
    if texts:
      _say(f"eval sample {task}: {texts[0]!r}")

  sample = stages.run("sample", _sample, config, fourm_dir, s)
  for target, paths in sample.get("files", {}).items():
    for path in paths:
      if path.endswith(".png"):
        stages.pngs[f"sample {target}"] = path
      else:
        with open(path) as f:
          _say(f"sample {target}: {f.read().strip()!r}")

  total = time.perf_counter() - start
  summary = {"workdir": workdir, "seconds": total, "stage_seconds": stages.timings,
             "figures": stages.figures, "pngs": stages.pngs}
  suffix = "" if s.model == "fourm" else f"_{s.model}"
  with open(os.path.join(workdir, f"demo_summary{suffix}.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  summary["report"] = write_report(workdir, summary, evaluated, f"report{suffix}.md")
  _print_summary(summary)
  return summary


def _existing(path: str) -> str | None:
  return path if os.path.isfile(path) else None


def _preview(workdir: str, max_objects: int) -> str:
  """Six validation scenes of the kind the models see."""
  scenes = [shapes.generate_scene(i, split="validation") for i in range(30)]
  scenes = [s for s in scenes if not max_objects or s["num_objects"] <= max_objects][:6]
  return grids.save_grid(
      os.path.join(workdir, "shapes_preview.png"),
      [[s["rgb"], grids.to_rgb(s["depth"], "depth"), grids.to_rgb(s["semseg"], "classes")]
       for s in scenes],
      column_titles=("rgb", "depth", "semseg"), row_titles=[s["caption"] for s in scenes])


# The metrics of report.md's table: suffix -> whether higher is better.
REPORT_METRICS = {"attr_acc": True, "exact": True, "parsed": True, "f1": True, "miou": True,
                  "pixel_acc": True, "abs_rel": False}


def _fmt(value: Any) -> str:
  return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def write_report(workdir: str, summary: dict[str, Any], evaluated: dict[str, Any],
                 filename: str = "report.md") -> str:
  """`<workdir>/<filename>`: every generation metric with its chance level and tokenizer ceiling,
  the teacher-forced accuracies, the tokenizers' quality, wall time per stage and the PNGs."""
  metrics, bounds = evaluated.get("metrics", {}), evaluated.get("bounds") or {}
  lines = [f"# mmjax demo: {evaluated.get('objective')} ({summary['seconds'] / 60:.1f} min)", "",
           (f"Model of step {evaluated.get('step')}, generation scored on "
            f"{evaluated.get('num_scenes')} validation scenes. Chance: another scene's ground "
            "truth scored against this one; ceiling: the ground-truth tokens decoded by the "
            "tokenizer."),
           "", "| metric | model | chance | ceiling |", "|---|---|---|---|"]
  for key in sorted(k for k in metrics if k.startswith("gen/")):
    if key.rsplit("/", 1)[-1] in REPORT_METRICS:
      lines.append(f"| {key.removeprefix('gen/')} | {_fmt(metrics[key])} | "
                   f"{_fmt(bounds.get('chance', {}).get(key))} | "
                   f"{_fmt(bounds.get('ceiling', {}).get(key))} |")
  lines += ["", "abs_rel: lower is better; the others higher.", "",
            "| teacher-forced (validation) | value |", "|---|---|"]
  lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())
            if k.startswith(("val/acc/", "val/loss"))]
  lines += ["", "| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f} |" for k, v in summary["stage_seconds"].items()]
  lines += [f"| total | {summary['seconds']:.0f} |", ""]
  for name, figures in summary["figures"].items():
    lines.append(f"- {name}: `{json.dumps(figures, default=str)}`")
  lines.append("")
  for name, path in summary["pngs"].items():
    if path:
      lines += [f"## {name}", "", f"![{name}]({os.path.relpath(path, workdir)})", ""]
  path = os.path.join(workdir, filename)
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def _print_summary(summary: dict[str, Any]) -> None:
  out = sys.stdout
  print("\nmmjax demo: summary", file=out)
  for stage, seconds in summary["stage_seconds"].items():
    print(f"  {stage:<16} {seconds:7.1f} s", file=out)
  print(f"  {'total':<16} {summary['seconds']:7.1f} s", file=out)
  for name, figures in summary["figures"].items():
    print(f"  {name}: {json.dumps(figures, default=str)}", file=out)
  print(f"mmjax demo: report {summary.get('report')}", file=out)
  print("mmjax demo: PNGs", file=out)
  for name, path in summary["pngs"].items():
    print(f"  {name:<28} {path}", file=out)
  out.flush()
