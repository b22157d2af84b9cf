"""Metric sinks: `<workdir>/metrics.jsonl`, TensorBoard events, a progress bar, a loss plot.

One JSON object per line: {"step": N, "loss": ..., "eval/loss": ..., ...}. On resume the lines of
steps after the checkpoint are dropped (they are recomputed), so the file reads as one run. Only
process 0 writes. The workdir may be a URL (gs://): object stores cannot append, so there the
metrics file is rewritten whole at most every `URL_FLUSH_S` seconds and at the end, and the
TensorBoard events likewise whenever tensorboardX flushes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import tqdm
from etils import epath

from mmjax import paths, progress

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
URL_FLUSH_S = 30.0


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  path = epath.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _JsonlSink:
  """Appends lines to a local file; on a URL keeps them and rewrites the object now and then."""

  def __init__(self, path: epath.Path, lines: list[str]):
    self.path = path
    self.url = paths.is_url(path)
    self.lines = list(lines)
    self._written = 0.0
    self.path.write_text("".join(self.lines))
    self._file = None if self.url else open(self.path, "a")  # noqa: SIM115 -- kept open for appends

  def write(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    self.lines.append(line)
    if time.monotonic() - self._written > URL_FLUSH_S:
      self.flush()

  def flush(self) -> None:
    if self.url:
      self.path.write_text("".join(self.lines))
      self._written = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    self.flush()


class _ObjectEventFile:
  """A TensorBoard event file on a URL: the bytes so far, uploaded whole on each flush."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.data = bytearray()

  def write(self, data: bytes) -> None:
    self.data += data

  def flush(self) -> None:
    self.path.write_bytes(bytes(self.data))

  def close(self) -> None:
    self.flush()


class _ObjectEventFiles:
  """tensorboardX's writer factory for URL schemes, through epath (its own gs:// writer needs the
  google-cloud-storage client and credentials of its own)."""

  def open(self, path: str) -> _ObjectEventFile:
    return _ObjectEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no folders to create


def _register_url_event_files() -> None:
  from tensorboardX import record_writer  # noqa: PLC0415 -- late, as SummaryWriter
  for scheme in ("gs", "s3"):
    record_writer.register_writer_factory(scheme, _ObjectEventFiles())


class MetricsWriter:
  """Writes metrics of step N to every sink; prints progress every `log_every` steps."""

  def __init__(self, workdir: str, *, total_steps: int, log_every: int, start_step: int = 0,
               stream=None):
    self.workdir = epath.Path(workdir)
    self.total_steps = total_steps
    self.log_every = max(1, log_every)
    self.stream = stream or sys.stderr
    self._bar = None
    self.enabled = jax.process_index() == 0
    self.path = self.workdir / METRICS_FILE
    self._start_step = start_step
    self._tb = None
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step]
    self._file = _JsonlSink(self.path, [json.dumps(r) + "\n" for r in kept])
    from tensorboardX import SummaryWriter  # noqa: PLC0415 -- late: only when TensorBoard logs
    _register_url_event_files()
    self._tb = SummaryWriter(os.fspath(self.workdir / "tb"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, float) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)

  def progress(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    if self._bar is None:  # at the first step, so its clock starts after the compile
      # Every log_every steps is a line of the run's log: no time throttle; no empty first line.
      self._bar = progress.bar(self.total_steps, "train", unit="step", initial=self._start_step,
                               stream=self.stream, interval_s=0.0, delay=1e-9)
    if step % self.log_every and step != self.total_steps:
      return
    shown = " ".join(f"{k}={_fmt(metrics[k])}" for k in
                     ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu")
                     if k in metrics)
    if metrics.get("data/bad_records"):  # records skipped as bad: visible while it happens
      shown += f" bad_records={int(metrics['data/bad_records'])}"
    self._bar.set_postfix_str(shown, refresh=False)
    self._bar.update(step - self._bar.n)

  def message(self, text: str) -> None:
    if self.enabled:
      tqdm.tqdm.write(text, file=self.stream)  # above a live bar, not through it

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    self._tb.close()
    if self._bar is not None:
      self._bar.close()
      self._bar = None

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
    fig.tight_layout()
    path = paths.save_figure(fig, self.workdir / PLOT_FILE)
    plt.close(fig)
    return path


def _plain(value: Any) -> Any:
  try:
    return float(value)
  except (TypeError, ValueError):
    return value


def _fmt(value: float) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


