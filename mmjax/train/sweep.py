"""`mmjax sweep`: a grid of training runs from a sweep file; run them, or emit their commands; collect.

A sweep file (`configs/sweeps/<name>.py`) defines `get_sweep(arg=None)` returning a dict:

  config   the base config, "path[:arg]" as for `--config` (required)
  points   a list of override dicts {dotted config key: value}, one per run (required);
           `product({...})` builds grids; an optional "_name" key names the point
  metric   the final metric to compare and fit (default "eval/loss"; falls back to "loss")
  fit      True: fit scaling laws to the results and plot them (default False)

Each point trains in `<workdir>/<point name>` (names come from the overrides that vary between
points, e.g. `d_model=64,steps=200`). Running is sequential and resumable: a point with a `sweep_point.json`
marker is finished and skipped, an interrupted one resumes from its checkpoint. `emit` prints one
`mmjax train` command per point instead (for a cluster); collecting afterwards reads every point's
`metrics.jsonl`. Results: `<workdir>/results.jsonl` (a row per point, then the fit), a text table
`<workdir>/results.txt`, and `<workdir>/scaling.png` when fitting.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from etils import epath

from mmjax import config as mmconfig
from mmjax.errors import UserError
from mmjax.train import scaling
from mmjax.train.loop import build, run_train
from mmjax.train.metrics import METRICS_FILE, read_jsonl
from mmjax.train.objective import get_objective

MARKER = "sweep_point.json"
RESULTS = "results.jsonl"
TABLE = "results.txt"
PLOT = "scaling.png"
_SPEC_KEYS = ("config", "points", "metric", "fit")


def product(axes: Mapping[Any, Sequence[Any]]) -> list[dict[str, Any]]:
  """The grid of every combination of `axes` values, first axis slowest.

  A key may be a tuple of config keys whose values are tuples, so that they move together:
  `product({("model.d_model", "model.num_heads"): [(64, 2), (128, 4)], "train.steps": [50, 100]})`.
  """
  keys = list(axes)
  points = []
  for values in itertools.product(*(axes[k] for k in keys)):
    point: dict[str, Any] = {}
    for key, value in zip(keys, values):
      if isinstance(key, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(key):
          raise ValueError(f"product: the values of {key} must be tuples of {len(key)}, got {value!r}")
        point.update(zip(key, value))
      else:
        point[key] = value
    points.append(point)
  return points


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    text = f"{value:g}"
  elif isinstance(value, (tuple, list)):
    text = "-".join(_format_value(v) for v in value)
  else:
    text = str(value)
  return re.sub(r"[^A-Za-z0-9.+\-]+", "_", text).strip("_") or "_"


def point_name(point: Mapping[str, Any]) -> str:
  """`key=value,...` over the point's overrides, each key shortened to its last part when that is
  unambiguous within the point (`model.d_model=64` -> `d_model=64`)."""
  if "_name" in point:
    return str(point["_name"])
  keys = [k for k in point if k != "_name"]
  if not keys:
    return "base"
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return ",".join(f"{short if last.count(short) == 1 else key}={_format_value(point[key])}"
                  for key, short in zip(keys, last))


def load_sweep(spec: str) -> dict[str, Any]:
  """Runs the sweep file's get_sweep(arg); checks and names its points."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"sweep file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_mmjax_sweep_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
      raise UserError(f"sweep file {path!r} defines no get_sweep()")
    takes_arg = bool(inspect.signature(get_sweep).parameters)
    if arg and not takes_arg:
      raise UserError(f"sweep file {path!r}: get_sweep() takes no argument, got {arg!r}")
    sweep = get_sweep(arg or None) if takes_arg else get_sweep()
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 -- a sweep file may fail in any way; it is the user's.
    raise UserError(f"sweep file {path!r}: {type(e).__name__}: {e}") from None
  return check_sweep(sweep, where=path)


