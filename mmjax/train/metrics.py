"""Metric sinks: `<workdir>/metrics.jsonl`, TensorBoard events, a progress line, a loss plot.

One JSON object per line: {"step": N, "loss": ..., "eval/loss": ..., ...}. On resume the lines of
steps after the checkpoint are dropped (they are recomputed), so the file reads as one run. Only
process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
  """Writes metrics of step N to every sink; prints progress every `log_every` steps."""

  def __init__(self, workdir: str, *, total_steps: int, log_every: int, start_step: int = 0,
               stream=None):
    self.workdir = workdir
    self.total_steps = total_steps
    self.log_every = max(1, log_every)
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self._start = (time.perf_counter(), start_step)
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step]
    with open(self.path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    self._file = open(self.path, "a")
    from tensorboardX import SummaryWriter  # noqa: PLC0415 -- late: only when TensorBoard logs
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, float) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)

  def progress(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled or (step % self.log_every and step != self.total_steps):
      return
    start_time, start_step = self._start
    done = step - start_step
    elapsed = time.perf_counter() - start_time
    eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
    shown = " ".join(f"{k}={_fmt(metrics[k])}" for k in
                     ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu")
                     if k in metrics)
    line = f"step {step}/{self.total_steps} {shown} eta {_duration(eta)}"
    if self.tty:
      width = 30
      filled = int(width * step / max(self.total_steps, 1))
      self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {line}\x1b[K")
      if step == self.total_steps:
        self.stream.write("\n")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    if self.enabled:
      self.stream.write(("\n" if self.tty else "") + text + "\n")
      self.stream.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    self._tb.close()
    if self.tty:
      self.stream.write("\n")

  def plot(self) -> str | None:
    """Loss (and eval loss) against step, beside the metrics file."""
    if not self.enabled:
      return None
    import matplotlib  # noqa: PLC0415 -- late: a second to import, only for the PNG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    records = read_jsonl(self.path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "eval/loss"):
      points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), float)
                and math.isfinite(r[key])]
      if points:
        ax.plot(*zip(*points), label=key, marker="o" if key.startswith("eval") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(self.workdir, PLOT_FILE)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plain(value: Any) -> Any:
  try:
    return float(value)
  except (TypeError, ValueError):
    return value


def _fmt(value: float) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
