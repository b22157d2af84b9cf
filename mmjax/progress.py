"""Progress of long phases on stderr, drawn by tqdm, readable both live and in a log file.

On a terminal a bar is redrawn in place. Anywhere else (a log file, a pipe, a cluster job) every
redraw becomes its own plain line, at most one per `LOG_INTERVAL_S` seconds plus the last, so logs
hold no `\\r`-joined lines thousands of characters long. stdout stays free for the commands' JSON.

  bar(total, desc)    counted work (steps, batches, samples): a tqdm bar
  phase(desc)         one blocking call (compile, lower): a start line and a "done in" line
  status(desc)        work reported as free-form messages (`report(message, done)` callbacks)
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import tqdm

LOG_INTERVAL_S = 30.0      # between plain lines when stderr is not a terminal
TTY_INTERVAL_S = 0.5       # between redraws on a terminal
_LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"


class _LogLines:
  """A file for tqdm in a log: each redraw (`\\r` + status) is written as one line of its own."""

  def __init__(self, stream: IO[str]):
    self.stream = stream

  def write(self, text: str) -> None:
    text = text.replace("\r", "").strip()
    if text:
      self.stream.write(text + "\n")

  def flush(self) -> None:
    self.stream.flush()


class _LogBar(tqdm.tqdm):
  """In a log, closing shows the final count once (unless it is already the last line shown)."""

  def close(self) -> None:
    if not self.disable and self.n != self.last_print_n:
      self.refresh()
    self.leave = False  # no repeat of the last line
    super().close()


def is_terminal(stream: IO[str]) -> bool:
  return bool(getattr(stream, "isatty", None) and stream.isatty())


def bar(total: int | None, desc: str, *, unit: str = "it", enabled: bool = True,
        stream: IO[str] | None = None, interval_s: float | None = None, **kwargs: Any) -> tqdm.tqdm:
  """A tqdm bar on `stream` (stderr): live on a terminal, plain lines every `interval_s` (default
  LOG_INTERVAL_S) elsewhere. Extra keyword arguments go to tqdm."""
  stream = stream or sys.stderr
  if is_terminal(stream):
    return tqdm.tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not enabled,
                     mininterval=TTY_INTERVAL_S if interval_s is None else interval_s,
                     dynamic_ncols=True, **kwargs)
  kwargs.setdefault("bar_format", _LOG_FORMAT if total else "{desc}: {n_fmt} {unit} [{elapsed}]")
  # miniters=1 with maxinterval=inf: tqdm checks the clock on every update, not a learnt stride.
  return _LogBar(total=total, desc=desc, unit=unit, file=_LogLines(stream),
                   disable=not enabled, mininterval=LOG_INTERVAL_S if interval_s is None
                   else interval_s, miniters=1, maxinterval=float("inf"), ascii=True, **kwargs)


@contextlib.contextmanager
def phase(desc: str, *, enabled: bool = True, stream: IO[str] | None = None) -> Iterator[None]:
  """Brackets one blocking call with "desc ..." and "desc: done in 12.3 s" on stderr."""
  stream = stream or sys.stderr
  start = time.perf_counter()
  if enabled:
    tqdm.tqdm.write(f"{desc} ...", file=stream)
  yield
  if enabled:
    tqdm.tqdm.write(f"{desc}: done in {time.perf_counter() - start:.1f} s", file=stream)


def status(desc: str, *, enabled: bool = True, stream: IO[str] | None = None,
           interval_s: float | None = None) -> Callable[[str, bool], None]:
  """A `report(message, done)` callback that shows the latest message as a tqdm status line,
  redrawn at most every interval (always when `done`); a done message ends the line."""
  state: dict[str, Any] = {"bar": None, "last": 0.0}
  stream = stream or sys.stderr
  every = (TTY_INTERVAL_S if is_terminal(stream) else LOG_INTERVAL_S) if interval_s is None \
      else interval_s

  def report(message: str, done: bool = False) -> None:
    if not enabled:
      return
    if state["bar"] is None:
      # delay: no empty first line; this line is drawn by the explicit refreshes below.
      state["bar"] = bar(None, desc, stream=stream, bar_format="{desc}", interval_s=every,
                         delay=float("inf"))
      state["last"] = -every
    line = state["bar"]
    line.set_description_str(f"{desc}: {message}", refresh=False)
    now = time.perf_counter()
    if done or now - state["last"] >= every:
      state["last"] = now
      line.refresh()
    if done:
      line.close()
      state["bar"] = None

  return report