def check_sweep(sweep: Any, *, where: str = "sweep") -> dict[str, Any]:
  if not isinstance(sweep, Mapping):
    raise UserError(f"{where}: get_sweep() must return a dict, got {type(sweep).__name__}")
  unknown = sorted(set(sweep) - set(_SPEC_KEYS))
  if unknown:
    raise UserError(f"{where}: unknown sweep keys {unknown}; the keys are {list(_SPEC_KEYS)}")
  if not isinstance(sweep.get("config"), str) or not sweep["config"]:
    raise UserError(f"{where}: 'config' must name the base config, e.g. 'configs/fourm/shapes.py'")
  points = sweep.get("points")
  if not isinstance(points, Sequence) or not points or not all(isinstance(p, Mapping)
                                                                 for p in points):
    raise UserError(f"{where}: 'points' must be a non-empty list of override dicts")
  # Names show only the keys that vary between points (constant ones would only add length).
  keys = {k for p in points for k in p if k != "_name"}
  varying = {k for k in keys
             if len({repr(p.get(k, "<absent>")) for p in points}) > 1} if len(points) > 1 else keys
  named: dict[str, dict[str, Any]] = {}
  for point in points:
    name = point_name({k: v for k, v in point.items() if k in varying or k == "_name"})
    if name in named:
      raise UserError(f"{where}: two points are both named {name!r}; give one a '_name'")
    if "/" in name or name in (".", ".."):
      raise UserError(f"{where}: point name {name!r} is not a directory name")
    named[name] = {k: v for k, v in point.items() if k != "_name"}
  return {"config": sweep["config"], "points": named,
          "metric": str(sweep.get("metric", "eval/loss")), "fit": bool(sweep.get("fit", False))}


def _override_args(overrides: Mapping[str, Any]) -> list[str]:
  def text(value: Any) -> str:
    if isinstance(value, bool):
      return "true" if value else "false"
    if isinstance(value, (tuple, list)):
      return "(" + ",".join(text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)
  return [f"--config.{key}={text(value)}" for key, value in overrides.items()]


def point_config(sweep: Mapping[str, Any], name: str):
  """The point's config: the base config with its overrides, validated."""
  try:
    return mmconfig.load(sweep["config"], _override_args(sweep["points"][name]))
  except UserError as e:
    raise UserError(f"sweep point {name!r}: {e}") from None


def emit_commands(sweep: Mapping[str, Any], workdir: str, program: str = "mmjax") -> list[str]:
  """One `mmjax train` command line per point."""
  lines = []
  for name, overrides in sweep["points"].items():
    argv = [program, "train", f"--config={sweep['config']}", *_override_args(overrides),
            f"--workdir={os.path.join(workdir, name)}"]
    lines.append(" ".join(shlex.quote(a) for a in argv))
  return lines


def run_points(sweep: Mapping[str, Any], workdir: str, *,
               train_fn: Callable[[Any, str], dict[str, Any]] | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, str]:
  """Trains every unfinished point in order; returns {name: "ran" | "skipped" | "preempted"}."""
  if train_fn is None:
    train_fn = run_train
  log = log or (lambda text: print(text, file=sys.stderr, flush=True))
  configs = {name: point_config(sweep, name) for name in sweep["points"]}  # all checked up front
  status: dict[str, str] = {}
  total = len(configs)
  for index, (name, config) in enumerate(configs.items(), 1):
    point_dir = os.path.join(workdir, name)
    if (epath.Path(point_dir) / MARKER).exists():
      log(f"mmjax sweep: [{index}/{total}] {name}: finished before; skipped")
      status[name] = "skipped"
      continue
    log(f"mmjax sweep: [{index}/{total}] {name}: training in {point_dir}")
    summary = train_fn(config, point_dir)
    if summary.get("preempted"):
      log(f"mmjax sweep: {name} was preempted; the sweep stops (run it again to resume)")
      status[name] = "preempted"
      break
    if jax.process_index() == 0:  # every process trained the point; one writes its marker
      (epath.Path(point_dir) / MARKER).write_text(json.dumps(
          {"name": name, "overrides": sweep["points"][name], "summary": summary}, default=str))
    status[name] = "ran"
  return status


def _final(records: Sequence[Mapping[str, Any]], key: str) -> tuple[Any, Any]:
  for record in reversed(records):
    if key in record:
      return record[key], record.get("step")
  return None, None


