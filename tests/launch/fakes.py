"""Fake `gcloud`, `sbatch` and `srun` executables for the launch-script tests.

`install(bin_dir, log)` writes them into bin_dir (put it first on PATH). Each appends its
arguments to `log` as one JSON list per call.
- gcloud: `tpu-vm describe NAME` fails (no such TPU yet) unless asked for a --format (then two
  workers' addresses); `queued-resources describe` says ACTIVE; `ssh --command C` exits
  $FAKE_GCLOUD_RUN_STATUS when C runs mmjax; the worker-0 `tail` prints a line and waits to be
  killed; `scp NAME:SRC DEST` writes DEST.
- sbatch: runs the batch script in the foreground (a real sbatch queues it and returns) with the
  variables SLURM gives a job: a job id whose derived coordinator port (JAX: id % 4096 + 61440) is
  free, SLURM_NNODES from --nodes, SLURM_SUBMIT_DIR; writes the batch shell's pid to
  $FAKE_SBATCH_PID. Called inside a job (a resubmission) it only records the call.
- srun: starts SLURM_NNODES x --ntasks-per-node local processes of its command with SLURM_NTASKS,
  SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST=localhost; forwards SIGTERM to them; exits
  with the first non-zero exit status among them.
"""

import os
import sys

_COMMON = '''#!{python}
import json, os, signal, socket, subprocess, sys, time
with open({log!r}, "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
args = sys.argv[1:]
'''

_GCLOUD = '''
if "describe" in args and "tpu-vm" in args:
  if not any(a.startswith("--format") for a in args):
    sys.exit(1)
  print("10.0.0.1;10.0.0.2")
elif "describe" in args:
  print("ACTIVE")
elif "ssh" in args:
  command = args[args.index("--command") + 1]
  if "tail" in command:
    print("worker 0: step 1/10 loss=5.0", flush=True)
    time.sleep(600)
  if "mmjax" in command and ".venv/bin/mmjax" in command:
    sys.exit(int(os.environ.get("FAKE_GCLOUD_RUN_STATUS", "0")))
elif "scp" in args:
  paths = [a for a in args if not a.startswith("-") and a not in ("compute", "tpus", "tpu-vm",
                                                                  "scp")]
  source, dest = paths[0], paths[1]
  if ":" in source:
    with open(dest, "w") as f:
      f.write("log of " + source + "\\n")
'''

_SBATCH = '''
if "SLURM_JOB_ID" in os.environ:  # a resubmission from inside a job: queued, not run here
  print("Submitted batch job 2")
  sys.exit(0)
flags = []
while args and args[0].startswith("-"):
  flags.append(args.pop(0))
nodes = 1
for flag in flags:
  if flag.startswith("--nodes="):
    nodes = int(flag.split("=", 1)[1])
while True:  # a job id whose coordinator port is free
  port = 61440 + int.from_bytes(os.urandom(2), "little") % 4096
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      continue
  break
env = dict(os.environ, SLURM_JOB_ID=str(port - 61440 + 4096), SLURM_NNODES=str(nodes),
           SLURM_JOB_NUM_NODES=str(nodes), SLURM_SUBMIT_DIR=os.getcwd())
job = subprocess.Popen(["bash", *args], env=env)
with open(os.environ["FAKE_SBATCH_PID"], "w") as f:
  f.write(str(job.pid))
sys.exit(job.wait())
'''

_SRUN = '''
per_node = 1
while args and args[0].startswith("-"):
  flag = args.pop(0)
  if flag.startswith("--ntasks-per-node="):
    per_node = int(flag.split("=", 1)[1])
nodes = int(os.environ.get("SLURM_NNODES", "1"))
ntasks = nodes * per_node
procs = [subprocess.Popen(args, env=dict(
    os.environ, SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node),
    SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES=str(nodes), SLURM_NODEID=str(i)))
         for i in range(ntasks)]
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
'''


def install(bin_dir, log) -> None:
  os.makedirs(bin_dir, exist_ok=True)
  for name, body in (("gcloud", _GCLOUD), ("sbatch", _SBATCH), ("srun", _SRUN)):
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
      f.write(_COMMON.format(python=sys.executable, log=str(log)) + body)
    os.chmod(path, 0o755)
