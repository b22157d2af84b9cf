"""Ctrl-C (SIGINT): the first press saves at the next step and exits 0, like SIGTERM; a second
press aborts without saving, and the checkpoints already written stay as they were."""

import os
import signal
import time

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


def test_first_ctrl_c_saves_and_exits_0_second_aborts(tmp_path):
  workdir, proc = _started(tmp_path, "once")
  proc.send_signal(signal.SIGINT)
  summary, err = _finish(proc, timeout=120)
  assert summary["preempted"] and summary["step"] < 400
  assert "mmjax: Ctrl-C: saving a checkpoint at the next step and stopping" in err
  assert f"mmjax: SIGINT: saved the checkpoint of step {summary['step']}; stopping" in err
  assert summary["checkpoints"][-1] == summary["step"]

  workdir, proc = _started(tmp_path, "twice")
  checkpoints = workdir / "checkpoints"
  proc.send_signal(signal.SIGINT)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "KeyboardInterrupt" in err
  assert "saved the checkpoint" not in err
  saved = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
  assert saved and all(n % TRAIN["checkpoint_every"] == 0 for n in saved)  # only periodic saves
  last = max(saved)
  assert os.path.isfile(checkpoints / str(last) / "iter" / "process_0-of-1.json")