def _sizes(config, point_dir: str) -> dict[str, Any]:
  """Parameters, training FLOPs and tokens of a point's run: parameters from the run's marker or
  the abstract model (None if the run's mesh cannot be built here), the rest from the objective."""

  objective = get_objective(config)
  params = None
  marker = epath.Path(point_dir) / MARKER
  if marker.exists():
    params = json.loads(marker.read_text()).get("summary", {}).get("params")
  if params is None:
    try:
      _, setup = build(config)
      params = int(sum(math.prod(x.shape)
                       for x in jax.tree.leaves(setup.abstract_state["params"])))
    except UserError:
      pass  # e.g. a pod's mesh collected on a workstation
  steps, batch = int(config.train.steps), int(config.train.batch_size)
  return {"params": params, "steps": steps,
          "tokens": float(objective.tokens_per_sample()) * batch * steps,
          "train_flops": float(objective.train_flops_per_sample()) * batch * steps}


def collect(sweep: Mapping[str, Any], workdir: str) -> dict[str, Any]:
  """Reads every point's metrics; writes results.jsonl and results.txt (and the fit and plot)."""

  metric = sweep["metric"]
  rows = []
  for name, overrides in sweep["points"].items():
    point_dir = os.path.join(workdir, name)
    config = point_config(sweep, name)
    records = read_jsonl(os.path.join(point_dir, METRICS_FILE))
    row: dict[str, Any] = {"kind": "run", "name": name, "overrides": dict(overrides),
                           "workdir": point_dir}
    row.update(_sizes(config, point_dir))
    last_step = max((r.get("step", 0) for r in records), default=0)
    finished = (epath.Path(point_dir) / MARKER).exists() or last_step >= row["steps"]
    row["status"] = "done" if finished else ("partial" if records else "missing")
    row["step"] = last_step
    row["loss"], _ = _final(records, "loss")
    for key in sorted({k for r in records for k in r if k.startswith("eval/")}):
      row[key], _ = _final(records, key)
    value, _ = _final(records, metric)
    if value is None and metric != "loss":
      value, _ = _final(records, "loss")
    row["metric"] = value
    rows.append(row)

  result: dict[str, Any] = {"workdir": workdir, "points": len(rows),
                            "done": sum(r["status"] == "done" for r in rows),
                            "results": os.path.join(workdir, RESULTS),
                            "table": os.path.join(workdir, TABLE)}
  fit = None
  if sweep["fit"]:
    done = [r for r in rows if r["status"] == "done" and r["metric"] is not None]
    fit = scaling.fit_results(done, "metric")
    fit["metric"] = metric
    if done:
      result["plot"] = scaling.plot_scaling(os.path.join(workdir, PLOT), done, fit, "metric",
                                            label=metric)
    result["fit"] = fit
  out = epath.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  lines = [json.dumps(row, default=str) + "\n" for row in rows]
  if fit is not None:
    lines.append(json.dumps({"kind": "fit", **fit}, default=str) + "\n")
  (out / RESULTS).write_text("".join(lines))
  table = format_table(rows, metric)
  (out / TABLE).write_text(table + "\n")
  result["table_text"] = table
  return result


def format_table(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
  """A fixed-width text table of the points: name, status, size, compute and final metrics."""
  header = ["point", "status", "step", "params", "tokens", "train_flops", "loss", metric]
  if metric == "loss":
    header.pop()

  def cell(row: Mapping[str, Any], key: str) -> str:
    value = row.get("metric" if key == metric else key)
    if value is None:
      return "-"
    if isinstance(value, float):
      return f"{value:.4g}"
    return str(value)

  body = [[row["name"]] + [cell(row, key) for key in header[1:]] for row in rows]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
  lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
  return "\n".join(line.rstrip() for line in lines)


def run_sweep(spec: str, workdir: str, *, emit: bool = False, collect_only: bool = False,
              train_fn=None, log=None) -> dict[str, Any]:
  """The command: emit the commands, or run the unfinished points; then collect."""
  sweep = load_sweep(spec)
  if emit:
    return {"commands": emit_commands(sweep, workdir)}
  status = {} if collect_only else run_points(sweep, workdir, train_fn=train_fn, log=log)
  result = collect(sweep, workdir)
  if status:
    result["ran"] = sorted(k for k, v in status.items() if v == "ran")
    result["skipped"] = sorted(k for k, v in status.items() if v == "skipped")
  return result
