"""Kill -9 and resume gives bitwise the same losses as a run that never stopped; SIGTERM saves."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "run_toy.py")


def _env(cache_dir):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  # Every run compiles the same program: share it through the persistent cache.
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def _start(workdir, overrides, env):
  return subprocess.Popen([sys.executable, SCRIPT, str(workdir), json.dumps(overrides)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=240):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1]), err


def _wait_for(path, proc, timeout=240):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [(r["step"], r["loss"], r["param_norm"]) for r in records if "loss" in r]


STEPS = 12
TRAIN = {"steps": STEPS, "checkpoint_every": 3, "keep_checkpoints": 2, "eval_every": 0}


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_exact(tmp_path):
  env = _env(tmp_path / "cache")
  reference, _ = _finish(_start(tmp_path / "ref", {"train": TRAIN}, env))
  assert reference["step"] == STEPS

  killed = tmp_path / "killed"
  # The kill comes at the first checkpoint, with 9 steps of 1 s still to run: under load the
  # checkpoint of step 6 once appeared only after 1.5 s of steps 7-12 (0.25 s each) had finished.
  proc = _start(killed, {"train": TRAIN, "toy": {"delay_s": 1.0}}, env)
  _wait_for(killed / "checkpoints" / "3", proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(_losses(killed)) < STEPS  # it really died mid-way

  resumed, err = _finish(_start(killed, {"train": TRAIN}, env))
  assert resumed["start_step"] >= 3 and "resumed from the checkpoint of step" in err
  steps = [s for s, _, _ in _losses(killed)]
  assert steps == list(range(1, STEPS + 1))
  assert _losses(killed) == _losses(tmp_path / "ref")  # bitwise: floats compared exactly


def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path):
  env = _env(tmp_path / "cache")
  workdir = tmp_path / "run"
  proc = _start(workdir, {"train": dict(TRAIN, steps=200), "toy": {"delay_s": 0.1}}, env)
  _wait_for(workdir / "metrics.jsonl", proc)
  while len(_losses(workdir)) < 3:
    assert proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  summary, err = _finish(proc, timeout=120)
  assert summary["preempted"] and "SIGTERM" in err
  assert summary["step"] < 200
  assert summary["checkpoints"][-1] == summary["step"]
  assert _losses(workdir)[-1][0] == summary["step"]


def test_sigterm_while_creating_the_iterator_exits_0_and_saves_nothing(tmp_path):
  """The process sends itself the SIGTERM as it creates the train iterator: no race with the test.
  (A SIGTERM during the restore: test_checkpoint_restore.py.)"""
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, SCRIPT, str(workdir), json.dumps({"train": TRAIN}),
                           "iterator"], env=_env(tmp_path / "cache"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  summary, err = _finish(proc)
  assert summary["preempted"] and "SIGTERM before the first step" in err
  assert summary["step"] == summary["start_step"] == 0 and summary["checkpoints"] == []
  assert os.listdir(workdir / "checkpoints") == []
