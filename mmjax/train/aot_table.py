"""`mmjax aot --table DIR`: the README's table of ahead-of-time TPU compiles, regenerated.

Every row (ROWS, the one place they are defined) is one `mmjax aot` run in its own process: a
compile holds tens of GiB of host memory and libtpu state, and a row that fails (does not fit,
crashes, runs past the time limit) becomes a cell of the table instead of ending the run. Each row
leaves `DIR/rows/<row>/` (the program and `aot.json`, or `error.txt`); the table is rebuilt from
those after every row, as `DIR/aot_table.md` and `DIR/aot_table.json`, so a run that is stopped
still shows every row that compiled, and a re-run with `--rows` recompiles only the rows named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

from etils import epath

from mmjax import progress
from mmjax.errors import UserError

GIB = 2 ** 30
CHECKOUT = epath.Path(__file__).resolve().parents[2]  # the rows' config paths are relative to it
FOURM = "configs/fourm/4m.py"
DECODER = "configs/decoder/shapes.py"


@dataclasses.dataclass(frozen=True)
class Row:
  name: str                   # also the row's folder under DIR/rows
  model: str                  # what the table's first column says
  config: str                 # --config
  topology: str               # --topology
  overrides: tuple[str, ...]  # --config.KEY=VALUE

  def command(self) -> list[str]:
    return ["aot", f"--config={self.config}", f"--topology={self.topology}",
            *(f"--config.{o}" for o in self.overrides)]


def _fourm(size: str, budget: int, topology: str, batch: int, *extra: str, **mesh: int) -> Row:
  shape = [f"mesh.shape.{k}={v}" for k, v in mesh.items()]
  return Row(f"4m-{size}-{budget}-{topology.split(':')[0]}", f"4M-{size}, {budget}/{budget} tokens",
             f"{FOURM}:{size}", topology,
             (f"train.batch_size={batch}", f"model.num_input_tokens={budget}",
              f"model.num_target_tokens={budget}", *shape, *extra))


def _decoder(size: str, sparsity: str, topology: str, batch: int, *extra: str) -> Row:
  return Row(f"decoder-{size}-{sparsity}-{topology.split(':')[0]}",
             f"decoder {size} {sparsity}, 4096 context", f"{DECODER}:{size},sparsity={sparsity}",
             topology, ("model.max_length=4096", f"train.batch_size={batch}",
                        "mesh.shape.data=1", "mesh.shape.fsdp=-1", *extra))


# 4M at its 128/128 budget and 4M-21's 256/256; the decoders at Chameleon's 4096 context. v5p
# (95 GiB HBM) first, then v6e (32 GiB): smaller slices per model where the state fits, fsdp over
# the slice for the models whose state needs it, full remat where the activations do not fit.
ROWS: tuple[Row, ...] = (
    # 4M-XL at 256/256 saves only the matmul outputs: without remat it needs 109.1 GiB per chip.
    *(_fourm(size, budget, "v5p:2x2x2", 256,
             *(("model.remat=save_dots",) if (size, budget) == ("XL", 256) else ()),
             **({"data": 1, "fsdp": -1} if size == "XL" else {}))
      for budget in (128, 256) for size in ("B", "L", "XL")),
    *(_decoder("1B", s, "v5p:2x2x2", 8) for s in ("dense", "mot", "moma")),
    *(_decoder("7B", s, "v5p:4x4x4", 64) for s in ("dense", "mot", "moma")),
    *(_fourm(size, budget, "v6e:2x4", 128, **({"data": 1, "fsdp": -1} if size != "B" else {}))
      for budget in (128, 256) for size in ("B", "L", "XL")),
    *(_decoder("1B", s, "v6e:2x4", 8) for s in ("dense", "mot", "moma")),
    *(_decoder("7B", s, "v6e:4x4", 16, "model.remat=full") for s in ("dense", "mot", "moma")),
)


def select(pattern: str | None) -> list[Row]:
  """The rows whose name matches the regular expression `pattern` (all when None)."""
  rows = ROWS
  if not pattern:
    return list(rows)
  try:
    chosen = [r for r in rows if re.search(pattern, r.name)]
  except re.error as e:
    raise UserError(f"--rows {pattern!r}: not a regular expression ({e})") from None
  if not chosen:
    raise UserError(f"--rows {pattern!r} matches no row; rows: {', '.join(r.name for r in rows)}")
  return chosen


def _run_row(row: Row, folder: epath.Path, timeout_s: float) -> dict[str, Any]:
  """One `mmjax aot` process; its JSON result, or {"error": one line}."""
  folder.mkdir(parents=True, exist_ok=True)
  for stale in ("aot.json", "error.txt"):
    (folder / stale).unlink(missing_ok=True)
  argv = [sys.executable, "-m", "mmjax.cli", *row.command(), f"--out={folder.resolve()}"]
  start = time.perf_counter()
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False,
                          cwd=CHECKOUT)
  except subprocess.TimeoutExpired:
    error = f"did not finish within {timeout_s:.0f} s"
  else:
    if proc.returncode == 0:
      return json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("mmjax: error:")]
    last = said[-1] if said else (lines[-1] if lines else "no output")
    error = f"exit status {proc.returncode}: {last.removeprefix('mmjax: error: ')}"
  (folder / "error.txt").write_text(f"{error}\nafter {time.perf_counter() - start:.0f} s\n")
  return {"error": error}


def _load(row: Row, out: epath.Path, recount: bool = False) -> dict[str, Any] | None:
  """A row's result; with `recount`, its counted figures (FLOPs, bytes, splash kernels, roofline)
  derived again from the saved program and XLA's cost, so a fix of the counting reaches every row
  without compiling again."""
  folder = out / "rows" / row.name
  if (folder / "aot.json").exists():
    result = json.loads((folder / "aot.json").read_text())
    if recount and "xla_cost_per_chip" in result and (folder / "step.hlo.txt").exists():
      from mmjax.train import aot  # noqa: PLC0415 -- jax and libtpu only when recounting

      kind = aot.parse_topology(result["aot"]).kind
      result.update(aot.program_figures(
          (folder / "step.hlo.txt").read_text(), result["xla_cost_per_chip"],
          chips=result["chips"], model_flops=result["model_flops_per_step"],
          peak=result["peak_flops_per_chip"], bandwidth=kind.hbm_bandwidth))
    return result
  if (folder / "error.txt").exists():
    return {"error": (folder / "error.txt").read_text().splitlines()[0]}
  return None


def _gib(n: float) -> str:
  return f"{n / GIB:.1f}"


def _mesh(result: dict[str, Any]) -> str:
  return " ".join(f"{k} {v}" for k, v in result["mesh"].items() if v > 1) or "1 chip"


def _splash(result: dict[str, Any]) -> str:
  kernels = result.get("splash_kernels") or {}
  return "yes (" + ", ".join(f"{k.removeprefix('splash_mha_')} {n}" for k, n in kernels.items()) \
      + ")" if kernels else "no"


def row_cells(row: Row, result: dict[str, Any] | None) -> list[str]:
  """The table's cells for one row: what compiled, or why not."""
  head = [row.model, row.topology]
  if result is None:
    return head + ["not run"] + [""] * (len(HEADER) - 3)
  if "error" in result:
    return head + [result["error"].replace("|", "/")] + [""] * (len(HEADER) - 3)
  memory = result["memory_per_chip"]
  chips = result["chips"]
  hbm = result["hbm_bytes_per_chip"]
  total = memory["total_bytes"]
  roof = result.get("roofline_step_s")
  return head + [
      f"{_mesh(result)}; {result['batch_size'] / chips:g}/chip",
      _gib(memory["argument_bytes"]), _gib(memory["temp_bytes"]),
      f"{_gib(total)} / {_gib(hbm)} ({100 * (1 - total / hbm):.0f}% free)",
      f"{result['xla_flops_per_chip'] * chips / 1e12:.1f} / "
      f"{result['model_flops_per_step'] / 1e12:.1f} = {result['flops_ratio']:.2f}",
      "" if roof is None else f"{1e3 * roof:.0f} ms ({result['roofline_bound']})",
      _splash(result),
  ]


