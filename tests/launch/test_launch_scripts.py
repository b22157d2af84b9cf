"""launch/tpu/run.sh and launch/gpu/submit.sh with fake gcloud, sbatch and srun on PATH
(tests/launch/fakes.py); the SLURM test runs a real two-process `mmjax train` through them."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.launch import fakes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU = os.path.join(ROOT, "launch", "tpu", "run.sh")
SUBMIT = os.path.join(ROOT, "launch", "gpu", "submit.sh")


@pytest.fixture
def fake_path(tmp_path):
  log = tmp_path / "calls.jsonl"
  fakes.install(tmp_path / "bin", log)
  env = {k: v for k, v in os.environ.items()
         if k != "XLA_FLAGS" and not k.startswith(("MMJAX_", "SLURM_"))}
  env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
  return env, log


def _calls(log):
  if not os.path.exists(log):
    return []
  with open(log) as f:
    return [json.loads(line) for line in f]


def _gcloud_verbs(calls):
  """What each gcloud call did: "create", "scp", "ssh all: <program of the command>", ..."""
  verbs = []
  for call in calls:
    if "ssh" in call:
      command = call[call.index("--command") + 1]
      who = "all" if "--worker=all" in call else "worker 0"
      verbs.append(f"ssh {who}: {command.split(' && ')[-1].split()[0]}")
    else:
      verbs.append(call[4])  # gcloud compute tpus tpu-vm|queued-resources VERB
  return verbs


def _run(args, env, tmp_path, check=True):
  proc = subprocess.run(["bash", *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                        timeout=120)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_tpu_dry_run_prints_every_command_and_runs_none(fake_path, tmp_path):
  env, log = fake_path
  proc = _run([TPU, "--name", "pod", "--zone", "us-east5-a", "--type", "v5p-64", "--spot",
               "--dry-run", "--", "train", "--config=configs/fourm/4m.py:B",
               "--workdir=gs://bucket/run"], env, tmp_path)
  assert _calls(log) == []
  lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
  assert lines[0] == ("+ gcloud compute tpus tpu-vm create pod --zone us-east5-a "
                      "--accelerator-type v5p-64 --version v2-alpha-tpuv5 --spot")
  assert any("tpu-vm scp" in line and "--worker=all" in line for line in lines)
  assert any("jax\\[tpu\\]" in line and "--worker=all" in line for line in lines)
  run = [line for line in lines if ".venv/bin/mmjax" in line]
  assert len(run) == 1 and "--worker=all" in run[0] and "gs://bucket/run" in run[0]
  assert "--worker=0" in lines[-2] and "tail" in lines[-2]
  assert lines[-1] == "+ gcloud compute tpus tpu-vm delete pod --zone us-east5-a --quiet"


def test_tpu_run_creates_installs_runs_streams_and_deletes(fake_path, tmp_path):
  env, log = fake_path
  proc = _run([TPU, "--name", "pod", "--zone", "z", "--", "train", "--config=c.py",
               "--workdir=gs://b/r"], env, tmp_path)
  assert "worker 0: step 1/10" in proc.stdout  # worker 0's log, streamed
  calls = _calls(log)
  assert all(c[0] == "gcloud" for c in calls)
  verbs = _gcloud_verbs(calls)
  assert verbs[:5] == ["describe", "create", "scp", "ssh all: tar", "ssh all: .venv/bin/pip"]
  # The command on all workers and the stream of worker 0's log start together.
  assert sorted(verbs[5:7]) == ["ssh all: .venv/bin/mmjax", "ssh worker 0: tail"]
  assert verbs[7:] == ["delete"]
  assert not os.path.exists(tmp_path / "tpu_logs")


def test_tpu_failure_fetches_every_worker_log_and_still_deletes(fake_path, tmp_path):
  env, log = fake_path
  env = dict(env, FAKE_GCLOUD_RUN_STATUS="3")
  proc = _run([TPU, "--name", "pod", "--zone", "z", "--queued", "--git",
               "https://example.com/mmjax.git@v1", "--logs", str(tmp_path / "logs"), "--",
               "train", "--config=c.py"], env, tmp_path, check=False)
  assert proc.returncode == 3 and "fetching every worker's log" in proc.stderr
  assert sorted(os.listdir(tmp_path / "logs")) == ["worker_0.log", "worker_1.log"]
  calls = _calls(log)
  clone = [c for c in calls if "ssh" in c and "git clone" in c[c.index("--command") + 1]]
  assert len(clone) == 1 and "checkout --quiet v1" in clone[0][clone[0].index("--command") + 1]
  assert calls[1][3:5] == ["queued-resources", "create"] and "--node-id" in calls[1]
  assert calls[-1][3:5] == ["queued-resources", "delete"]


def test_gpu_dry_run_prints_the_sbatch_command(fake_path, tmp_path):
  env, log = fake_path
  proc = _run([SUBMIT, "--nodes", "4", "--partition", "gpu", "--dry-run", "--", "train",
               "--config=configs/fourm/4m.py:B", "--workdir=/shared/run"], env, tmp_path)
  assert _calls(log) == []
  script = os.path.join(ROOT, "launch", "gpu", "slurm.sbatch")
  assert proc.stdout.strip() == (
      f"+ sbatch --nodes=4 --gpus-per-node=8 --time=24:00:00 --job-name=mmjax --partition=gpu "
      f"{script} train --config=configs/fourm/4m.py:B --workdir=/shared/run")
  bad = _run([SUBMIT, "--nodes", "four", "--", "train"], env, tmp_path, check=False)
  assert bad.returncode == 2 and "integers" in bad.stderr


TOY_CONFIG = '''
from mmjax.train import toy


def get_config(arg=None):
  del arg
  config = toy.toy_config(steps=400, checkpoint_every=1000, keep_checkpoints=2, eval_every=0,
                          log_every=1)
  config.toy.delay_s = 0.05
  return config
'''


def _steps_logged(workdir):
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


@pytest.mark.slow
def test_slurm_job_trains_on_two_tasks_and_resubmits_after_preemption(fake_path, tmp_path):
  """submit.sh -> sbatch -> slurm.sbatch -> srun -> 2 x `mmjax train` that find each other through
  SLURM's variables; a SIGTERM to the batch shell (what --signal=B:TERM sends) makes both tasks save
  the same step and exit 0, and the job submits itself again with the same flags."""
  env, log = fake_path
  config = tmp_path / "toy.py"
  config.write_text(TOY_CONFIG)
  workdir = tmp_path / "run"
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", MMJAX_LOCAL_DEVICES="2",
             FAKE_SBATCH_PID=str(tmp_path / "job.pid"))
  job = subprocess.Popen(["bash", SUBMIT, "--nodes", "2", "--venv", sys.prefix, "--", "train",
                          f"--config={config}", f"--workdir={workdir}"], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while _steps_logged(workdir) < 3:
    assert job.poll() is None, job.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.1)
  os.kill(int((tmp_path / "job.pid").read_text()), signal.SIGTERM)
  out, err = job.communicate(timeout=120)
  assert job.returncode == 0, err[-3000:]

  assert out.strip().splitlines()[-1] == "Submitted batch job 2"  # the resubmission
  # Task 0's summary; task 1's went to its log.
  summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
  other = json.loads((workdir / "logs" / "process_1.log").read_text().strip().splitlines()[-1])
  assert summary["preempted"] and other["preempted"]
  assert summary["step"] == other["step"] < 400
  assert summary["checkpoints"] == [summary["step"]]
  assert (workdir / "checkpoints" / str(summary["step"]) / "iter" / "process_1-of-2.json").exists()

  calls = _calls(log)
  sbatch = [c for c in calls if c[0] == "sbatch"]
  srun = [c for c in calls if c[0] == "srun"]
  assert len(sbatch) == 2 and len(srun) == 1
  assert "--ntasks-per-node=1" in srun[0]
  first, again = sbatch
  assert again[1].startswith("--dependency=afterany:")
  assert again[2:] == first[1:]  # the same flags, script and mmjax arguments
