"""Progress on stderr: a plain line per interval in a log, a live bar on a terminal."""

import io

from mmjax import progress


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_in_a_log_each_redraw_is_a_short_line_of_its_own():
  log = io.StringIO()
  with progress.bar(1000, "eval", unit="batch", stream=log, interval_s=0.0) as shown:
    for _ in range(1000):
      shown.update(1)
  text = log.getvalue()
  assert "\r" not in text and "\x1b" not in text
  lines = text.splitlines()
  assert lines[0].startswith("eval: 0/1000 batch [")
  assert lines[-1].startswith("eval: 1000/1000 batch")
  assert max(len(line) for line in lines) < 100
  assert sum(line.startswith("eval: 1000/1000") for line in lines) == 1  # no repeat on close


def test_in_a_log_lines_are_throttled_to_the_interval():
  log = io.StringIO()
  with progress.bar(1000, "prepare", stream=log) as shown:  # LOG_INTERVAL_S: 30 s
    for _ in range(1000):
      shown.update(1)
  assert [line.split(" [")[0] for line in log.getvalue().splitlines()] == [
      "prepare: 0/1000 it", "prepare: 1000/1000 it"]


def test_on_a_terminal_the_bar_redraws_in_place():
  terminal = _Terminal()
  with progress.bar(10, "train", unit="step", stream=terminal, interval_s=0.0) as shown:
    shown.update(10)
  assert "\r" in terminal.getvalue() and terminal.getvalue().count("\n") == 1


def test_phase_and_status_lines():
  log = io.StringIO()
  with progress.phase("compile", stream=log):
    pass
  report = progress.status("mmjax eval", stream=log, interval_s=3600.0)
  report("rgb->caption: 4/16 scenes", False)   # the first message is shown
  report("rgb->caption: 8/16 scenes", False)   # within the interval: not shown
  report("rgb->caption: 16/16 scenes", True)   # done: always shown
  lines = log.getvalue().splitlines()
  assert lines[0] == "compile ..."
  assert lines[1].startswith("compile: done in ") and lines[1].endswith(" s")
  assert lines[2:] == ["mmjax eval: rgb->caption: 4/16 scenes",
                       "mmjax eval: rgb->caption: 16/16 scenes"]


def test_disabled_prints_nothing():
  log = io.StringIO()
  with progress.bar(3, "x", stream=log, enabled=False) as shown:
    shown.update(3)
  with progress.phase("y", stream=log, enabled=False):
    pass
  progress.status("z", stream=log, enabled=False)("m", True)
  assert log.getvalue() == ""
