"""Ctrl-C (SIGINT): the first press saves at the next step and exits 0, like SIGTERM; a second
press aborts without saving, and the checkpoints already written stay as they were."""

import os
import signal
import time

import pytest

from mmjax.train import loop
from tests.train.test_train_resume import (
  TRAIN,
  _env,
  _finish,
  _losses,
  _start,
  _wait_for,
)


def _started(tmp_path, name):
  workdir = tmp_path / name
  proc = _start(workdir, {"train": dict(TRAIN, steps=400), "toy": {"delay_s": 0.1}},
                _env(tmp_path / "cache"))
  _wait_for(workdir / "metrics.jsonl", proc)
  while len(_losses(workdir)) < 4:  # past the checkpoint of step 3
    assert proc.poll() is None
    time.sleep(0.05)
  return workdir, proc


@pytest.mark.slow  # a training subprocess (~25 s under load)
def test_first_ctrl_c_saves_and_exits_0(tmp_path):
  workdir, proc = _started(tmp_path, "once")
  proc.send_signal(signal.SIGINT)
  summary, err = _finish(proc, timeout=120)
  assert summary["preempted"] and summary["step"] < 400
  assert "mmjax: Ctrl-C: saving a checkpoint at the next step and stopping" in err
  assert f"mmjax: SIGINT: saved the checkpoint of step {summary['step']}; stopping" in err
  assert summary["checkpoints"][-1] == summary["step"]
  assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == \
      summary["checkpoints"]


def test_second_ctrl_c_aborts_at_once(capsys):
  """In-process: two presses delivered before Python runs the handler would count as one."""
  before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in some test workers
  with loop._Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs at the next bytecode boundary
    assert preemption.requested and preemption.name == "SIGINT"
    assert "press Ctrl-C again to abort without saving" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is before  # restored on exit
  with loop._Preemption() as preemption:  # SIGTERM first: a later Ctrl-C still saves
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert preemption.requested and preemption.name == "SIGTERM"