HEADER = ("model", "slice", "mesh; batch", "arguments GiB", "temporaries GiB",
          "total / HBM GiB per chip", "compiled / analytic TFLOP per step", "roofline step",
          "splash")


def render(rows: list[Row], out: epath.Path,
           recount: bool = False) -> tuple[str, list[dict[str, Any]]]:
  """The markdown table and the JSON records of `rows`, from what DIR/rows holds."""
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  records = []
  for row in rows:
    result = _load(row, out, recount)
    lines.append("| " + " | ".join(row_cells(row, result)) + " |")
    records.append({"row": row.name, "command": "mmjax " + " ".join(row.command()),
                    "result": result})
  return "\n".join(lines) + "\n", records


def run_table(out_dir: str, pattern: str | None = None, *, timeout_s: float = 3600,
              render_only: bool = False, resume: bool = False) -> dict[str, Any]:
  """Compiles the rows matching `pattern` (every row when None) one after another, then writes
  the table of all rows (those not compiled in this run keep their earlier result); with
  `resume`, rows that compiled before are skipped."""
  out = epath.Path(out_dir)
  (out / "rows").mkdir(parents=True, exist_ok=True)
  chosen = [] if render_only else select(pattern)
  if resume:
    chosen = [row for row in chosen if not (out / "rows" / row.name / "aot.json").exists()]
  failed = 0
  for i, row in enumerate(chosen, 1):
    with progress.phase(f"aot table {i}/{len(chosen)}: {row.name} on {row.topology}"):
      result = _run_row(row, out / "rows" / row.name, timeout_s)
    if "error" in result:
      failed += 1
      print(f"aot table: {row.name}: {result['error']}", file=sys.stderr, flush=True)
    _write(out)
  md, _ = _write(out, recount=render_only)
  return {"table": os.fspath(out / "aot_table.md"), "json": os.fspath(out / "aot_table.json"),
          "rows_run": len(chosen), "rows_failed": failed, "markdown": md}


def _write(out: epath.Path, recount: bool = False) -> tuple[str, list[dict[str, Any]]]:
  md, records = render(list(ROWS), out, recount)
  (out / "aot_table.md").write_text(md)
  (out / "aot_table.json").write_text(json.dumps(records, indent=2, default=str) + "\n")
  return md, records
