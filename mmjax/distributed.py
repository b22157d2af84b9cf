"""Multi-host start-up: one call, before any other JAX use, on every process.

Where the processes come from decides how they find each other:
- Cloud TPU VMs and SLURM: JAX detects the cluster itself (`jax.distributed.initialize()` with no
  arguments reads the TPU metadata or the SLURM variables).
- Anything else, including several processes on one machine for tests: set
  `MMJAX_COORDINATOR=host:port`, `MMJAX_NUM_PROCESSES=N` and `MMJAX_PROCESS_ID=i`.
- None of these: a single process; nothing to do.
In every case `MMJAX_LOCAL_DEVICES=k` gives each process k CPU devices (for tests and debugging on
one machine) and `MMJAX_INIT_TIMEOUT=S` (default 300) bounds the wait for the coordinator.

The devices commands of the CLI call `join(workdir)`: it initialises and then routes the output of
every process but the first to `<workdir>/logs/process_<i>.log`, so the terminal shows one
process's progress.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import socket
import sys
import time
from unittest import mock

import jax
from etils import epath

from mmjax import paths
from mmjax.errors import UserError

DEFAULT_INIT_TIMEOUT_S = 300
LOG_DIR = "logs"

_initialized = False


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the others, as found in the environment."""
  kind: str                  # "single", "explicit", "slurm" or "tpu"
  coordinator: str = ""      # host:port of process 0; "" where JAX finds it (TPU metadata)
  num_processes: int = 1
  process_id: int = 0
  local_devices: int = 0     # CPU devices per process; 0 keeps JAX's default
  timeout_s: int = DEFAULT_INIT_TIMEOUT_S


def _int_variables(env, names: tuple[str, ...], defaults: dict[str, str], why: str) -> list[int]:
  try:
    return [int(env[name] if name in env else defaults[name]) for name in names]
  except KeyError as e:
    raise UserError(f"{why} but {e.args[0]} is not") from None
  except ValueError as e:
    raise UserError(f"{', '.join(names)} must be integers: {e}") from None


def _slurm_coordinator(env) -> str:
  """The address JAX's SLURM detection picks: the first node of the step, a port from the job id."""
  from jax._src.clusters import slurm_cluster  # noqa: PLC0415 -- JAX's own rule, not a copy of it
  with mock.patch.dict(os.environ, env, clear=True):  # it reads os.environ; `env` may be another
    return slurm_cluster.SlurmCluster.get_coordinator_address(None, None)


def detect(environ: dict[str, str] | None = None) -> Cluster:
  """The cluster this process is part of, from environment variables."""
  env = dict(os.environ if environ is None else environ)
  local_devices, timeout_s = _int_variables(
      env, ("MMJAX_LOCAL_DEVICES", "MMJAX_INIT_TIMEOUT"),
      {"MMJAX_LOCAL_DEVICES": "0", "MMJAX_INIT_TIMEOUT": str(DEFAULT_INIT_TIMEOUT_S)}, "")
  common = dict(local_devices=local_devices, timeout_s=timeout_s)
  if "MMJAX_COORDINATOR" in env:
    num_processes, process_id = _int_variables(env, ("MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID"),
                                               {}, "MMJAX_COORDINATOR is set")
    if not 0 <= process_id < num_processes:
      raise UserError(f"MMJAX_PROCESS_ID={process_id} is outside [0, MMJAX_NUM_PROCESSES="
                      f"{num_processes})")
    return Cluster("explicit", env["MMJAX_COORDINATOR"], num_processes, process_id, **common)
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    missing = [name for name in needed if name not in env]
    if missing:
      raise UserError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but {', '.join(missing)} not set: "
                      "start the tasks with srun")
    num_processes, process_id = _int_variables(env, ("SLURM_NTASKS", "SLURM_PROCID"), {},
                                               "SLURM_NTASKS is set")
    return Cluster("slurm", _slurm_coordinator(env), num_processes, process_id, **common)
  if env.get("TPU_WORKER_HOSTNAMES") and "," in env["TPU_WORKER_HOSTNAMES"]:
    return Cluster("tpu", num_processes=len(env["TPU_WORKER_HOSTNAMES"].split(",")),
                   process_id=int(env.get("TPU_WORKER_ID", "0")), **common)
  return Cluster("single", **common)


def _wait_for_coordinator(cluster: Cluster) -> None:
  """Returns once the coordinator accepts connections; a UserError after `timeout_s`.

  JAX itself aborts the process (a C++ fatal error with a stack trace) when the coordinator never
  answers; checking first turns the common case (wrong address, coordinator not started, firewall)
  into one line."""
  host, _, port = cluster.coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"coordinator address {cluster.coordinator!r} is not host:port")
  deadline = time.monotonic() + cluster.timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(f"process {cluster.process_id} of {cluster.num_processes} could not reach "
                        f"the coordinator {cluster.coordinator} ({cluster.kind} cluster) within "
                        f"{cluster.timeout_s} s (MMJAX_INIT_TIMEOUT): {e}") from None
    time.sleep(0.5)


def initialize(cluster: Cluster | None = None) -> Cluster:
  """Joins the cluster (once per process) and returns it."""
  global _initialized
  cluster = detect() if cluster is None else cluster
  if _initialized:
    return cluster
  if cluster.local_devices:
    jax.config.update("jax_num_cpu_devices", cluster.local_devices)
  if cluster.kind == "single":
    _initialized = True
    return cluster
  if cluster.process_id != 0 and cluster.coordinator:
    _wait_for_coordinator(cluster)
  if cluster.kind == "explicit":
    jax.distributed.initialize(cluster.coordinator, num_processes=cluster.num_processes,
                               process_id=cluster.process_id,
                               initialization_timeout=cluster.timeout_s)
  else:  # JAX reads the SLURM / TPU environment itself
    jax.distributed.initialize(initialization_timeout=cluster.timeout_s)
  _initialized = True
  return cluster


def log_path(workdir: str | os.PathLike, process_id: int) -> epath.Path:
  return epath.Path(workdir) / LOG_DIR / f"process_{process_id}.log"


def route_output(workdir: str | os.PathLike | None, process_id: int) -> epath.Path | None:
  """Sends this process's output to `<workdir>/logs/process_<i>.log` unless it is process 0.

  A local log file takes the file descriptors too (XLA's own messages included) and is appended
  to, so a resumed run's log follows the earlier one's; on a URL workdir (gs://) Python's stdout
  and stderr go to the object, written when the process exits (XLA's messages stay on stderr)."""
  if process_id == 0 or workdir is None:
    return None
  path = log_path(workdir, process_id)
  path.parent.mkdir(parents=True, exist_ok=True)
  sys.stdout.flush()
  sys.stderr.flush()
  if not paths.is_url(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path
  log = path.open("w")
  sys.stdout = sys.stderr = log
  atexit.register(log.close)
  return path


def join(workdir: str | os.PathLike | None) -> Cluster:
  """`initialize`, then `route_output`: the first thing a command that uses devices does."""
  cluster = initialize()
  route_output(workdir, cluster.process_id)
  return cluster
